"""The device the GPU checks run on, and the gaps they measured, printed after the run."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

DEVICE_ENV = "RLHF_DIST_CHECK_DEVICE"


def check_device() -> str | None:
    """``$RLHF_DIST_CHECK_DEVICE`` (cpu or cuda), else cuda when torch sees one, else None (skip)."""
    forced = os.environ.get(DEVICE_ENV, "")
    if forced not in ("", "cpu", "cuda"):
        raise pytest.UsageError(f"{DEVICE_ENV}={forced!r}: use cpu or cuda")
    return forced or ("cuda" if torch.cuda.is_available() else None)


def off_device(device: str) -> contextlib.AbstractContextManager:
    """A default device other than ``device``, so a tensor made without ``device=`` lands apart from
    the inputs and the pass fails as a GPU pass would: on CUDA the CPU already is the default; on
    the CPU, the meta device stands in (as in tests/unit/models/test_device_paths.py)."""
    return contextlib.nullcontext() if device == "cuda" else torch.device("meta")


_GAPS: list[tuple[str, float, float]] = []


@pytest.fixture
def record_gap(request):
    """``record_gap(gap, tolerance, what="")``: kept for the table printed after the run (the pass/fail
    line alone does not show how close a GPU's kernels came to the tolerance)."""
    return lambda gap, tolerance, what="": _GAPS.append((f"{request.node.name} {what}".rstrip(), gap, tolerance))


def pytest_terminal_summary(terminalreporter):
    if _GAPS:
        terminalreporter.section("largest |gap| of each comparison (tolerance)")
        for name, gap, tolerance in _GAPS:
            terminalreporter.write_line(f"{name:<80} {gap:9.2e}  ({tolerance:.3g})")
