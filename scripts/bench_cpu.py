"""Where a run's CPU time goes: each process's CPU seconds (user + system, from /proc) per measured
step, by role, beside the CPU the machine had in that time. Linux only (elsewhere: no figures).

A run's processes are read twice: when the warm-up's last step is logged, and when the last step
is; per-step CPU is the difference over the steps between. Two reads, not sampling: reading costs
nothing while the run steps. Used by ``bench_throughput.py``; a step whose CPU share is near 100 %
has no idle core to fill by overlapping its phases.
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Self

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
RAY_AGENTS = ("DashboardAgent", "RuntimeEnvAgent")  # Ray's per-node agents, titled like actors


def role_of(cmdline: str) -> str:
    """A process's role: the Ray actor's class (``ray::GenerationEngine.generate_stream`` ->
    ``GenerationEngine``), ``controller`` (``rlhf_dist.train``), ``ray`` (Ray's own processes) or
    ``other`` (not the run's: what else shares the machine)."""
    if actor := re.match(r"ray::(\w+)", cmdline):  # an idle worker is ray::IDLE
        name = actor.group(1)
        return name if name[0].isupper() and not name.isupper() and name not in RAY_AGENTS else "ray"
    if "rlhf_dist.train" in cmdline:
        return "controller"
    return "ray" if "/ray/" in cmdline or "raylet" in cmdline or "gcs_server" in cmdline else "other"


def snapshot() -> dict[int, tuple[str, float]]:
    """Every process's role and CPU seconds so far."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(pid)] = role_of(cmdline), (int(fields[11]) + int(fields[12])) / TICK
    return out


class RunCpu:
    """Watches a run's metrics.jsonl from a thread; ``per_step()``: CPU seconds per measured step by
    role, and ``cpu/available`` (cores x wall time), after the run."""

    def __init__(self, metrics: Path, warmup: int, poll_s: float = 0.05) -> None:
        self.metrics, self.warmup, self.poll_s = metrics, warmup, poll_s
        self.first: tuple[int, float, dict] | None = None  # (rows logged, time, snapshot)
        self.last: tuple[int, float, dict] | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Self:
        if Path("/proc/self/stat").is_file():
            self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        if self.thread.is_alive():
            self.thread.join()

    def _watch(self) -> None:
        seen = 0
        while not self.done.is_set():
            rows = self._rows()
            if rows > seen:
                seen, now, snap = rows, time.time(), snapshot()
                if self.first is None and rows >= max(self.warmup, 1):  # the warm-up's steps are logged
                    self.first = rows, now, snap
                elif self.first is not None:
                    self.last = rows, now, snap
            time.sleep(self.poll_s)

    def _rows(self) -> int:
        try:
            return self.metrics.read_bytes().count(b"\n")
        except OSError:
            return 0

    def per_step(self) -> dict[str, float] | None:
        if self.first is None or self.last is None:
            return None
        (rows0, t0, a), (rows1, t1, b) = self.first, self.last
        steps, out = rows1 - rows0, {}
        for pid, (role, cpu) in b.items():
            delta = cpu - a[pid][1] if pid in a else cpu  # started in the window: all of its CPU
            if delta > 0:
                out[role] = out.get(role, 0.0) + delta / steps
        out = dict(sorted(out.items(), key=lambda kv: -kv[1]))
        out["cpu/used"] = sum(out.values())
        out["cpu/available"] = (os.cpu_count() or 1) * (t1 - t0) / steps
        return out


def table(cpu: dict[str, float]) -> str:
    """A markdown table of ``RunCpu.per_step``."""
    used, available = cpu["cpu/used"], cpu["cpu/available"]
    rows = [f"| {role} | {s:.3f} | {100 * s / available:.1f} % |" for role, s in cpu.items() if "/" not in role]
    return "\n".join([
        "| process | CPU s per step | share of the cores |", "|---|---|---|", *rows,
        f"| **all** | {used:.3f} of {available:.3f} | **{100 * used / available:.1f} %** |",
    ])
