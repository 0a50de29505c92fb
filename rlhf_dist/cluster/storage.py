"""The directory every trainer rank writes its checkpoint partition to must be one directory: on a
cluster, a mount every node shares (docs/cluster.md). A rank on a node with its own local copy of
the path would write its partition where the driver and the other ranks never look, and the
checkpoint would be incomplete without a word until a resume failed. So the run checks at start:
the driver leaves a probe file, every rank must see it and leave one back."""

from __future__ import annotations

import contextlib
import secrets
from pathlib import Path

from rlhf_dist.config import ConfigError
from rlhf_dist.roles.groups import TrainerGroup
from rlhf_dist.roles.worker_group import wait_all


def unshared(directory: Path, answers: dict[tuple[str, int], tuple[str, int, bool]], seen_back: set[int]) -> str:
    """The line refusing ``directory`` if a rank does not share it with the driver, else "":
    ``answers`` is (role, rank) -> (node, pid, the rank saw the driver's probe), ``seen_back`` the
    pids whose probe the driver then saw."""
    for (role, rank), (node, pid, seen) in sorted(answers.items()):
        if not seen or pid not in seen_back:
            which = "does not see the driver's probe file there" if not seen else "left a probe file the driver does not see"
            return (f"checkpoint.dir: {directory} is not one directory shared by the driver and every trainer rank: "
                    f"{role} rank {rank} on node {node} {which}; mount the same directory at this path on every "
                    "node, or set checkpoint.dir (and hydra.run.dir) to such a mount (docs/cluster.md)")
    return ""


def check_shared(directory: Path, groups: list[TrainerGroup], timeout_s: float) -> None:
    """Refuse, in one line (``ConfigError``), a checkpoint ``directory`` some rank of ``groups``
    does not share with the driver (module docstring). Creates the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(8)
    probe = directory / f".probe-{token}"
    probe.write_text("driver\n")
    try:
        replies = wait_all(*(g.call_async("probe_dir", str(directory), token, timeout_s=timeout_s) for g in groups))
        answers = {(g.role, rank): answer for g, ranks in zip(groups, replies) for rank, answer in enumerate(ranks)}
        seen_back = {pid for _, pid, _ in answers.values() if (directory / f".probe-{token}-{pid}").is_file()}
        if line := unshared(directory, answers, seen_back):
            raise ConfigError(line)
    finally:
        for path in directory.glob(f".probe-{token}*"):
            with contextlib.suppress(OSError):
                path.unlink()
