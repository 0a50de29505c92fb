"""Time to a ready vLLM engine on the embedded model: vLLM's default process layout (an engine-core
process and a worker process besides the caller) against ``resources.vllm_in_process`` (both in
the caller's process), alternated so both see the same machine load.

    .venv/bin/python scripts/bench_engine_start.py [--repeats 2]

Each start is a fresh Python process, as a Ray actor is; the figure includes importing vLLM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

CHILD = """
import sys
from vllm import LLM
from rlhf_dist.models.modeling import resolve_model_path

if __name__ == "__main__":  # vLLM spawns its engine-core process
    in_process = sys.argv[1] == "1"
    LLM(model=resolve_model_path("tiny", ""), dtype="float32", kv_cache_memory_bytes=2**28, max_model_len=256,
        enforce_eager=True, distributed_executor_backend="uni" if in_process else None)
"""


def start_seconds(in_process: bool) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    if in_process:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # what placement.actor_env sets
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", CHILD, "1" if in_process else "0"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[str, list[float]] = {"separate processes": [], "in process": []}
    for _ in range(args.repeats):
        times["separate processes"].append(start_seconds(in_process=False))
        times["in process"].append(start_seconds(in_process=True))
    for name, values in times.items():
        print(f"{name:>20}: median {statistics.median(values):5.1f} s  ({', '.join(f'{v:.1f}' for v in values)})")
    ratio = statistics.median(times["separate processes"]) / statistics.median(times["in process"])
    print(f"{'speed-up':>20}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
