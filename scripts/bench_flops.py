"""The machine's limit and each phase's work, for the benchmarks: the GEMM peak per dtype on a given
number of threads, and a decoder's model FLOPs per phase of a step.

    .venv/bin/python scripts/bench_flops.py [--threads 1,2] [--dtypes float32,bfloat16] [--model DIR]

prints the peaks, and with ``--model`` the model's training pass (forward + backward of a batch of
16 x 64 tokens, loaded in each dtype) against them: seconds, model GFLOP/s and the share of the peak.

Model FLOPs (the MFU convention: what the model needs, not what a kernel does; recomputation by
gradient checkpointing and padding are not counted): a forward pass over a sequence of S tokens costs
``2 * N * S`` in its matmuls (N: the weights of every linear layer, the output head included) plus
``2 * S * (S + 1) * A`` in causal attention (QK^T and AV, 2 FLOPs per multiply-add, the query at position p
attends to p keys; A = layers x heads x head_dim). A backward pass costs twice its forward. Per phase:

- generation: a forward pass over prompt + response - 1 tokens (the prefill and one token per decode
  step: the last sampled token is never fed back);
- reference logprobs and old logprobs: a forward pass over prompt + response;
- the policy update: forward + backward, 3x the forward pass, per PPO epoch.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a decoder: its linear weights and its attention width."""

    linear_params: int  # N: weights of every linear layer (q, k, v, o, the MLP, the output head)
    attention_width: int  # A: layers x query heads x head_dim

    def forward(self, lengths: Iterable[int]) -> float:
        """Model FLOPs of one forward pass over sequences of these lengths."""
        return float(sum(2 * self.linear_params * s + 2 * s * (s + 1) * self.attention_width for s in lengths))

    def phases(self, prompt_lens: list[int], response_lens: list[int], ppo_epochs: int = 1) -> dict[str, float]:
        """Model FLOPs of each phase of a step over these samples (see the module docstring)."""
        full = [p + r for p, r in zip(prompt_lens, response_lens)]
        generated = [p + r - 1 for p, r in zip(prompt_lens, response_lens) if r > 0]
        forward = self.forward(full)
        return {"generate": self.forward(generated), "reference": forward, "old_logprobs": forward,
                "update": 3 * forward * ppo_epochs}


def shape_of(model) -> Shape:
    """The Shape of a loaded transformers decoder (dense: every ``nn.Linear`` counts)."""
    from torch import nn

    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    return Shape(linear, cfg.num_hidden_layers * cfg.num_attention_heads * head_dim)


def gemm_peak(dtype: str, threads: int, sizes: tuple[int, ...] = (1024,), seconds: float = 1.0) -> float:
    """The best FLOP/s of square products of these sizes in ``dtype`` on ``threads`` threads, in the
    layout of a linear layer (``F.linear``: x @ W^T, torch's CPU kernels), each timed for about
    ``seconds`` (at least one product) after a warm-up product. The layout matters: on an AVX2 CPU a
    bf16 ``a @ b`` of two row-major 1024 x 1024 matrices ran at 1 GFLOP/s, ``F.linear`` at 10."""
    import torch
    import torch.nn.functional as F

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        best = 0.0
        for n in sizes:  # 1024 already gives float32's best here (256-2048 measured within 5 %)
            x, w = (torch.randn(n, n).to(getattr(torch, dtype)) for _ in range(2))
            F.linear(x, w)
            reps, started = 0, time.perf_counter()
            while not reps or time.perf_counter() - started < seconds:
                F.linear(x, w)
                reps += 1
            best = max(best, 2 * n**3 * reps / (time.perf_counter() - started))
        return best
    finally:
        torch.set_num_threads(before)


def time_training_pass(model_dir: str, dtype: str, threads: int, rows: int = 16, length: int = 64,
                       reps: int = 5) -> tuple[float, float]:
    """(seconds, model FLOPs) of one forward + backward pass of ``model_dir`` loaded in ``dtype`` over a
    random batch of ``rows`` x ``length`` tokens, the loss taken in float32 as the trainer takes it;
    the median of ``reps`` after two warm-up passes."""
    import statistics

    import torch
    from transformers import AutoModelForCausalLM

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        ids = torch.randint(0, model.config.vocab_size, (rows, length), generator=torch.Generator().manual_seed(0))
        times = []
        for i in range(reps + 2):
            started = time.perf_counter()
            model(ids).logits.float().logsumexp(-1).mean().backward()
            times.append(time.perf_counter() - started)
        return statistics.median(times[2:]), 3 * shape_of(model).forward([length] * rows)
    finally:
        torch.set_num_threads(before)


def cpu_summary() -> str:
    """The CPU's bfloat16 capability as torch sees it (what decides whether bf16 matmuls are native)."""
    import torch

    from rlhf_dist.cluster.hardware import cpu_bf16

    return f"{torch.backends.cpu.get_cpu_capability()}, {cpu_bf16().describe()}"


def mfu_table(limits: dict, peak: dict) -> str:
    """Each phase alone (``bench_throughput``'s limits): its model FLOPs, the rate it achieved and its
    share of the GEMM peak."""
    head = f"| phase alone | s | model GFLOP | GFLOP/s | MFU (of {peak['flops_per_s'] / 1e9:.0f} GFLOP/s) |"
    lines = [head, "|---|---|---|---|---|"]
    for name, key, time_key in (("generation", "generate", "generate"), ("reference logprobs", "reference", "reference"),
                                ("old logprobs", "values", "values"), ("policy update", "update", "train"),
                                ("training (reference + old + update)", "train_alone", "train_alone")):
        seconds, flops = limits[time_key], limits["flops"][key]
        if not flops:
            continue
        rate = flops / seconds if seconds else None
        lines.append(f"| {name} | {seconds:.2f} | {flops / 1e9:.1f} | {_fmt(rate and rate / 1e9, '.1f')} "
                     f"| {_fmt(rate and rate / peak['flops_per_s'], '.1%')} |")
    return (f"GEMM peak: {peak['dtype']} on {peak['threads']} threads, {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
            f"(CPU: {peak['cpu']})\n\n" + "\n".join(lines))


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per matmul size")
    parser.add_argument("--model", default="", help="a model directory: time its training pass in each dtype")
    args = parser.parse_args()
    print(f"CPU: {cpu_summary()}")
    for threads in (int(t) for t in args.threads.split(",")):
        for dtype in args.dtypes.split(","):
            peak = gemm_peak(dtype, threads, seconds=args.seconds)
            line = f"{dtype:>9} on {threads} thread(s): GEMM peak {peak / 1e9:8.1f} GFLOP/s"
            if args.model:
                seconds, flops = time_training_pass(args.model, dtype, threads)
                line += (f"; training pass (16 x 64 tokens) {seconds:.3f} s, {flops / seconds / 1e9:.1f} GFLOP/s, "
                         f"{flops / seconds / peak:.1%} of the peak")
            print(line, flush=True)


if __name__ == "__main__":
    main()
