"""What this machine's CPU computes natively, read from ``/proc/cpuinfo`` (no torch): whether its
bfloat16 matmuls have instructions (x86: AMX or AVX-512 BF16; Arm: the BF16 extension) or are
emulated. Measured on a 2-core AVX2 machine (docs/results.md, bfloat16 on CPU): an emulated bf16
matmul ran ~9x below float32's, a training pass of the tiny policy 12x slower; so a CPU run asked for
bfloat16 on such a CPU says so once at start."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BF16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")  # x86 AMX, x86 AVX-512 BF16, Arm FEAT_BF16


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed (x86's ``flags``, Arm's ``Features``)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


@dataclass(frozen=True)
class CpuBf16:
    """The CPU's bfloat16 instructions; ``known`` is False where no flags could be read."""

    flags: frozenset[str]
    known: bool

    @property
    def native(self) -> bool:
        return any(f in self.flags for f in BF16_FLAGS)

    def describe(self) -> str:
        if not self.known:
            return "bfloat16 support unknown (no CPU flags readable)"
        found = [f for f in BF16_FLAGS if f in self.flags]
        if found:
            return f"native bfloat16 ({', '.join(found)})"
        vector = [f for f in ("avx512f", "avx2", "asimd") if f in self.flags][:1]
        return f"no bfloat16 instructions ({', '.join(vector) or 'no wide vectors'}; bfloat16 matmuls are emulated)"


def cpu_bf16(path: str = "/proc/cpuinfo") -> CpuBf16:
    """This machine's :class:`CpuBf16`."""
    try:
        return CpuBf16(cpu_flags(Path(path).read_text()), True)
    except OSError:
        return CpuBf16(frozenset(), False)


def bf16_warning(device: str, dtype: str, cpu: CpuBf16) -> str:
    """The one line a run prints at start when it computes in bfloat16 on a CPU that emulates it; "" otherwise."""
    if device != "cpu" or dtype != "bfloat16" or cpu.native or not cpu.known:
        return ""
    return (f"rlhf_dist: warning: model.dtype=bfloat16 on a CPU with {cpu.describe()}: every matmul runs "
            "far below float32's speed here (a training pass of the tiny policy measured 12x slower); "
            "model.dtype=float32 is the fast choice on this CPU (docs/results.md, bfloat16 on CPU)")
