"""A blocked peer that sends first (issue #8, 3): the kernel tracks the flow with the peer's side
as the original direction, so our packets are its reply direction, which the established rule
accepted before any scope check. A container (or the VM) could so reach a blocked registry: by
a simultaneous open (its SYN answers the peer's), or by UDP. What is decided: in-scope packets
of a flow the peer opened are judged like new ones when they are a bare SYN, or UDP to a
registry port; inbound services on the VM answer as before."""

import errno
import socket
import time

from tests.lab.sandbox import BLOCKED4, CONTAINER4, NET4, VM4, TcpServers

DROP_FROM_BLOCKED = f"table ip lab {{\n chain input {{\n type filter hook input priority 0;\n ip saddr {BLOCKED4} drop\n }}\n}}\n"


def start(lab, write_config, write_policy, scope):
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=scope, registry_ports=[443, 5000])
    lab.daemon = lab.start_daemon(config)


def test_a_container_cannot_reach_a_blocked_registry_by_a_simultaneous_open(lab, write_config, write_policy):
    container = lab.add_container()
    start(lab, write_config, write_policy, ["engine", "containers"])
    container.run("nft", "-f", "-", input=DROP_FROM_BLOCKED)  # the container stays silent to the peer's SYN
    with lab.net.inside():
        peer = socket.socket()
    peer.setblocking(False)
    peer.bind((BLOCKED4, 5000))
    assert peer.connect_ex((CONTAINER4, 40000)) == errno.EINPROGRESS  # the peer's SYN: tracked as its flow
    time.sleep(0.2)
    container.run("nft", "delete", "table", "ip", "lab")
    try:
        with container.inside():
            client = socket.socket()
        client.bind((CONTAINER4, 40000))
        client.settimeout(3)
        outcome = "connected"
        try:
            client.connect((BLOCKED4, 5000))  # a SYN in the flow's reply direction
        except ConnectionRefusedError:
            outcome = "refused"
        client.close()
    finally:
        peer.close()
    assert outcome == "refused"
    assert lab.connect(BLOCKED4, 5000, source=container)[0] == "refused", "and a plain connection, as before"


def test_udp_to_a_peer_that_sent_first_from_a_registry_port_is_refused_in_scope(lab, write_config, write_policy):
    start(lab, write_config, write_policy, ["host"])
    with lab.net.inside():
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind((BLOCKED4, 443))
    peer.settimeout(1)
    with lab.vm.inside():
        local = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    local.bind((VM4, 40001))
    try:
        peer.sendto(b"hello from the peer", (VM4, 40001))
        assert local.recv(64) == b"hello from the peer"
        try:
            local.sendto(b"an answer", (BLOCKED4, 443))  # QUIC to a blocked registry, say
        except PermissionError:
            pass  # refused on the way out: what a local sender sees of a reject in the output hook
        try:
            got = peer.recv(64)
        except (TimeoutError, socket.timeout):
            got = None
        assert got is None
    finally:
        peer.close()
        local.close()


def test_inbound_services_on_the_vm_answer_as_before(lab, write_config, write_policy):
    lab.servers.append(TcpServers(lab.vm, [VM4], [443, 8080]))
    start(lab, write_config, write_policy, ["engine", "host", "containers"])
    for port in (443, 8080):
        assert lab.connect(VM4, port, source=lab.net)[0] == "connected"
