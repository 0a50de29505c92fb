"""The CPU's bfloat16 capability, read from /proc/cpuinfo, and the start-up warning it decides."""

from __future__ import annotations

from rlhf_dist.cluster.hardware import CpuBf16, bf16_warning, cpu_bf16, cpu_flags

AVX2 = "processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx f16c avx2 fma\n\nprocessor\t: 1\nflags\t: fpu\n"
SAPPHIRE = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_flags_come_from_the_first_processor_on_x86_and_arm():
    assert cpu_flags(AVX2) == {"fpu", "sse2", "avx", "f16c", "avx2", "fma"}
    assert "amx_bf16" in cpu_flags(SAPPHIRE) and "bf16" in cpu_flags(GRAVITON)
    assert cpu_flags("processor : 0\n") == frozenset()


def test_native_bf16_needs_amx_avx512_bf16_or_arm_bf16():
    assert not CpuBf16(cpu_flags(AVX2), True).native
    assert CpuBf16(cpu_flags(SAPPHIRE), True).native and CpuBf16(cpu_flags(GRAVITON), True).native
    assert CpuBf16(cpu_flags(AVX2), True).describe().startswith("no bfloat16 instructions (avx2;")
    assert CpuBf16(cpu_flags(SAPPHIRE), True).describe() == "native bfloat16 (amx_bf16, avx512_bf16)"


def test_the_warning_names_the_cpu_only_for_bf16_on_a_cpu_that_emulates_it():
    avx2 = CpuBf16(cpu_flags(AVX2), True)
    line = bf16_warning("cpu", "bfloat16", avx2)
    assert line.startswith("rlhf_dist: warning: model.dtype=bfloat16 on a CPU with no bfloat16 instructions (avx2")
    assert "model.dtype=float32" in line and "\n" not in line
    assert bf16_warning("cpu", "float32", avx2) == ""
    assert bf16_warning("cuda", "bfloat16", avx2) == ""  # the GPU computes, not the CPU
    assert bf16_warning("cpu", "bfloat16", CpuBf16(cpu_flags(SAPPHIRE), True)) == ""
    assert bf16_warning("cpu", "bfloat16", CpuBf16(frozenset(), False)) == ""  # unknown: no claim


def test_an_unreadable_cpuinfo_is_unknown_not_emulated(tmp_path):
    assert cpu_bf16(str(tmp_path / "missing")) == CpuBf16(frozenset(), False)
    (tmp_path / "cpuinfo").write_text(SAPPHIRE)
    assert cpu_bf16(str(tmp_path / "cpuinfo")).native
