"""vLLM's entry point (``vllm.general_plugins`` in ``pyproject.toml``): every transport's engine
registered in every vLLM process, the engine core included (it may run in a spawned subprocess,
so registering them in the caller's process would not be enough).

Registered lazily, under each transport's ``vllm_backend`` (``rlhf_dist.registry.TRANSPORTS``):
vLLM's factory loads an engine only when one of that backend is created, as
``getattr(<this module>, <backend name>)``, and this module's ``__getattr__`` answers with the
transport's engine class, made then (``Transport.engine_class``).
"""

from __future__ import annotations

from rlhf_dist.registry import TRANSPORTS


def register_vllm_plugin() -> None:
    """Entry point: register every transport's engine in this process (idempotent)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    for entry in TRANSPORTS.values():
        if entry.vllm_backend not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine(entry.vllm_backend, __name__, entry.vllm_backend)


def __getattr__(backend: str) -> type:
    # What vLLM's factory calls once it creates an engine of a backend registered above.
    from rlhf_dist.weight_sync.transport import load_transport

    for name, entry in TRANSPORTS.items():
        if entry.vllm_backend == backend:
            return load_transport(name).engine_class()
    raise AttributeError(f"module {__name__!r} has no attribute {backend!r}")
