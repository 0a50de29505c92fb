"""The local Ray cluster a run starts (placement.init_ray): no dashboard UI, and a client without
the cluster's token is refused while one with it connects (Ray's servers listen on every
interface, so the token is what keeps other hosts out); and it is the run's own, whatever other
cluster runs, or ran, on the machine."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

PROBE = """
import json, os, subprocess, sys
import ray
from ray._private.authentication.authentication_utils import is_token_auth_enabled
from rlhf_dist.config import ResourcesConfig
from rlhf_dist.cluster.placement import init_ray

init_ray(ResourcesConfig(num_cpus=1), actor_logs=False)
info = ray._private.worker.global_worker.node.address_info
client = "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); print('CONNECTED')"

def connects(env):
    out = subprocess.run([sys.executable, "-c", client, info["gcs_address"]], env=env, capture_output=True,
                         text=True, timeout=180)
    return "CONNECTED" in out.stdout

wrong_token = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "not-the-token"}
print("PROBE " + json.dumps({"token_auth": is_token_auth_enabled(), "dashboard_url": info["webui_url"],
                             "wrong_token_connects": connects(wrong_token), "own_token_connects": connects(None)}))
ray.shutdown()
"""


def test_local_cluster_has_no_dashboard_and_refuses_clients_without_its_token():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=400,
                          env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert json.loads(line.removeprefix("PROBE ")) == {
        "token_auth": True, "dashboard_url": "", "wrong_token_connects": False, "own_token_connects": True,
    }


OWN_CLUSTER = """
import ray
from rlhf_dist.config import ResourcesConfig
from rlhf_dist.cluster.placement import init_ray

init_ray(ResourcesConfig(num_cpus=1), actor_logs=False)
print("GCS " + ray._private.worker.global_worker.node.address_info["gcs_address"])
ray.shutdown()
"""


def _own_cluster_address() -> str:
    proc = subprocess.run([sys.executable, "-c", OWN_CLUSTER], cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (line,) = [line for line in proc.stdout.splitlines() if line.startswith("GCS ")]
    return line.removeprefix("GCS ")


def test_a_run_without_an_address_starts_its_own_cluster_beside_a_ray_start_one_alive_or_gone(tmp_path):
    # Before: ray.init() joined the cluster of the machine's latest `ray start` (Ray's documented
    # behaviour: /tmp/ray/ray_current_cluster), and then refused the run's num_cpus
    # ("When connecting to an existing cluster, num_cpus and num_gpus must not be provided").
    from ray._common.utils import get_ray_address_file  # where `ray start` records it (pinned Ray)

    latest = Path(get_ray_address_file(None))
    saved = latest.read_text() if latest.exists() else None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=1",
         "--include-dashboard=false", "--block"],
        stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while not (latest.exists() and latest.read_text().strip().endswith(f":{port}")):
            assert head.poll() is None and time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-2000:]
            time.sleep(0.5)
        alive = _own_cluster_address()
        assert not alive.endswith(f":{port}")  # its own, not the `ray start` one
    finally:
        head.terminate()
        head.wait(timeout=60)
    assert latest.read_text().strip().endswith(f":{port}")  # still names the cluster now gone
    try:
        assert not _own_cluster_address().endswith(f":{port}")
    finally:
        if saved is None:
            latest.unlink(missing_ok=True)
        else:
            latest.write_text(saved)
