"""What every actor is told about itself: one frozen spec of its rank, passed to its constructor."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankSpec:
    """One actor's place in its role and what it runs on (built by ``cluster.start.rank_spec``)."""

    rank: int  # this actor's index among its role's actors (data-parallel rank, engine index)
    world_size: int  # how many actors its role (or group) has
    device: str  # where its model runs: cpu or cuda (resources.device)
    seed: int  # the run's seed (cfg.seed); each role derives its own streams from it and the rank
    timeout_s: float  # bound on the collectives of its process group (config.trainer_collective_timeout_s)
    model_path: str  # the model directory it loads ("" when it loads none)

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RankSpec: rank {self.rank} is not in [0, world_size={self.world_size})")
