"""A trainer checkpoint onto another shape: DeepSpeed's universal checkpoints, made loadable by any stage.

A DeepSpeed ZeRO checkpoint holds one partition of the optimizer state per rank, cut for the world
size and ZeRO stage that wrote it. ``universal_checkpoint`` converts one, once, with DeepSpeed's
``ds_to_universal`` into its universal layout (one directory per parameter: its fp32 master value
and Adam moments, whole), written beside the original as ``<dir>.universal`` and reused by later
resumes; DeepSpeed then loads that onto any world size and stage 1-3 (``load_universal``).

DeepSpeed 0.19 converts ZeRO 1-3 but writes a layout that depends on the source stage, and each
stage's loader reads only its own (measured: ZeRO-2 -> 3 and 3 -> 1/2 fail in DeepSpeed's loader).
``_loadable_by_any_stage`` adds what each loader looks for: every state file as ``{"param": t}``
with a ``step.pt``, the optimizer's global state in both stages' layouts, the model-state file
under both stages' names. ZeRO-0 keeps the whole optimizer state on every rank (no partitions):
its checkpoints load onto any world size as they are, but not onto ZeRO 1-3 or from them
(``checkpoint.reshard_kind`` refuses that in one line).

DeepSpeed reads these files by unpickling (``torch.load(weights_only=False)``); every read here runs
under ``weights_only_loads``: tensors, containers and the three DeepSpeed classes a checkpoint
holds, nothing that could run code.
"""

from __future__ import annotations

import contextlib
import glob
import io
import os
import shutil
from argparse import Namespace
from pathlib import Path

import torch

UNIVERSAL = ".universal"  # suffix of a DeepSpeed checkpoint directory's converted copy
_COMPLETE = "complete"  # written last into a converted copy


def checkpoint_classes() -> list[type]:
    """The non-tensor classes a DeepSpeed checkpoint of ours holds (what a safe load admits)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside (DeepSpeed's converter and universal loaders call it with
    ``weights_only=False``) loads with ``weights_only=True``, admitting ``checkpoint_classes``."""
    original = torch.load
    allowed = checkpoint_classes()

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(allowed):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


def universal_checkpoint(directory: str, tag: str) -> str:
    """The universal form of the DeepSpeed checkpoint ``directory`` (sub-directory ``tag``):
    ``<directory>.universal``, converted now unless a complete one is there already."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    source = Path(directory)
    out = source.with_name(source.name + UNIVERSAL)
    if (out / _COMPLETE).exists():
        return str(out)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    log = io.StringIO()  # the converter's progress; shown only if it fails
    try:
        with weights_only_loads(), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            ds_to_universal(Namespace(
                input_folder=str(source / tag), output_folder=str(tmp / tag), num_extract_workers=1,
                num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True,
            ))
            _loadable_by_any_stage(tmp / tag)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        last = log.getvalue().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"the DeepSpeed checkpoint {source} could not be converted to a universal checkpoint "
                           f"({type(e).__name__}: {e}; DeepSpeed's converter said: {last[0]!r})") from e
    (tmp / _COMPLETE).write_text("")
    shutil.rmtree(out, ignore_errors=True)
    os.rename(tmp, out)
    return str(out)


def _loadable_by_any_stage(folder: Path) -> None:
    """Rewrite a converted checkpoint so the ZeRO-1/2 and the ZeRO-3 loaders both read it."""
    import deepspeed

    zero = folder / "zero"
    state_path = zero / "optimizer_state.pt"
    state = torch.load(state_path)
    state.pop("fp32_flat_groups", None)  # a ZeRO-3 source's whole flat partition: read by no loader
    state.setdefault("ds_version", deepspeed.__version__)
    if "optimizer_state_dict" not in state:  # a ZeRO-1/2 source: the step is in each parameter's step.pt
        steps = {float(torch.load(f)) for f in glob.glob(str(zero / "*" / "step.pt"))}
        if len(steps) != 1:
            raise ValueError(f"the parameters' Adam steps disagree ({sorted(steps)})")
        state["optimizer_state_dict"] = {"state": {0: {"step": torch.tensor(steps.pop())}},
                                         "param_groups": state["param_groups"]}
    torch.save(state, state_path)
    step = state["optimizer_state_dict"]["state"][0]["step"]
    for param in (p for p in zero.iterdir() if p.is_dir()):
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            path = param / f"{key}.pt"
            if path.exists() and not isinstance(value := torch.load(path), dict):
                torch.save({"param": value}, path)  # a ZeRO-3 source writes the bare tensor
        if not (param / "step.pt").exists():
            torch.save(step, param / "step.pt")
    stage12, stage3 = folder / "mp_rank_00_model_states.pt", folder / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if not stage12.exists():
        shutil.copyfile(stage3, stage12)
    if not stage3.exists():
        shutil.copyfile(stage12, stage3)
