"""Each step's scored rollout on disk (``rollout.dump=true``): ``<run>/rollouts/step_<N>.safetensors``,
written as the step takes it, so that a loss spike can be looked at in the batch that made it.

One safetensors file per step: the token columns as flat tensors with their per-sample lengths
(prompt and response token ids, the engine's sampling logprob of each response token, the action
mask of multi-turn samples), the per-sample scalars as tensors (score as trained on, policy version,
cut off by the length budget), float64 where the values are Python floats, so a batch reads back
exactly; the texts, metadata and the step's statistics as JSON in the file's metadata.

    .venv/bin/python -m rlhf_dist.rollout.dump <run>/rollouts/step_000012.safetensors [--rows 4]

prints a step's samples as text. ``ReplayQueue`` trains on them again (``rollout.replay_from``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from rlhf_dist.roles.generation import Generation
from rlhf_dist.rollout.queue import RolloutBatch

TOKEN_COLUMNS = {"prompt_ids": torch.int64, "response_ids": torch.int64, "response_logprobs": torch.float64}
# what the JSON metadata holds, per sample
TEXT_FIELDS = ("text", "env", "transcript")


def step_path(directory: Path, step: int) -> Path:
    return directory / f"step_{step:06d}.safetensors"


def _flat(rows: list[list], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    flat = torch.tensor([x for r in rows for x in r], dtype=dtype)
    return flat, lengths


def _rows(flat: torch.Tensor, lengths: torch.Tensor) -> list[list]:
    return [part.tolist() for part in torch.split(flat, lengths.tolist())]


def write(directory: Path, batch: RolloutBatch) -> Path:
    """Write ``batch`` as ``directory/step_<N>.safetensors`` (atomically); returns its path."""
    from safetensors.torch import save_file

    gens = batch.generations
    tensors: dict[str, torch.Tensor] = {}
    for name, dtype in TOKEN_COLUMNS.items():
        tensors[name], tensors[f"{name}_lengths"] = _flat([getattr(g, name) for g in gens], dtype)
    masked = [g.action_mask is not None for g in gens]
    tensors["action_mask"], tensors["action_mask_lengths"] = _flat([g.action_mask or [] for g in gens], torch.int8)
    tensors["has_action_mask"] = torch.tensor(masked, dtype=torch.bool)
    tensors["batch_prompt_ids"], tensors["batch_prompt_ids_lengths"] = _flat(batch.prompt_ids, torch.int64)
    tensors["score"] = torch.tensor(batch.scores, dtype=torch.float64)
    tensors["version"] = torch.tensor([g.version for g in gens], dtype=torch.int64)
    tensors["truncated"] = torch.tensor([g.truncated for g in gens], dtype=torch.bool)
    meta = {"step": batch.step, "texts": batch.texts, "metadata": batch.metadata, "times": batch.times,
            "stats": batch.stats, "streamed": batch.streamed,
            "generations": [{f: getattr(g, f) for f in TEXT_FIELDS} for g in gens]}
    directory.mkdir(parents=True, exist_ok=True)
    path, tmp = step_path(directory, batch.step), step_path(directory, batch.step).with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"rollout": json.dumps(meta)})
    tmp.replace(path)
    return path


def read(path: Path) -> RolloutBatch:
    """The batch ``write`` wrote to ``path``, as it was."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rollout"])
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 -- safe_open has no iterator
    columns = {name: _rows(t[name], t[f"{name}_lengths"]) for name in (*TOKEN_COLUMNS, "action_mask")}
    gens = [
        Generation(columns["prompt_ids"][i], columns["response_ids"][i], columns["response_logprobs"][i],
                   version=int(t["version"][i]), truncated=bool(t["truncated"][i]),
                   action_mask=columns["action_mask"][i] if t["has_action_mask"][i] else None, **extra)
        for i, extra in enumerate(meta["generations"])
    ]
    return RolloutBatch(meta["step"], _rows(t["batch_prompt_ids"], t["batch_prompt_ids_lengths"]), meta["texts"],
                        meta["metadata"], gens, t["score"].tolist(), meta["times"], meta["stats"], meta["streamed"])


def show(batch: RolloutBatch, rows: int) -> str:
    """The first ``rows`` samples of ``batch`` as text: prompt, response, score, policy version."""
    lines = [f"step {batch.step}: {len(batch.generations)} samples, stats {json.dumps(batch.stats)}"]
    for i, g in enumerate(batch.generations[:rows]):
        score = "dropped" if math.isnan(batch.scores[i]) else f"{batch.scores[i]:.4g}"
        lines += [f"--- sample {i}: score {score}, policy version {g.version}, {len(g.response_ids)} response tokens"
                  + (" (cut off)" if g.truncated else "") + f", sampling logprob {sum(g.response_logprobs):.4g}",
                  f"prompt:   {batch.texts[i]!r}", f"response: {(g.transcript or g.text)!r}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print a dumped rollout step (rollout.dump=true) as text.")
    parser.add_argument("path", type=Path)
    parser.add_argument("--rows", type=int, default=4, help="samples to print")
    args = parser.parse_args()
    print(show(read(args.path), args.rows))


if __name__ == "__main__":
    main()


class ReplayQueue:
    """The rollouts of a run that dumped them (``rollout.replay_from``), taken step by step in
    place of ``queue.RolloutQueue``: nothing is generated or scored, and there are no engines to
    sync."""

    def __init__(self, run_dir: str) -> None:
        self.directory = Path(run_dir) / "rollouts"

    def take(self, step: int) -> RolloutBatch:
        path = step_path(self.directory, step)
        if not path.is_file():
            raise FileNotFoundError(f"rollout.replay_from: no dumped rollout of step {step} ({path}); the run it "
                                    "replays dumped fewer steps: lower total_steps")
        started = time.perf_counter()
        batch = read(path)
        # the dumped run's generation and scoring times (throughput/* is computed from them)
        batch.times = {**batch.times, "time/rollout_read": time.perf_counter() - started}
        return batch

    def sync_engines(self, version: int) -> None:
        """No engines: nothing to sync."""

    def finish_in_flight(self) -> list[RolloutBatch]:
        return []  # nothing is generated ahead
