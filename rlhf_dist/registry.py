"""Extension points found by name: the built-in tasks (``TASKS``), the weight-sync transports
(``TRANSPORTS``), and user code (reward functions, environments) imported from a dotted path and
checked before any actor starts.
Standard library only, so config checks and every layer of the package can use it without
importing torch or Ray; an entry is a string, imported only when used.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TaskEntry:
    """Where a built-in task is, and what config checks need of it without importing it."""

    target: str  # "module:attr" of its rlhf_dist.tasks.base.Task
    model: str  # the model.path name of its tiny policy (Task.model)
    supervised: bool  # has SFT and preference rows (Task.supervised_rows): builtin:<name> is a data.sft source


# The built-in tasks: data.prompts=builtin:<name>. tasks/<name>.py exports TASK; load it with
# rlhf_dist.tasks.base.load_task(name). tests/unit/test_registry.py checks every line against its Task.
TASKS: dict[str, TaskEntry] = {
    "reviews": TaskEntry("rlhf_dist.tasks.reviews:TASK", model="tiny", supervised=True),
    "arithmetic": TaskEntry("rlhf_dist.tasks.arithmetic:TASK", model="tiny-arith", supervised=False),
    "calculator": TaskEntry("rlhf_dist.tasks.calculator:TASK", model="tiny-calc", supervised=False),
}


@dataclass(frozen=True)
class TransportEntry:
    """Where a weight-sync transport is, and what config checks need of it without importing it."""

    target: str  # "module:attr" of its rlhf_dist.weight_sync.transport.Transport
    vllm_backend: str  # the name its engine is registered under in vLLM (WeightTransferConfig.backend)
    # True: trainer rank 0 broadcasts over one group with every engine worker (a GroupTransport);
    # False: every trainer rank exports handles on its GPU, engine i loads trainer rank i's (a HandleTransport).
    grouped: bool
    devices: tuple[str, ...]  # the resources.device values it runs on
    placements: tuple[str, ...]  # the resources.placement values it works with
    in_process: bool = False  # needs resources.vllm_in_process=true (what it hands the engines cannot be pickled)
    why: str = ""  # why its devices, placements or in_process are what they are (error messages say it)


# The weight-sync transports: resources.weight_sync_backend=<name>. weight_sync/<name>.py exports
# TRANSPORT; load it with rlhf_dist.weight_sync.transport.load_transport(name).
# tests/unit/test_registry.py checks every line against its Transport.
TRANSPORTS: dict[str, TransportEntry] = {
    "gloo": TransportEntry("rlhf_dist.weight_sync.gloo:TRANSPORT", vllm_backend="rlhf_gloo", grouped=True,
                           devices=("cpu", "cuda"), placements=("separate", "colocated")),
    "nccl": TransportEntry("rlhf_dist.weight_sync.nccl:TRANSPORT", vllm_backend="rlhf_nccl", grouped=True,
                           devices=("cuda",), placements=("separate",),
                           why="NCCL cannot join a trainer and an engine on one GPU"),
    "ipc": TransportEntry("rlhf_dist.weight_sync.ipc:TRANSPORT", vllm_backend="rlhf_ipc", grouped=False,
                          devices=("cuda",), placements=("colocated",), in_process=True,
                          why="an engine loads CUDA IPC handles of the trainer's copies on its own GPU, passed "
                              "in-process (vLLM's engine-core channel would pickle them)"),
}


def import_function(path: str, key: str = "reward.function") -> Callable[..., float]:
    """Resolve ``"package.module:function"`` (or ``"package.module.function"``); an error names
    ``key``, the config key that gave ``path``."""
    module_name, _, attr = path.partition(":") if ":" in path else path.rpartition(".")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"{key}={path!r}: cannot import it ({e})") from e
    if not callable(fn):
        raise ValueError(f"{key}={path!r}: {type(fn).__name__} is not callable")
    return fn


def takes_metadata(fn: Callable[..., float], path: str, key: str = "reward.function") -> bool:
    """Whether ``fn`` is called as fn(prompt, response, metadata) or fn(prompt, response)."""
    sig = inspect.signature(fn)
    for args, with_metadata in ((("p", "r", {}), True), (("p", "r"), False)):
        try:
            sig.bind(*args)
            return with_metadata
        except TypeError:
            continue
    raise ValueError(f"{key}={path!r}: signature {sig} must accept (prompt, response[, metadata])")


def env_factory(spec: dict[str, Any], key: str = "rollout.env") -> Callable[[str, dict], Any]:
    """``prompt, metadata -> environment`` from a ``_target_`` node; the target is imported and its
    arguments bound now, so a typo or a missing argument fails in one line before any actor starts."""
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not isinstance(target, str) or not target:
        raise ValueError(f"{key}: needs _target_ (an environment class, e.g. rlhf_dist.tasks.calculator.CalculatorEnv)")
    cls = import_function(target, f"{key}._target_")  # "pkg.module.Class": one line naming the key if it fails
    try:
        inspect.signature(cls).bind(prompt="", metadata={}, **spec)
    except TypeError as e:
        raise ValueError(f"{key}._target_={target!r}: cannot be called as {target}(prompt=, metadata=, "
                         f"{', '.join(f'{k}=' for k in spec)}): {e}") from e
    for method in ("reset", "step"):
        if not callable(getattr(cls, method, None)):
            raise ValueError(
                f"{key}._target_={target!r}: has no {method}() method (see rlhf_dist.tasks.base.Environment)"
            )
    stop = getattr(cls, "stop", ())
    if isinstance(stop, str) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"{key}._target_={target!r}: stop={stop!r} must be a tuple of non-empty strings")

    def make(prompt: str, metadata: dict) -> Any:
        return cls(prompt=prompt, metadata=metadata, **spec)

    return make
