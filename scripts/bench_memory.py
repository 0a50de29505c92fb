"""Memory and speed of a PPO update, padded vs packed vs checkpointed vs chunked, and weight-sync
time per tensor vs bucketed vs the raw one-buffer broadcast, on a 22 M-parameter Llama with a
32,768-token vocabulary (tied embeddings, built in code, random init).

    .venv/bin/python scripts/bench_memory.py [--out bench_out/memory] [--repeats 3]

Update: one real ``PolicyTrainer`` rank (DeepSpeed ZeRO-2, world size 1, float32) per
configuration, each in a fresh process so that its peak RSS (``ru_maxrss``) is its own. The
batch: 16 responses of 3 to 600 tokens (prompts of 16), micro-batches of 8 rows, one optimizer
step of the PPO actor loss (token_mean, clip 0.2, entropy bonus 0.01, so entropies are
computed). Reported per configuration: the peak RSS of the rank, its growth over the RSS before
the update (the update's own memory: activations, logits, gradients, optimizer state), and real
tokens (prompt + response) per second of the update, the median of ``--repeats`` updates.

Weight sync: trainer rank 0's real ``GlooWeightSender`` to one receiver process over gloo, the
receiver running ``GlooWeightTransferEngine.receive_weights`` (ours) with a model whose
``load_weights`` copies each tensor into a preallocated parameter, as vLLM's default loader
does; no vLLM engine is started. Per tensor (bucket 0) vs buckets of 256 MiB, against the limit:
one gloo broadcast of a flat buffer of the same bytes. Medians of ``--repeats`` syncs.

Writes ``<out>/memory.json`` and prints a table. Wrap it in ``flock /tmp/rlhf_heavy.lock`` on a
shared machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import socket
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LENGTHS = [3, 600, 9, 14, 520, 22, 31, 5, 47, 64, 96, 128, 160, 256, 7, 384]
PROMPT = 16
MICRO = 8
CONFIGS = {  # name -> (packing, logprob_chunk_tokens, gradient_checkpointing)
    "padded": (False, 0, False),
    "packed": (True, 0, False),
    "packed+ckpt": (True, 0, True),
    "packed+chunked": (True, 1024, False),  # trainer.logprob_chunk_tokens, its default
    "packed+chunked+ckpt": (True, 1024, True),
    "packed+chunked256+ckpt": (True, 256, True),
}
BUCKET_MB = 256


def build_model(path: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if (path / "config.json").exists():
        return path
    config = LlamaConfig(
        vocab_size=32768, hidden_size=384, intermediate_size=1024, num_hidden_layers=6, num_attention_heads=6,
        num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def batch(vocab: int):
    import torch

    from rlhf_dist.core.experience import collate

    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, vocab, (PROMPT,), generator=gen).tolist() for _ in LENGTHS]
    responses = [torch.randint(1, vocab, (n,), generator=gen).tolist() for n in LENGTHS]
    exp = collate(prompts, responses, pad_id=0)
    mask = exp.response_mask
    return exp.with_fields(
        old_logprobs=(-10.4 + 0.1 * torch.randn(mask.shape, generator=gen)) * mask,
        advantages=torch.randn(len(LENGTHS), 1, generator=gen).expand_as(mask) * mask,
    )


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def update_main(name: str, model_path: str, repeats: int, port: int, queue) -> None:
    import torch

    from rlhf_dist.config import AlgoConfig, ModelConfig, TrainerConfig
    from rlhf_dist.config.plan import RunPlan
    from rlhf_dist.roles.spec import RankSpec
    from rlhf_dist.roles.trainer import PolicyTrainer

    torch.set_num_threads(2)
    packing, chunk, ckpt = CONFIGS[name]
    cfg = TrainerConfig(world_size=1, zero_stage=2, micro_batch_size=MICRO, lr=1e-6, packing=packing,
                        logprob_chunk_tokens=chunk, gradient_checkpointing=ckpt)
    plan = RunPlan(per_rank_minibatch=len(LENGTHS), grad_accum_steps=len(LENGTHS) // MICRO, optimizer_steps=100,
                   rollout_batch=len(LENGTHS), minibatches_per_epoch=1)
    spec = RankSpec(rank=0, world_size=1, device="cpu", seed=0, timeout_s=600.0, model_path=model_path)
    trainer = PolicyTrainer(spec=spec, cfg=cfg, model_cfg=ModelConfig(), plan=plan, temperature=1.0,
                            max_new_tokens=max(LENGTHS))
    params = trainer.setup("127.0.0.1", port)
    exp = batch(trainer.engine.module.config.vocab_size)
    algo = AlgoConfig(loss_agg="token_mean", entropy_coef=0.01, kl_coef=0.0, ppo_epochs=1)
    before = rss_mb()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.train(exp, 1, algo, 0.0)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tokens = int(exp.attention_mask.sum())
    queue.put({"config": name, "params": params, "tokens": tokens, "padded_tokens": exp.input_ids.numel(),
               "update_s": statistics.median(times), "tokens_per_s": tokens / statistics.median(times),
               "rss_before_mb": before, "peak_rss_mb": peak, "update_growth_mb": peak - before})


class _CopyingModel:
    """Loads like vLLM's default weight loader: each tensor copied into its preallocated parameter."""

    def __init__(self, specs) -> None:
        import torch

        self.params = {s.name: torch.empty(s.shape, dtype=getattr(torch, s.dtype)) for s in specs}

    def load_weights(self, weights) -> None:
        for name, tensor in weights:
            self.params[name].copy_(tensor)


def sync_main(rank: int, model_path: str, repeats: int, port: int, queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM
    from vllm.distributed.utils import stateless_init_torch_distributed_process_group

    from rlhf_dist.weight_sync.gloo import TRANSPORT, GlooReceiver, GlooUpdateInfo, GlooWeightSender
    from rlhf_dist.weight_sync.transport import ParamSpec

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_path)
    named = list(model.named_parameters())
    specs = [ParamSpec(n, str(p.dtype).removeprefix("torch."), tuple(p.shape)) for n, p in named]
    total = sum(s.nbytes for s in specs)
    results = {}
    for offset, mode in enumerate(("per_tensor", "bucketed", "raw_one_buffer")):
        bucket = BUCKET_MB * 2**20 if mode == "bucketed" else 0
        times = []
        if mode == "raw_one_buffer":
            group = stateless_init_torch_distributed_process_group("127.0.0.1", port + offset, rank, 2, backend="gloo")
            buffer = torch.ones(total, dtype=torch.uint8)
            for _ in range(repeats):
                start = time.perf_counter()
                group.broadcast(buffer, 0).wait()
                times.append(time.perf_counter() - start)
        elif rank == 0:
            sender = GlooWeightSender("127.0.0.1", port + offset, 2, 600.0, specs, bucket)
            for _ in range(repeats):
                start = time.perf_counter()
                sender.send((n, p.data) for n, p in named)
                times.append(time.perf_counter() - start)
        else:
            receiver = GlooReceiver.__new__(GlooReceiver)  # the engine's receiving end, without a vLLM model
            receiver.model, receiver.device, receiver._buckets = _CopyingModel(specs), torch.device("cpu"), {}
            receiver._group = stateless_init_torch_distributed_process_group(
                "127.0.0.1", port + offset, 1, 2, backend="gloo")
            info = GlooUpdateInfo(**TRANSPORT.update_info(specs, bucket))
            for _ in range(repeats):
                start = time.perf_counter()
                receiver.receive_weights(info)
                times.append(time.perf_counter() - start)
            got = receiver.model.params
            assert all(torch.equal(got[n], p.data) for n, p in named), f"{mode}: the received weights differ"
        results[mode] = statistics.median(times)
    if rank == 1:  # the receiver's clock: the sync is done when the last tensor is loaded
        queue.put({"bytes": total, "tensors": len(specs), "bucket_mb": BUCKET_MB, **{f"{k}_s": v for k, v in results.items()}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_out/memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="update,sync", help="update, sync or both (the other's figures are kept "
                        "from an earlier memory.json in --out)")
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_path = str(build_model(out / "model"))
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()

    earlier = json.loads((out / "memory.json").read_text()) if (out / "memory.json").exists() else {}
    updates = [] if "update" in parts else earlier["updates"]
    for name in CONFIGS if "update" in parts else []:
        proc = ctx.Process(target=update_main, args=(name, model_path, args.repeats, free_port(), queue))
        proc.start()
        updates.append(queue.get(timeout=3600))
        proc.join()
        print(f"  {name}: {updates[-1]['update_s']:.2f} s, peak RSS {updates[-1]['peak_rss_mb']:.0f} MB", flush=True)
    if "sync" in parts:
        port = free_port()
        procs = [ctx.Process(target=sync_main, args=(r, model_path, args.repeats, port, queue)) for r in (0, 1)]
        for p in procs:
            p.start()
        sync = queue.get(timeout=3600)
        for p in procs:
            p.join()
    else:
        sync = earlier["weight_sync"]

    padded = updates[0]
    for u in updates:
        u["tokens_per_s_vs_padded"] = u["tokens_per_s"] / padded["tokens_per_s"]
        u["update_growth_vs_padded"] = u["update_growth_mb"] / padded["update_growth_mb"]
        u["peak_rss_vs_padded"] = u["peak_rss_mb"] / padded["peak_rss_mb"]
    sync["per_tensor_vs_raw"] = sync["per_tensor_s"] / sync["raw_one_buffer_s"]
    sync["bucketed_vs_raw"] = sync["bucketed_s"] / sync["raw_one_buffer_s"]
    result = {"model": {"params": padded["params"], "vocab": 32768, "hidden": 384, "layers": 6},
              "batch": {"lengths": LENGTHS, "prompt": PROMPT, "micro_batch_size": MICRO,
                        "real_tokens": padded["tokens"], "padded_tokens": padded["padded_tokens"]},
              "updates": updates, "weight_sync": sync,
              "goals": {"packed_tokens_per_s_vs_padded": ">= 1.5", "memory_all_vs_padded": "<= 0.4",
                        "bucketed_vs_raw": "<= 1.5"}}
    (out / "memory.json").write_text(json.dumps(result, indent=2))

    print(f"\nPPO update, {padded['params'] / 1e6:.1f} M params, vocab 32768, {len(LENGTHS)} responses of "
          f"{min(LENGTHS)}-{max(LENGTHS)} tokens ({padded['tokens']} real tokens, {padded['padded_tokens']} padded)")
    print(f"{'config':<22}{'update s':>10}{'tokens/s':>10}{'x padded':>10}{'peak RSS MB':>13}{'growth MB':>11}"
          f"{'x padded':>10}")
    for u in updates:
        print(f"{u['config']:<22}{u['update_s']:>10.2f}{u['tokens_per_s']:>10.0f}{u['tokens_per_s_vs_padded']:>10.2f}"
              f"{u['peak_rss_mb']:>13.0f}{u['update_growth_mb']:>11.0f}{u['update_growth_vs_padded']:>10.2f}")
    print("goals: packed >= 1.5 x padded tokens/s; packed+chunked(+256)+ckpt memory <= 0.4 x padded")
    print(f"\nweight sync, {sync['tensors']} tensors, {sync['bytes'] / 2**20:.0f} MiB, gloo, one receiver")
    for mode in ("per_tensor", "bucketed", "raw_one_buffer"):
        ratio = sync[f"{mode}_s"] / sync["raw_one_buffer_s"]
        print(f"{mode:<22}{sync[f'{mode}_s']:>10.3f} s{ratio:>8.2f} x raw")
    print("goal: bucketed <= 1.5 x raw")
    print(f"\nwrote {out / 'memory.json'}")


if __name__ == "__main__":
    main()
