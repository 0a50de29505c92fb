"""A Ray cluster of several nodes on this one machine: a head (with the dashboard and its job API)
and N workers, each its own raylet with its own CPUs and a node resource naming it, so that a
multi-node launch can be rehearsed, and tested, without a second machine (docs/cluster.md).

    .venv/bin/python scripts/local_cluster.py start [--workers 2] [--cpus 4]   # prints the addresses
    .venv/bin/python scripts/local_cluster.py stop

Node i declares the resource ``rlhf_node_i`` (the head is node 0), which ``resources=local_nodes``
uses to put the roles on distinct nodes. Each node is a ``ray start --block`` process: stopping it
(SIGTERM) stops that node's processes, and only those (``ray stop`` would stop every Ray process on
the machine, other clusters included); killing its raylet is how a test makes a machine disappear.
The nodes keep Ray's token authentication on (a driver joining them needs ``RAY_AUTH_MODE=token``, as
``scripts/submit_job.sh`` sets it). ``start`` writes the pids and addresses to
``/tmp/rlhf_dist_local_cluster.json`` for ``stop``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# Ray's token authentication, as scripts/ray_cluster.sh keeps it: every node and client presents the
# token `ray start --head` wrote to ~/.ray/auth_token.
ENV = {**os.environ, "RAY_AUTH_MODE": "token"}
STATE = Path("/tmp/rlhf_dist_local_cluster.json")
START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_resource(index: int) -> str:
    return f"rlhf_node_{index}"


@dataclass
class LocalCluster:
    """The nodes of one cluster on this machine: ``gcs`` (host:port) for drivers and workers,
    ``job_api`` (http://...) for ``ray job submit``, and each node's ``ray start --block`` pid."""

    cpus: int = 4
    gcs: str = ""
    job_api: str = ""
    pids: dict[int, int] = field(default_factory=dict)  # node index -> its `ray start --block` process
    logs: str = "/tmp"

    def start(self, workers: int) -> LocalCluster:
        port, dashboard = free_port(), free_port()
        self.gcs, self.job_api = f"127.0.0.1:{port}", f"http://127.0.0.1:{dashboard}"
        self._node(0, ["--head", f"--port={port}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={dashboard}"])
        self.wait_for_nodes(1)
        for i in range(1, workers + 1):  # one at a time: a raylet has 30 s to register, on a busy machine too
            self.add_worker(i)
        return self

    def add_worker(self, index: int) -> None:
        """Start worker node ``index`` (a replacement keeps the index of the node it replaces) and
        wait until it is up; a start that timed out (``ray start`` exits) is tried once more."""
        count = len(self.alive_nodes()) + 1
        for attempt in range(2):
            self._node(index, [f"--address={self.gcs}"])
            try:
                self.wait_for_nodes(count, self.pids[index])
                return
            except TimeoutError:
                if attempt:
                    raise

    def _node(self, index: int, role: list[str]) -> None:
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                 f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
        cmd = [RAY, "start", *role, f"--num-cpus={self.cpus}", "--num-gpus=0",
               f"--resources={json.dumps({node_resource(index): 1})}", *ports, "--block"]
        log = open(Path(self.logs) / f"ray_node_{index}.log", "a")  # noqa: SIM115 -- the node's process keeps it
        self.pids[index] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=ENV,
                                            start_new_session=True).pid

    def alive_nodes(self) -> list[dict]:
        """The live nodes (``NodeID``, ``Resources``), asked of the cluster by a short-lived driver."""
        code = (f"import json, ray; ray.init(address={self.gcs!r}, logging_level='ERROR'); print('NODES ' + "
                "json.dumps([{k: n[k] for k in ('NodeID', 'Resources')} for n in ray.nodes() if n['Alive']]))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                             env=ENV)
        lines = [line for line in out.stdout.splitlines() if line.startswith("NODES ")]
        return json.loads(lines[0].removeprefix("NODES ")) if lines else []

    def wait_for_nodes(self, count: int, starting: int | None = None) -> None:
        """Until ``count`` nodes are alive; TimeoutError after ``START_TIMEOUT_S``, or as soon as the
        ``ray start`` process ``starting`` has exited."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while len(self.alive_nodes()) < count:
            gone = starting is not None and not _running(starting)
            if gone or time.monotonic() > deadline:
                raise TimeoutError(f"local_cluster: {count} nodes did not come up in {START_TIMEOUT_S}s "
                                   f"(logs: {self.logs}/ray_node_*.log)")
            time.sleep(1)

    def raylet_of(self, index: int) -> int:
        """The pid of node ``index``'s raylet (a child of its ``ray start`` process)."""
        out = subprocess.run(["pgrep", "-P", str(self.pids[index]), "-f", "raylet"], capture_output=True, text=True,
                             check=True)
        return int(out.stdout.split()[0])

    def kill_node(self, index: int) -> None:
        """Node ``index`` disappears as a machine would: its raylet SIGKILLed (its workers and
        other processes go with it: ``ray start --block`` stops the rest when one dies)."""
        os.kill(self.raylet_of(index), signal.SIGKILL)

    def stop(self) -> None:
        for pid in self.pids.values():
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 60
        for pid in self.pids.values():
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.2)
        self.pids.clear()


def _running(pid: int) -> bool:
    _reap(pid)
    return Path(f"/proc/{pid}").exists()


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop"])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=4, help="logical CPUs each node declares")
    args = parser.parse_args()
    if args.command == "start":
        if STATE.exists():
            sys.exit(f"local_cluster: one is running ({STATE}); stop it first")
        cluster = LocalCluster(cpus=args.cpus).start(args.workers)
        STATE.write_text(json.dumps(asdict(cluster)))
        print(f"local_cluster: {args.workers + 1} nodes; drivers: RAY_ADDRESS={cluster.gcs} "
              f"(resources.ray_address={cluster.gcs}); jobs: RAY_ADDRESS={cluster.job_api} bash scripts/submit_job.sh")
    else:
        if not STATE.exists():
            sys.exit("local_cluster: none is running")
        state = json.loads(STATE.read_text())
        LocalCluster(**{**state, "pids": {int(k): v for k, v in state["pids"].items()}}).stop()
        STATE.unlink()
        print("local_cluster: stopped")


if __name__ == "__main__":
    main()
