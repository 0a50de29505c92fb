"""How much of the rollout/train mismatch a mixture of experts adds, and how much routing replay (R3)
removes: the engine's routing recorded per token and replayed by the trainer's forward pass.

    .venv/bin/python scripts/bench_routing_replay.py [--out bench_out/routing_replay] [--prompts 16]

For each of the tiny ``qwen3-moe`` and the dense ``qwen3`` of the same width (``models.tiny``:
hidden 64, 2 layers; the MoE's 4 experts of 64, 2 per token, are the dense MLP's 128 active), in
float32 and bfloat16: a vLLM engine in this process (the V1 model runner, as the generation role
runs it on CPU) samples one response per prompt at temperature 1, and the trainer's forward pass
(``modeling.response_logprobs``, packed, the model loaded as the trainer loads it) scores them.
For the MoE it scores them twice: with its routers' own choice, and with the engine's (replayed).

vLLM 0.32 returns the routed experts only through its V2 model runner (``enable_return_routed_
experts``), which needs Triton, absent from the CPU build (README, "Model families and mixtures
of experts"). Its routers' capture hook (``BaseRouter.set_capture_fn``) runs on every runner, so
this script records the routing with it, one request at a time (so the rows of each step are that
request's: the prompt at prefill, then one token per decode step), with prefix caching off (a
cached prompt is not routed again). Reported per run: ``logprob_gap`` (mean |engine - trainer|
logprob of the sampled tokens, as the run logs it), ``rollout_corr/mismatch_kl`` (k3 of
KL(engine || trainer), mean per token) and the share of (token, layer) routings on which the
trainer's routers chose other experts than the engine's.

Writes ``<out>/routing_replay.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MAX_NEW_TOKENS = 24
PROMPT_LEN = 8


def engine(path: str, dtype: str, routing: list | None):
    """An in-process vLLM engine; with ``routing`` (a list) each MoE layer's top-k expert ids of
    every forward pass are appended to it as (layer, ids)."""
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind")
    from vllm import LLM

    llm = LLM(model=path, dtype=dtype, seed=0, max_model_len=128, enforce_eager=True, kv_cache_memory_bytes=2**26,
              enable_prefix_caching=False, logprobs_mode="processed_logprobs", distributed_executor_backend="uni")
    if routing is not None:

        def bind(model) -> int:
            from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
            from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner

            runners = [m for m in model.modules() if isinstance(m, MoERunner) and isinstance(m.router, BaseRouter)]
            for m in runners:
                m.router.set_capture_fn(lambda ids, layer=m.layer_id: routing.append((layer, ids.clone())))
            return len(runners)

        assert llm.apply_model(bind)[0] > 0, "no MoE router to record"
    return llm


def sample(llm, prompts: list[list[int]], routing: list | None, layers: int):
    """(responses, engine logprobs, per request the (positions, layers, k) routing of its forward
    passes: the prompt, then each generated token but the last)."""
    from vllm import SamplingParams, TokensPrompt

    responses, logprobs, routes = [], [], []
    for i, prompt in enumerate(prompts):
        if routing is not None:
            routing.clear()
        params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=1.0, logprobs=0, seed=i)
        (out,) = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
        ids = list(out.outputs[0].token_ids)
        responses.append(ids)
        logprobs.append([step[t].logprob for step, t in zip(out.outputs[0].logprobs, ids)])
        if routing is not None:  # forward passes in order, each one call per layer in layer order
            import torch

            steps = [routing[k : k + layers] for k in range(0, len(routing), layers)]
            routes.append(torch.cat([torch.stack([ids for _, ids in step], dim=1) for step in steps]))
    return responses, logprobs, routes


def grid_routing(exp, prompts, routes, layers: int, k: int):
    """The requests' routing on the experience's (B, W) grid, -1 where none was recorded (padding,
    each response's last token)."""
    import torch

    routing = torch.full((*exp.input_ids.shape, layers, k), -1, dtype=torch.long)
    width = exp.prompt_width
    for b, (prompt, route) in enumerate(zip(prompts, routes)):
        start = width - len(prompt)
        routing[b, start : start + len(route)] = route.long()
    return routing


def measure(family: str, path: str, dtype: str, prompts: list[list[int]]) -> list[dict]:
    import torch

    from rlhf_dist.core.experience import collate
    from rlhf_dist.core.kl import kl_k3
    from rlhf_dist.core.stats import masked_mean
    from rlhf_dist.models.modeling import load_causal_lm, response_logprobs

    model = load_causal_lm(path, dtype).eval()
    config = model.config
    moe = hasattr(config, "num_experts")
    layers = config.num_hidden_layers
    routing: list | None = [] if moe else None
    llm = engine(path, dtype, routing)
    responses, engine_lp, routes = sample(llm, prompts, routing, layers)
    del llm
    exp = collate(prompts, responses, pad_id=config.pad_token_id)
    mask = exp.response_mask
    engine_grid = torch.zeros_like(mask)
    for b, lp in enumerate(engine_lp):
        engine_grid[b, : len(lp)] = torch.tensor(lp)
    recorded = grid_routing(exp, prompts, routes, layers, config.num_experts_per_tok) if moe else None
    rows = []
    for replay in ([False, True] if moe else [False]):
        with torch.no_grad():
            trainer_lp, _ = response_logprobs(model, exp, 1.0, packed=True, routing=recorded if replay else None)
        row = {"family": family, "dtype": dtype, "replay": replay, "tokens": int(mask.sum()),
               "logprob_gap": masked_mean((engine_grid - trainer_lp.float()).abs(), mask).item(),
               "mismatch_kl": masked_mean(kl_k3(engine_grid, trainer_lp.float()), mask).item()}
        if moe and not replay:
            row["routing_differs"] = routing_differs(model, exp, recorded)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def measure_main(family: str, path: str, dtype: str, prompts: list[list[int]], queue) -> None:
    import torch

    torch.set_num_threads(2)
    queue.put(measure(family, path, dtype, prompts))


def routing_differs(model, exp, recorded) -> float:
    """Share of the recorded (token, layer) routings on which the trainer's routers choose another
    set of experts (the order within the k does not count)."""
    from rlhf_dist.models.routing import own_routing

    own = own_routing(model, exp)
    seen = (recorded >= 0).all(dim=-1)
    differs = (own.sort(dim=-1).values != recorded.sort(dim=-1).values).any(dim=-1)
    return (differs & seen).sum().item() / seen.sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/routing_replay")
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()
    import torch

    from rlhf_dist.models.tiny import build_random_lm, build_task_policy

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_task_policy("reviews")
    gen = torch.Generator().manual_seed(0)
    prompts = [[1, *torch.randint(4, 400, (PROMPT_LEN - 1,), generator=gen).tolist()] for _ in range(args.prompts)]
    ctx = multiprocessing.get_context("spawn")  # an engine per process: vLLM's in-process state is one per process
    rows = []
    for family in ("qwen3-moe", "qwen3"):
        path = str(build_random_lm(out / family, family, tokenizer))
        for dtype in ("float32", "bfloat16"):
            queue = ctx.Queue()
            proc = ctx.Process(target=measure_main, args=(family, path, dtype, prompts, queue))
            proc.start()
            rows += queue.get(timeout=1800)
            proc.join()
    (out / "routing_replay.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{'family':<11}{'dtype':<10}{'replay':<8}{'logprob_gap':>13}{'mismatch_kl':>13}{'routing differs':>17}")
    for r in rows:
        differs = f"{r['routing_differs']:.4f}" if "routing_differs" in r else ""
        print(f"{r['family']:<11}{r['dtype']:<10}{('yes' if r['replay'] else 'no'):<8}{r['logprob_gap']:>13.3g}"
              f"{r['mismatch_kl']:>13.3g}{differs:>17}")
    print(f"\nwrote {out / 'routing_replay.json'}")


if __name__ == "__main__":
    main()
