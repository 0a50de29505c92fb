"""How far a bfloat16 trainer's minibatch gradient moves with the way the minibatch is cut into
micro-batches, with the micro-batches' gradients added up in bf16 (DeepSpeed's default) or in fp32
(``data_types.grad_accum_dtype``, what ``roles.zero_rank.deepspeed_config`` sets in bf16 under ZeRO 1-3).

    .venv/bin/python scripts/bench_bf16_accumulation.py [--stages 0,1,2,3]

Two real DeepSpeed ranks (gloo, one process each, as ``tests/integration/test_micro_batching.py``)
accumulate the PPO actor loss of one minibatch of 16 rows (responses of 1 to 40 tokens) of the tiny
random Llama in bf16, cut into micro-batches of 1, 2 and 8 rows. Printed per stage and accumulation
dtype: the relative L2 distance of each cut's full gradient from the gradient of the same loss in
one float32 forward pass over the whole minibatch (the exact answer), and between the cuts.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from tests.integration import test_micro_batching as M

MICROS = (1, 2, 8)


def _rank_main(rank: int, port: int, model_path: str, exp, out_path: str, stages: list[int]) -> None:
    from deepspeed.utils import safe_get_full_grad

    from rlhf_dist.config import AlgoConfig, ModelConfig, TrainerConfig
    from rlhf_dist.config.plan import RunPlan
    from rlhf_dist.roles import zero_rank
    from rlhf_dist.roles.spec import RankSpec
    from rlhf_dist.roles.trainer import PolicyTrainer

    torch.set_num_threads(1)
    shard, results = exp.split(M.WORLD)[rank], {}
    made = zero_rank.deepspeed_config
    for stage in stages:
        for accum in ("bf16", "fp32"):
            if stage == 0 and accum == "fp32":
                continue  # DeepSpeed refuses bf16 parameters with fp32 accumulation outside ZeRO

            def config(*args, accum=accum):
                out = made(*args)
                out.pop("data_types", None)
                return {**out, "data_types": {"grad_accum_dtype": accum}} if accum == "fp32" else out

            zero_rank.deepspeed_config = config
            spec = RankSpec(rank=rank, world_size=M.WORLD, device="cpu", seed=0, timeout_s=60.0, model_path=model_path)
            cfg = TrainerConfig(world_size=M.WORLD, zero_stage=stage, micro_batch_size=1, lr=1e-30, grad_clip=0.0)
            plan = RunPlan(per_rank_minibatch=M.ROWS // M.WORLD, grad_accum_steps=M.ROWS // M.WORLD,
                           optimizer_steps=100, rollout_batch=M.ROWS, minibatches_per_epoch=1)
            trainer = PolicyTrainer(spec=spec, cfg=cfg, model_cfg=ModelConfig(dtype="bfloat16"), plan=plan,
                                    temperature=M.TEMPERATURE, max_new_tokens=40)
            trainer.setup("127.0.0.1", port + 10 * stage + (accum == "fp32"))
            trainer.engine.train()
            loss_fn = trainer._actor_loss(AlgoConfig(loss_agg="token_mean", kl_coef=0.0), 0.0)
            for micro in MICROS:
                trainer.cfg = dataclasses.replace(cfg, micro_batch_size=micro)
                trainer.accumulate(shard, loss_fn)
                results[(stage, accum, micro)] = torch.cat(
                    [safe_get_full_grad(p).float().flatten() for _, p in trainer.engine.module.named_parameters()])
                trainer.engine.step()
    torch.save(results, f"{out_path}.{rank}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="0,1,2,3")
    args = parser.parse_args()
    stages = [int(s) for s in args.stages.split(",")]
    from rlhf_dist.models.modeling import load_causal_lm
    from rlhf_dist.models.tiny import build_random_lm, build_task_policy

    with tempfile.TemporaryDirectory() as tmp:
        model_path = str(build_random_lm(Path(tmp) / "llama-tied", "llama-tied", build_task_policy("reviews")))
        model = load_causal_lm(model_path, "float32")
        exp = M._minibatch(model.config.vocab_size)
        expected, _ = M._expected(model_path, exp, "token_mean")
        exact = torch.cat([expected[n].flatten() for n, _ in model.named_parameters()])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        ctx, out = multiprocessing.get_context("spawn"), str(Path(tmp) / "grads.pt")
        procs = [ctx.Process(target=_rank_main, args=(r, port, model_path, exp, out, stages)) for r in range(M.WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=900)
            if p.exitcode != 0:
                raise SystemExit(f"a DeepSpeed rank failed (exit {p.exitcode})")
        results = torch.load(f"{out}.0")
    print(f"\n{'ZeRO':>4} {'accumulate':>10} " + " ".join(f"{'vs exact, micro=' + str(m):>18}" for m in MICROS)
          + f" {'micro 1 vs 8':>13}")
    for stage in stages:
        for accum in ("bf16", "fp32"):
            if (stage, accum, 1) not in results:
                continue
            rel = [float((results[(stage, accum, m)] - exact).norm() / exact.norm()) for m in MICROS]
            between = float((results[(stage, accum, 1)] - results[(stage, accum, 8)]).norm() / exact.norm())
            print(f"{stage:>4} {accum:>10} " + " ".join(f"{r:>18.2e}" for r in rel) + f" {between:>13.2e}")


if __name__ == "__main__":
    main()
