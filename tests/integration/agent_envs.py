"""Environments of the multi-turn integration test (imported by the engine actors)."""

from __future__ import annotations

import time

from rlhf_dist.tasks.calculator import CalculatorEnv

HANG_S = 600.0  # far past the test's timeouts.env_step_s: only the timeout can end the call


class HangingCalculator(CalculatorEnv):
    """The calculator, whose first step hangs for problems whose first operand is a multiple of 4:
    a tool that never answers."""

    def __init__(self, prompt: str, metadata: dict, max_calls: int = 2) -> None:
        super().__init__(prompt, metadata, max_calls)
        self.hangs = hangs(prompt)

    def step(self, action: str):
        if self.hangs:
            self.hangs = False
            time.sleep(HANG_S)
        return super().step(action)


def hangs(prompt: str) -> bool:
    return int(prompt.split()[0]) % 4 == 0
