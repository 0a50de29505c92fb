"""Checkpoints of a PPO run: written atomically, verified before use, the newest M kept.

A checkpoint is a directory ``<checkpoint.dir>/step_<N>`` (N = steps completed):

    policy_ds/, critic_ds/   DeepSpeed checkpoints of the trainer groups (model, optimizer,
                             LR schedule, step counters; one partition per rank) and each
                             rank's RNG state (safetensors); resumed onto another world size
                             or ZeRO stage, each gets its universal form beside it
                             (``policy_ds.universal/``, made once; not in the manifest)
    policy/                  the policy as a Hugging Face directory (safetensors), loadable by
                             transformers and vLLM (``checkpoint.export_policy``)
    state.json               the controller's state: step, KL controller, summary so far,
                             W&B run id, Python RNG; controller_rng.safetensors: its torch RNG
    config.json              the resolved config of the run (a resume is checked against it)
    manifest.json            size and SHA-256 of every other file; written last

Everything is written into ``.tmp-step_<N>`` and renamed into place once the manifest is on
disk, so a ``step_<N>`` directory is complete unless a file was damaged later, which the
manifest catches: such a checkpoint is skipped with a warning. Engine sampling seeds are not
stored: they are derived from (seed, step), as is the prompt order.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from rlhf_dist.config import CheckpointConfig
from rlhf_dist.roles.reshard import UNIVERSAL

if TYPE_CHECKING:
    from rlhf_dist.cluster.start import Roles

MANIFEST = "manifest.json"
STATE = "state.json"
CONFIG = "config.json"  # the resolved config of the run that wrote the checkpoint
CONTROLLER_RNG = "controller_rng.safetensors"
POLICY_DS, CRITIC_DS, POLICY_HF = "policy_ds", "critic_ds", "policy"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or the one asked for cannot be used; names the path."""


@dataclass
class TrainState:
    """What the controller needs to continue a run exactly where a checkpoint left it."""

    step: int = 0  # PPO steps completed: the next step to run
    kl_controller: dict[str, float] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)  # run-level values logged so far
    wandb_id: str = ""
    # Rollouts of the next steps already generated (rollout.max_staleness >= 1), as RolloutBatch.to_json
    in_flight: list[dict] = field(default_factory=list)


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(root: Path) -> None:
    """Record size and SHA-256 of every file under ``root``; the manifest is flushed to disk."""
    entries = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in _files(root)}
    with (root / MANIFEST).open("w") as f:
        json.dump({"files": entries}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify(root: Path) -> str:
    """"" if ``root`` is a complete, undamaged checkpoint, else why not."""
    try:
        entries = json.loads((root / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"no readable {MANIFEST} ({type(e).__name__})"
    for required in (STATE, CONFIG):
        if required not in entries:
            return f"{required} missing from the manifest"
    found = {str(p.relative_to(root)) for p in _files(root)}
    if missing := sorted(set(entries) - found):
        return f"missing files: {', '.join(missing[:3])}"
    for name, entry in entries.items():
        path = root / name
        if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
            return f"{name} does not match its checksum"
    return ""


class CheckpointDir:
    """The checkpoints of one run under ``root``."""

    def __init__(self, root: Path, keep_last: int, warn: Callable[[str], None] | None = None) -> None:
        self.root, self.keep_last = root, keep_last
        self.warn = warn or (lambda text: print(f"rlhf_dist: warning: {text}", file=sys.stderr))

    def complete(self) -> list[tuple[int, Path]]:
        """(step, path) of every ``step_<N>`` directory, newest first (not yet verified)."""
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
        return sorted(found, reverse=True)

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; damaged ones are skipped with a warning."""
        for _, path in self.complete():
            if problem := verify(path):
                self.warn(f"skipping checkpoint {path}: {problem}")
                continue
            return path
        return None

    def resolve(self, resume: str) -> Path | None:
        """The checkpoint ``resume`` names: "" none, "auto" the newest good one (none if there is
        none yet), or a checkpoint directory, which must verify."""
        if resume in ("", "auto"):
            return self.latest() if resume == "auto" else None
        path = Path(resume).expanduser()
        if problem := verify(path):
            raise CheckpointError(f"resume={resume!r}: not a usable checkpoint: {problem}")
        return path

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for the checkpoint of ``step`` (leftovers of a crash removed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-step_*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.root / f".tmp-{step_dir_name(step)}"
        tmp.mkdir()
        return tmp

    def commit(self, tmp: Path, step: int) -> Path:
        """Seal ``tmp`` with its manifest, rename it to ``step_<N>``, then drop the oldest beyond
        ``keep_last``. Until the rename, the newest complete checkpoint is the previous one."""
        write_manifest(tmp)
        final = self.root / step_dir_name(step)
        replaced = self.root / f".replaced-{final.name}"
        if final.exists():  # a damaged one of the same step: swap, so one complete copy always exists
            shutil.rmtree(replaced, ignore_errors=True)
            os.rename(final, replaced)
        os.rename(tmp, final)
        _fsync_dir(self.root)
        shutil.rmtree(replaced, ignore_errors=True)
        for _, old in self.complete()[self.keep_last :]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def set_aside_after(self, step: int) -> list[Path]:
        """Rename the checkpoints of steps after ``step`` to ``step_<N>.superseded``: a run resumed
        from an earlier checkpoint makes them another history, which ``resume=auto`` must not pick
        up later (they are kept, not deleted). Returns their new paths."""
        moved = []
        for later, path in self.complete():
            if later > step:
                target = path.with_name(f"{path.name}.superseded")
                shutil.rmtree(target, ignore_errors=True)
                os.rename(path, target)
                moved.append(target)
        return moved

    def abort(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)


def write_state(directory: Path, state: TrainState) -> None:
    from safetensors.torch import save_file

    payload = {**asdict(state), "python_rng": _python_rng_to_json(random.getstate())}
    (directory / STATE).write_text(json.dumps(payload, indent=1) + "\n")
    save_file({"cpu": torch.get_rng_state()}, str(directory / CONTROLLER_RNG))


def read_state(directory: Path) -> TrainState:
    """The controller state of a verified checkpoint."""
    payload = json.loads((directory / STATE).read_text())
    payload.pop("python_rng")
    return TrainState(**payload)


def restore_controller_rng(directory: Path) -> None:
    from safetensors.torch import load_file

    random.setstate(_python_rng_from_json(json.loads((directory / STATE).read_text())["python_rng"]))
    torch.set_rng_state(load_file(str(directory / CONTROLLER_RNG))["cpu"])


# Keys a resumed run must share with its checkpoint: they fix what the trainer state is.
MUST_MATCH = ("model.path", "model.critic_path", "model.dtype",
              "model.lora.rank", "model.lora.target_modules", "model.critic_lora.rank", "model.critic_lora.target_modules",
              "algo.estimator")
# Keys a resumed run may change without comment: they do not touch what is computed.
MAY_CHANGE = ("total_steps", "resume", "max_restarts", "cache_dir", "timeouts.", "logger.", "checkpoint.",
              "resources.")


# The trainer groups' shape: a checkpoint of another shape is converted (``reshard_kind``), and the run
# takes the same optimizer steps on it (its minibatches do not depend on the world size).
SHAPE = ("trainer.world_size", "trainer.zero_stage")


def _shape(config: dict[str, Any]) -> tuple[int, int]:
    """(trainer.world_size, trainer.zero_stage) of a resolved config."""
    return config["trainer"]["world_size"], config["trainer"]["zero_stage"]


def reshard_kind(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """How the trainer state of a checkpoint of the run configured ``saved`` loads into a run
    configured ``current``: "" as it is (the same shape, or ZeRO-0 on another world size: each of
    its ranks holds the whole optimizer state), "universal" through DeepSpeed's universal
    checkpoint (``roles.reshard``). Raises ``CheckpointError``, one line, where it cannot."""
    (old_world, old_stage), (world, stage) = _shape(saved), _shape(current)
    if (old_world, old_stage) == (world, stage) or old_stage == stage == 0:
        return ""
    if 0 in (old_stage, stage):
        raise CheckpointError(
            f"trainer.zero_stage={stage}: the checkpoint was written with trainer.zero_stage={old_stage}, and "
            "ZeRO-0's state converts only to another world size at ZeRO-0 (DeepSpeed's universal checkpoints "
            f"cover ZeRO 1-3); resume with trainer.zero_stage={old_stage}")
    return "universal"


def reshard_line(saved: dict[str, Any], current: dict[str, Any]) -> str:
    """What a resume onto another shape prints, or "" (the same shape)."""
    if not reshard_kind(saved, current):
        return ""
    (old_world, old_stage), (world, stage) = _shape(saved), _shape(current)
    ranks = "rank" if old_world == 1 else "ranks"
    return (f"rlhf_dist: the checkpoint's trainers ran on {old_world} {ranks} at ZeRO-{old_stage}, this run's on "
            f"{world} at ZeRO-{stage}: their DeepSpeed state is converted to a universal checkpoint (kept beside "
            f"it as {POLICY_DS}{UNIVERSAL}/) and loaded onto the new shape")


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs from the checkpoint's run, apart from
    those that change nothing computed and the trainers' ``SHAPE`` (``reshard_line`` says that).
    Raises ``CheckpointError`` if one of ``MUST_MATCH`` differs, or the shape cannot change so."""
    reshard_kind(saved, current)
    old, new = _flat(saved), _flat(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for key in changed:
        if key in MUST_MATCH:
            raise CheckpointError(
                f"{key}={new.get(key)!r}: the checkpoint was written with {key}={old.get(key)!r}; resume with that"
            )
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed if not k.startswith(MAY_CHANGE) and k not in SHAPE]


def _python_rng_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


class Checkpointer:
    """Saves and restores the whole run (trainer groups, exported policy, controller state)."""

    def __init__(
        self, cfg: CheckpointConfig, out_dir: Path, config: dict[str, Any], warn: Callable[[str], None] | None = None
    ) -> None:
        self.cfg, self.config = cfg, config
        root = Path(cfg.dir).expanduser() if cfg.dir else out_dir / "checkpoints"
        self.dir = CheckpointDir(root, cfg.keep_last, warn)

    def due(self, steps_done: int, total_steps: int, stopping: bool = False) -> bool:
        """Checkpoint after ``steps_done`` steps? Every ``every_steps``, after the last step, and
        when the run stops early (``stopping``: a signal), unless checkpoints are off (0)."""
        every = self.cfg.every_steps
        return bool(every) and (steps_done % every == 0 or steps_done == total_steps or stopping)

    def save(self, roles: Roles, state: TrainState) -> Path:
        """Write the checkpoint of ``state.step``; on any failure (a full disk, a lost actor) the
        partial directory is removed, the previous checkpoint is untouched, and this raises."""
        from rlhf_dist.roles.worker_group import wait_all

        tmp = self.dir.begin(state.step)
        try:
            wait_all(*(g.save_checkpoint_async(str(tmp / name)) for g, name in self._trainers(roles)))
            if self.cfg.export_policy:
                roles.policy.save_async(str(tmp / POLICY_HF)).result()
            write_state(tmp, state)
            (tmp / CONFIG).write_text(json.dumps(self.config, indent=1) + "\n")
            return self.dir.commit(tmp, state.step)
        except BaseException as e:
            free = shutil.disk_usage(self.dir.root).free / 2**20  # before the partial files go
            self.dir.abort(tmp)
            previous = self.dir.complete()
            kept = f"the previous checkpoint {previous[0][1]} is intact" if previous else "no earlier checkpoint exists"
            if isinstance(e, (OSError, RuntimeError)) and not getattr(e, "lost_actor", False):
                raise CheckpointError(
                    f"checkpoint {step_dir_name(state.step)} not written ({e}; {free:.0f} MiB free in "
                    f"{self.dir.root}); {kept}"
                ) from e
            raise

    def check_config(self, path: Path) -> list[str]:
        """The settings changed since ``path`` was written (see ``config_changes``)."""
        return config_changes(json.loads((path / CONFIG).read_text()), self.config)

    def reshard_line(self, path: Path) -> str:
        """What resuming from ``path`` onto this run's trainer shape prints ("" the same shape)."""
        return reshard_line(json.loads((path / CONFIG).read_text()), self.config)

    def restore(self, roles: Roles, path: Path) -> TrainState:
        """Load the trainer groups from ``path``, give the engines the restored policy, and
        return the controller state (its RNGs restored)."""
        from rlhf_dist.roles.worker_group import wait_all

        trainers = self._trainers(roles)
        universal = [""] * len(trainers)
        if reshard_kind(json.loads((path / CONFIG).read_text()), self.config):  # onto another shape: convert once
            universal = wait_all(*(g.convert_checkpoint_async(str(path / name)) for g, name in trainers))
        wait_all(*(g.load_checkpoint_async(str(path / name), u) for (g, name), u in zip(trainers, universal)))
        state = read_state(path)
        restore_controller_rng(path)
        if roles.weights is not None:  # (none when the run replays dumped rollouts)
            roles.weights.sync(version=state.step)
        return state

    @staticmethod
    def _trainers(roles: Roles) -> list[tuple[Any, str]]:
        pairs = [(roles.policy, POLICY_DS)]
        if roles.critic is not None:
            pairs.append((roles.critic, CRITIC_DS))
        return pairs
