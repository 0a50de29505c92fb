"""The local Ray cluster a run starts (placement.init_ray): no dashboard UI, and a client without
the cluster's token is refused while one with it connects. Ray's servers listen on every
interface, so the token is what keeps other hosts out."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
