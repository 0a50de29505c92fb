"""Where a group's rendezvous listens (rlhf_dist.roles.endpoint): the address peers reach and a port no
one else takes before the rendezvous binds it."""

import threading

import pytest

from rlhf_dist.roles.endpoint import (
    NODE_IP_ENV,
    ephemeral_range,
    next_port,
    port_range,
    rendezvous_host,
    reserve_port,
)


def test_the_address_is_rays_node_ip_unless_the_node_names_its_own():
    assert rendezvous_host("10.0.0.7", {}) == "10.0.0.7"
    assert rendezvous_host("10.0.0.7", {NODE_IP_ENV: " 192.168.5.2 "}) == "192.168.5.2"  # the other NIC
    assert rendezvous_host("10.0.0.7", {NODE_IP_ENV: "fd00::5"}) == "fd00::5"
    with pytest.raises(ValueError, match=r"^RLHF_DIST_NODE_IP='eth1': not an IP address; set it to this node's "
                                         r"address on the network the other nodes reach, or unset it for Ray's node "
                                         r"IP 10.0.0.7$"):
        rendezvous_host("10.0.0.7", {NODE_IP_ENV: "eth1"})


def test_ports_come_from_outside_the_kernels_ephemeral_range():
    assert port_range((32768, 60999)) == (20000, 32768)  # Linux's default: below it
    assert port_range((20500, 50000)) == (50001, 65536)  # started low: above it
    with pytest.raises(ValueError, match="leaves no 1000 ports outside it"):
        port_range((20500, 65000))


def test_the_counter_hands_out_the_next_free_port_and_wraps():
    ports = (20000, 20005)
    assert next_port(None, ports, lambda p: False) == 20000
    assert next_port(20000, ports, lambda p: False) == 20001
    assert next_port(20001, ports, lambda p: p in (20002, 20003)) == 20004  # held by something else: skipped
    assert next_port(20004, ports, lambda p: False) == 20000  # wraps
    assert next_port(40000, ports, lambda p: False) == 20000  # a counter from another range starts over
    with pytest.raises(RuntimeError, match="no free port in 20000-20004"):
        next_port(None, ports, lambda p: True)


def test_groups_starting_at_once_on_a_node_get_distinct_ports(tmp_path):
    counter = tmp_path / "ports"
    got: list[int] = []
    lock = threading.Lock()

    def reserve() -> None:
        for _ in range(20):
            port = reserve_port(counter)
            with lock:
                got.append(port)

    threads = [threading.Thread(target=reserve) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 80 and len(set(got)) == 80  # no two the same
    low, high = port_range(ephemeral_range())  # this machine's
    assert all(low <= p < high for p in got)
