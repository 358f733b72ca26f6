"""Only the real resolver teaches (issue #8, 1): a DNS reply that answers no query this VM (or
a container it forwards for) sent is counted and passes unread, however it was made: sent from
the resolver's own address without a query, or forged with the resolver's address from a
container behind the VM (root in a container keeps CAP_NET_RAW), to the VM or to a host the
VM forwards to, IPv4 and IPv6."""

import json
import socket
import struct
import time

import dns.message
import dns.rrset
import pytest

from tests.lab.sandbox import ALLOWED4, ALLOWED6, BLOCKED4, BLOCKED6, CDN4, NET4, NET6, VM4, VM6

MARK = 0x52410000


def reply(name: str, rdtype: str, address: str) -> bytes:
    message = dns.message.make_response(dns.message.make_query(name, rdtype))
    message.answer.append(dns.rrset.from_text(name + ".", 300, "IN", rdtype, address))
    return message.to_wire()


def checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF or 0xFFFF


def forged_udp(src: str, dst: str, payload: bytes, sport: int = 53, dport: int = 40000) -> bytes:
    """A whole IP packet (header onwards) from ``src``:53, as a raw socket sends it."""
    family = socket.AF_INET6 if ":" in src else socket.AF_INET
    s, d = socket.inet_pton(family, src), socket.inet_pton(family, dst)
    length = 8 + len(payload)
    if family == socket.AF_INET:
        udp = struct.pack("!HHHH", sport, dport, length, 0) + payload  # no checksum: allowed over IPv4
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, 17, 0, s, d) + udp
    pseudo = s + d + struct.pack("!IxxxB", length, 17)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    udp = udp[:6] + struct.pack("!H", checksum(pseudo + udp)) + udp[8:]
    return struct.pack("!IHBB", 6 << 28, length, 17, 64) + s + d + udp


def forged_syn(src: str, dst: str, sport: int, dport: int = 443) -> bytes:
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, 20)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
    tcp = tcp[:16] + struct.pack("!H", checksum(pseudo + tcp)) + tcp[18:]
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 0, 0, 64, 6, 0, socket.inet_aton(src),
                       socket.inet_aton(dst)) + tcp


def send_raw(ns, packet: bytes, dst: str) -> None:
    with ns.inside():
        if ":" in dst:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)  # header included
            sock.sendto(packet, (dst, 0))
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            sock.sendto(packet, (dst, 0))
        sock.close()


@pytest.fixture(params=["kernel pairs", "daemon pairs"])
def forge_lab(lab, write_config, write_policy, request):
    """The daemon in the lab, pairing UDP replies with queries in the kernel (the prefilter's
    pairing) or itself (the prefilter off: from copies of the queries)."""
    lab.serve_tcp([CDN4, BLOCKED4, ALLOWED4, BLOCKED6, ALLOWED6], [443])
    lab.container = lab.add_container()
    write_policy(["allowed-registry.test"])
    prefilter = "true" if request.param == "kernel pairs" else "false"
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}", "{NET6}"]\nprefilter = {prefilter}\n',
                              scope=["engine", "containers"], registry_ports=[443])
    lab.daemon = lab.start_daemon(lab.config)
    lab.kernel_pairs = "in the kernel" in json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)[
        "dns_hold"]
    if request.param == "kernel pairs" and not lab.kernel_pairs:
        pytest.skip("this kernel cannot pair in eBPF (doctor: dns_pairing)")
    return lab


def unsolicited(lab) -> int:
    return json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)["counters"].get("unsolicited", 0)


def settle(lab, before: int, expected: int) -> None:
    deadline = time.monotonic() + 3
    while unsolicited(lab) < before + expected:
        assert time.monotonic() < deadline, f"{unsolicited(lab) - before} of {expected} counted as unsolicited"
        time.sleep(0.05)


def test_a_reply_from_the_resolvers_address_that_answers_no_query_teaches_nothing(forge_lab):
    """One UDP packet from <resolver>:53 to the VM's port 9, no query ever sent, opened the
    address it named."""
    lab = forge_lab
    before = unsolicited(lab)
    for source, target, rdtype, opened in ((NET4, VM4, "A", CDN4), (NET6, VM6, "AAAA", BLOCKED6)):
        with lab.net.inside():
            sock = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((source, 53))
        sock.sendto(reply("allowed-registry.test", rdtype, opened), (target, 9))
        sock.close()
    settle(lab, before, 2)
    assert lab.connect(CDN4, mark=MARK)[0] == "refused"
    assert lab.connect(BLOCKED6, mark=MARK)[0] == "refused"


def test_replies_forged_from_a_container_teach_nothing_to_the_vm_or_forwarded(forge_lab):
    """Root in a container behind the VM forges the resolver's address, to the VM itself (input)
    and to a host the VM forwards to (forward); IPv4 was stopped only by rp_filter=1, IPv6 never."""
    lab = forge_lab
    before = unsolicited(lab)
    forged = [(NET4, VM4, "A", BLOCKED4), (NET4, ALLOWED4, "A", BLOCKED4),
              (NET6, VM6, "AAAA", BLOCKED6), (NET6, ALLOWED6, "AAAA", BLOCKED6)]
    for source, target, rdtype, opened in forged:
        send_raw(lab.container, forged_udp(source, target, reply("allowed-registry.test", rdtype, opened)), target)
    settle(lab, before, 2)  # those to the VM; those forwarded are dropped on the way by the route check too
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert lab.connect(BLOCKED6, mark=MARK)[0] == "refused"
    assert lab.connect(BLOCKED4, source=lab.container)[0] == "refused"


def test_real_replies_still_teach_to_the_vm_and_to_a_container(forge_lab):
    lab = forge_lab
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4},{ALLOWED6}")
    for source in (lab.vm, lab.container):
        for rdtype in ("A", "AAAA"):
            answer = lab.resolve("allowed-registry.test", rdtype, source=source)
            assert answer.answer, (source, rdtype)
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert lab.connect(ALLOWED6, mark=MARK)[0] == "connected"
    assert lab.connect(ALLOWED4, source=lab.container)[0] == "connected"


STUB = """
import os, socket, sys
import dns.message, dns.rrset
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.11", 53))
os.setuid(65534)  # an unprivileged user, once the port is bound (as a lowered ip_unprivileged_port_start allows)
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(512)
    reply = dns.message.make_response(dns.message.from_wire(data))
    reply.answer.append(dns.rrset.from_text(reply.question[0].name, 300, "IN", "A", sys.argv[1]))
    s.sendto(reply.to_wire(), peer)
"""


def test_a_well_known_stub_address_is_not_trusted_unless_resolv_conf_names_it(lab, write_config, write_policy,
                                                                             tmp_path):
    """Issue #8, 2: 127.0.0.53, 127.0.0.11, 10.255.255.254 and 127.0.0.42 were trusted whatever
    resolv.conf said: a local user's server on 127.0.0.11:53 taught the daemon."""
    import subprocess
    import sys

    lab.serve_tcp([CDN4], [443])
    write_policy(["allowed-registry.test"])
    (tmp_path / "resolv.conf").write_text(f"nameserver {NET4}\n")
    config = write_config()  # no dns.trusted_resolvers: the default
    hide = f'mount --bind {tmp_path / "resolv.conf"} /etc/resolv.conf && exec "$@"'
    lab.daemon = lab.start_daemon(config, prefix=("unshare", "-m", "--propagation", "private", "sh", "-c", hide, "sh"))
    stub = lab.vm.popen(sys.executable, "-c", STUB, CDN4, stdout=subprocess.PIPE)
    lab.processes.append(stub)
    assert stub.stdout.readline() == b"ready\n"
    assert lab.resolve("allowed-registry.test", server="127.0.0.11").answer
    assert lab.connect(CDN4, mark=MARK)[0] == "refused"
    result = json.loads(lab.ramfw("status", "--json", "--config", config).stdout)
    assert result["trusted_resolvers"] == [NET4] and result["trusted_from"] == "/etc/resolv.conf"


def forge_from(lab, source: str, target: tuple, wire: bytes) -> None:
    with lab.net.inside():
        sock = socket.socket(socket.AF_INET6 if ":" in source else socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((source, 53))
    sock.sendto(wire, target)
    sock.close()


def read(lab) -> int:
    """Replies the daemon has read: held, or copied (where the kernel pairs, one that answers
    no query is not held but copied)."""
    counters = json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)["counters"]
    return counters.get("held", 0) + counters.get("copied", 0)


def test_a_reply_teaches_only_if_it_answers_the_query_by_port_id_and_question(forge_lab):
    """Conntrack lets any reply to a query's port in for 30 s after it (and before its answer):
    a second reply sent after the real one, or one raced in with a guessed port, taught what it
    said. Now a UDP reply teaches only if it answers an outstanding query of the VM: its port,
    its resolver, its ID and its question, once."""
    lab = forge_lab
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}")
    # The real answer teaches; a second "answer" to the same query, from the resolver's address, does not.
    with lab.vm.inside():
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.settimeout(3)
    query = dns.message.make_query("allowed-registry.test", "A")
    client.sendto(query.to_wire(), (NET4, 53))
    assert dns.message.from_wire(client.recv(512)).answer
    port = client.getsockname()[1]
    second = dns.message.make_response(query)
    second.answer.append(dns.rrset.from_text("allowed-registry.test.", 300, "IN", "A", CDN4))
    count = read(lab)
    forge_from(lab, NET4, (VM4, port), second.to_wire())
    assert dns.message.from_wire(client.recv(512)).answer[0][0].address == CDN4  # it reached the client
    assert read(lab) > count  # and was read by the daemon
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    assert lab.connect(CDN4, mark=MARK)[0] == "refused"
    client.close()
    # A query no server answers (nothing listens on the IPv6 resolver): a reply with another ID,
    # or for another question, teaches nothing; the one with its ID and question does.
    with lab.vm.inside():
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    query = dns.message.make_query("allowed-registry.test", "AAAA")
    client.sendto(query.to_wire(), (NET6, 53))
    port = client.getsockname()[1]
    wrong_id = dns.message.make_response(query)
    wrong_id.id = (query.id + 1) & 0xFFFF
    wrong_question = dns.message.make_response(dns.message.make_query("other.allowed-registry.test", "AAAA"))
    wrong_question.id = query.id
    right = dns.message.make_response(query)
    for message, address in ((wrong_id, BLOCKED6), (wrong_question, BLOCKED6), (right, ALLOWED6)):
        message.answer.append(dns.rrset.from_text(message.question[0].name, 300, "IN", "AAAA", address))
        forge_from(lab, NET6, (VM6, port), message.to_wire())
        time.sleep(0.2)
    client.close()
    counters = json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)["counters"]
    assert lab.connect(BLOCKED6, mark=MARK)[0] == "refused"
    assert lab.connect(ALLOWED6, mark=MARK)[0] == "connected", str(sorted(counters.items()))
    assert counters["unmatched"] == 3 and counters["queries"] >= 2
    status = json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)
    if lab.kernel_pairs:
        assert status["dns_hold"].endswith("UDP replies paired with their queries in the kernel")
        assert counters["paired"] >= 1 and counters.get("copied", 0) < 10  # no copy of a query was read
