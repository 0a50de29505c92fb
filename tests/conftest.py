"""Shared fixtures: the repo root, the embedded tiny models, and typed configs composed by Hydra."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# DeepSpeed JIT-builds its CPU Adam op (trainer.offload_optimizer) with ninja under
# TORCH_EXTENSIONS_DIR, and the build command names the venv's paths: two checkouts sharing
# ~/.cache/torch_extensions (a developer's and CI's clone) each rebuild it (~100 s of both cores)
# whenever the other built last. One build directory per venv; actors and subprocesses inherit it.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(
    Path.home() / ".cache" / "torch_extensions" / f"venv-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]}"
))


def compose_config(overrides: list[str]):
    """The real Hydra config (conf/ + dataclass schema) with overrides, as a typed ``Config``."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rlhf_dist.config import register_configs, to_config

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return to_config(compose(config_name="config", overrides=overrides))


@pytest.fixture(scope="session")
def tiny_policy() -> str:
    from rlhf_dist.models.tiny import build_task_policy

    return str(build_task_policy("reviews"))


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_policy: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    from rlhf_dist.models.tiny import build_tiny_reward_model
    from rlhf_dist.tasks.base import load_task

    recipe = load_task("reviews").recipe  # the policy's shape
    return str(build_tiny_reward_model(tmp_path_factory.mktemp("rm") / "tiny-rm", tiny_policy, recipe))


@contextmanager
def local_http_server(handler: type[BaseHTTPRequestHandler], path: str = "/score") -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 (an ephemeral port) answering with ``handler``; yields its URL."""
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}{path}"
    finally:
        server.shutdown()
        server.server_close()


def send_json(handler: BaseHTTPRequestHandler, payload: bytes) -> None:
    """Answer the request being handled with 200 and ``payload`` (JSON text)."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(len(payload)))
    handler.end_headers()
    handler.wfile.write(payload)


def local_scorer(cfg):
    """A ``RewardScorer`` of ``cfg`` in this process, as the one reward actor of a CPU run."""
    from rlhf_dist.roles.reward import RewardScorer
    from rlhf_dist.roles.spec import RankSpec

    spec = RankSpec(rank=0, world_size=1, device="cpu", seed=0, timeout_s=60.0, model_path=cfg.model_path)
    return RewardScorer(spec=spec, cfg=cfg, dtype="float32", chat_template=True)
