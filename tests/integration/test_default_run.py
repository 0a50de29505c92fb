"""README command 1's job, as is: the default config must visibly raise the reward."""

from __future__ import annotations

import json

import pytest

from tests.integration.conftest import DEFAULT_STEPS

pytestmark = pytest.mark.slow

# The README promises: mean reward of the last fifth of the steps above the first fifth by > 0.3.
README_MARGIN = 0.3


def test_default_run_raises_reward(default_run):
    summary = json.loads((default_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == DEFAULT_STEPS
    assert summary["reward/improvement"] > README_MARGIN, summary
    assert summary["reward/last_fifth_mean"] - summary["reward/first_fifth_mean"] == pytest.approx(
        summary["reward/improvement"]
    )
