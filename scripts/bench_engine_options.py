"""What each per-request option of our rollouts costs vLLM's generation on CPU: a sampling seed per
request, the sampled tokens' logprobs, detokenized text. One engine in this process (as
``resources.vllm_in_process`` runs it), one thread (as each of w1's two engines has), w1's model and
shape (128 prompts x 64 tokens, no EOS); each case after a warm-up, medians of ``--repeats``, the
cases alternated over two rounds so both see the same machine load.

    .venv/bin/python scripts/bench_engine_options.py [--repeats 3]

The first case is what ``GenerationEngine`` asked for before 510e80d; the second what it asks for
since, its text decoded afterwards in one batch (``models.detokenize.response_texts``, timed too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")

CASES = {  # name: (seed per request, logprobs of the sampled tokens, detokenize)
    "before 510e80d: seeds, logprobs, text": (True, True, True),
    "ours: seeds, logprobs, no detokenizing": (True, True, False),
    "no logprobs": (True, False, True),
    "no seeds": (False, True, True),
    "none of the three": (False, False, False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    import torch
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from scripts.bench_workloads import WORKLOADS, build_model, cache_root

    torch.set_num_threads(1)
    path = str(build_model(WORKLOADS["w1"], cache_root()))
    llm = LLM(model=path, dtype="float32", seed=0, max_model_len=256, enforce_eager=True,
              logprobs_mode="processed_logprobs", distributed_executor_backend="uni", kv_cache_memory_bytes=2**28)
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [{"prompt_token_ids": tokenizer(f"review number {i} was")["input_ids"]} for i in range(args.prompts)]

    from rlhf_dist.models.detokenize import fast_tokenizer, response_texts

    raw, decode_s = fast_tokenizer(tokenizer), []

    def generate(seeded: bool, logprobs: bool, detokenize: bool) -> float:
        params = [SamplingParams(temperature=1.0, max_tokens=args.tokens, ignore_eos=True,
                                 seed=1000 + i if seeded else None, logprobs=0 if logprobs else None,
                                 detokenize=detokenize) for i in range(args.prompts)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        if not detokenize and seeded and logprobs:  # ours: the text, decoded after (included in the time)
            decoded = time.perf_counter()
            response_texts(raw, [p["prompt_token_ids"] for p in prompts],
                           [list(o.outputs[0].token_ids) for o in outputs])
            decode_s.append(time.perf_counter() - decoded)
        return time.perf_counter() - start

    times: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(2):
        for name, case in CASES.items():
            generate(*case)  # warm-up
            times[name] += [generate(*case) for _ in range(args.repeats)]
    before = statistics.median(times[next(iter(CASES))])
    print(f"| case ({args.prompts} prompts x {args.tokens} tokens, 1 thread) | median s | vs before |")
    print("|---|---|---|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts):.3f} | {statistics.median(ts) / before:.2f}x |")
    print(f"\nours: the {args.prompts} texts decoded after generating, median {statistics.median(decode_s) * 1e3:.1f} ms "
          f"(in its time above)")


if __name__ == "__main__":
    main()
