"""Schedules of the run's coefficients: the learning-rate multiplier, and the fixed and adaptive
KL penalty controllers (Ziegler et al. 2019). Pure Python.
"""

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Factor applied to the base learning rate at optimizer step ``step`` (0-based).

    Warmup (step < warmup_steps): (step + 1) / warmup_steps, reaching 1.0 on the last warmup
    step. After it, with progress = (step - warmup_steps) / (total_steps - warmup_steps)
    clamped to [0, 1]: "constant" -> 1, "linear" -> 1 - progress,
    "cosine" -> 0.5 * (1 + cos(pi * progress)).
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; expected one of {LR_SCHEDULES}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    # max(1, ...) keeps a schedule with no decay phase (total <= warmup) from dividing by zero.
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class FixedKLController:
    """KL penalty coefficient that never changes."""

    def __init__(self, value: float):
        self.value = value

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """KL penalty coefficient steered toward a target KL (Ziegler et al. 2019).

    ``current_kl`` is the measured KL(pi || ref) per sequence, ``n_steps`` the number of
    samples (or steps) since the last update, ``horizon`` how many of them a full
    proportional correction takes.
    """

    def __init__(self, init_value: float, target: float, horizon: float):
        if target <= 0:
            raise ValueError(f"AdaptiveKLController target must be > 0 (a KL), got {target}")
        if horizon <= 0:
            raise ValueError(f"AdaptiveKLController horizon must be > 0, got {horizon}")
        self.value = init_value
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        # e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon)
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, float]:
        # target and horizon come from config; only the coefficient is training state.
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
