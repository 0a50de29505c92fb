"""Where a rendezvous that a role's rank 0 hosts listens: the node's address and a port for it.

The process groups (each trainer group's DeepSpeed group, the weight-transfer group) rendezvous at
an (address, port) that rank 0 picks on its node and every peer connects to.

- **Address**: the node's IP as Ray registered it, unless ``RLHF_DIST_NODE_IP`` is set on that node
  (a multi-NIC host, where the other nodes reach it on another interface than Ray picked).
- **Port**: one outside the kernel's ephemeral range (``/proc/sys/net/ipv4/ip_local_port_range``),
  so no outgoing connection and no ``bind(0)`` can take it between the pick and the rendezvous's
  own bind; handed out by one counter per node under a file lock, so groups starting at once on a
  node never get the same one; one that something else listens on is skipped.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

NODE_IP_ENV = "RLHF_DIST_NODE_IP"
PORT_FLOOR = 20000  # the lowest port handed out (below it: well-known services' registered ports)
EPHEMERAL_RANGE_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
PORTS_FILE = Path(tempfile.gettempdir()) / "rlhf_dist_ports"  # the node's counter (and its lock)


def rendezvous_host(ray_node_ip: str, env: Mapping[str, str]) -> str:
    """The address peers reach this node's rendezvous at: ``$RLHF_DIST_NODE_IP`` if set, else Ray's node IP."""
    override = env.get(NODE_IP_ENV, "").strip()
    if not override:
        return ray_node_ip
    try:
        ipaddress.ip_address(override)
    except ValueError:
        raise ValueError(f"{NODE_IP_ENV}={override!r}: not an IP address; set it to this node's address on the "
                         f"network the other nodes reach, or unset it for Ray's node IP {ray_node_ip}") from None
    return override


def port_range(ephemeral: tuple[int, int]) -> tuple[int, int]:
    """[low, high) of the ports handed out: from PORT_FLOOR to the ephemeral range, or above it when the
    ephemeral range leaves too little room below (a kernel configured to start it low)."""
    low, high = ephemeral
    if low - PORT_FLOOR >= 1000:
        return PORT_FLOOR, low
    if 65536 - (high + 1) >= 1000:
        return high + 1, 65536
    raise ValueError(f"{EPHEMERAL_RANGE_FILE}: the ephemeral range {low}-{high} leaves no 1000 ports outside it "
                     f"between {PORT_FLOOR} and 65535 for the process groups' rendezvous")


def next_port(last: int | None, ports: tuple[int, int], in_use: Callable[[int], bool]) -> int:
    """The first port after ``last`` (wrapping within ``ports`` = [low, high)) that is not ``in_use``."""
    low, high = ports
    span = high - low
    start = low if last is None or not low <= last < high else last + 1
    for k in range(span):
        port = low + (start - low + k) % span
        if not in_use(port):
            return port
    raise RuntimeError(f"no free port in {low}-{high - 1} for a rendezvous on this node")


def ephemeral_range(path: str = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    try:
        low, high = (int(x) for x in Path(path).read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def listening(port: int) -> bool:
    """Whether something on this node holds ``port`` (a bind to it fails)."""
    with socket.socket() as s:
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def reserve_port(counter: Path = PORTS_FILE) -> int:
    """A port for a rendezvous on this node (module docstring): the node's counter, advanced under its lock."""
    ports = port_range(ephemeral_range())
    with open(counter, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        text = f.read().strip()
        port = next_port(int(text) if text.isdigit() else None, ports, listening)
        f.seek(0)
        f.truncate()
        f.write(str(port))
    return port


def node_endpoint() -> tuple[str, int]:
    """This node's rendezvous address and a port reserved for it (for a rendezvous this process hosts)."""
    import ray

    return rendezvous_host(ray.util.get_node_ip_address(), os.environ), reserve_port()
