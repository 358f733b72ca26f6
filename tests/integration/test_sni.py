"""The TLS server name check (issue #13) with the real daemon, queue, conntrack and nftables: one
TLS edge address answering for two names with two certificates, both resolving to it; a client
of the tests' own that sends its ClientHello in two and three segments; real TLS handshakes."""

import contextlib
import json
import os
import socket
import ssl
import struct
import time

import pytest

from tests.lab.edge import EDGE4, EDGE6, Authority, Edge, add_addresses, greet
from tests.lab.sandbox import NET4
from tests.support import tls

MARK = 0x52410000
ALLOWED, OTHER = "edge-allowed.test", "edge-other.test"
FAMILIES = pytest.mark.parametrize("address", [EDGE4, EDGE6], ids=["ipv4", "ipv6"])


@pytest.fixture
def edge_lab(lab, write_config, write_policy, tmp_path):
    """The edge on 203.0.113.50 / 2001:db8::50 for both names; DNS gives both names that address;
    the daemon allows only the first. Its address is learned (the allowed name looked up) first."""
    return start_edge(lab, write_config, write_policy, tmp_path)


def start_edge(lab, write_config, write_policy, tmp_path, **enforcement):
    """``edge_lab``'s lab, with these enforcement settings."""
    add_addresses(lab)
    # each send() of the tests' client its own segment: no coalescing behind a segment held in the queue
    lab.vm.run("sysctl", "-qw", "net.ipv4.tcp_autocorking=0")
    lab.edge = Edge(lab.net, Authority(tmp_path / "edge"), [ALLOWED, OTHER])
    lab.servers.append(lab.edge)
    lab.start_dnsmasq(NET4, f"--host-record={ALLOWED},{EDGE4},{EDGE6}", f"--host-record={OTHER},{EDGE4},{EDGE6}")
    write_policy([ALLOWED])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', **enforcement)
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve(ALLOWED)
    lab.resolve(ALLOWED, "AAAA")
    return lab


def status(lab):
    return json.loads(lab.ramfw("status", "--json", "--config", lab.config).stdout)


def client(lab, address=EDGE4):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with lab.vm.inside():
        sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)  # the engine's mark: in scope
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # each send() its own segment
    sock.settimeout(3)
    sock.connect((address, 443))
    return sock


def send_in_pieces(lab, record, cuts, address=EDGE4):
    """Send ``record`` in segments cut at ``cuts``; "answered" (a TLS record came back), "reset"
    or "timeout"."""
    sock = client(lab, address)
    bounds = [0, *cuts, len(record)]
    try:
        for i in range(len(bounds) - 1):
            sock.send(record[bounds[i]:bounds[i + 1]])
            time.sleep(0.002)  # let each leave on its own
        first = sock.recv(1)
        return "answered" if first == b"\x16" else f"other {first!r}"
    except ConnectionResetError:
        return "reset"
    except (TimeoutError, socket.timeout):
        return "timeout"
    finally:
        sock.close()


def handshake(lab, name, address=EDGE4):
    """A real TLS client (Python's ssl) asking for ``name``: the edge's greeting, or the error."""
    return greeting(client(lab, address), name)


def greeting(sock, name, before=lambda: None):
    """The server's first line over TLS asking for ``name`` on ``sock`` (after ``before()``,
    which may return what to say instead), "reset", or the error; the socket is closed."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    try:
        said = before()
        if said is not None:
            return said
        with context.wrap_socket(sock, server_hostname=name) as conn:
            return conn.recv(100).decode().strip()
    except ConnectionResetError:
        return "reset"
    except (OSError, ssl.SSLError) as err:
        return f"error {err!r}"
    finally:
        sock.close()


def test_the_allowed_name_passes_and_the_other_name_at_the_same_address_is_reset(edge_lab):
    lab = edge_lab
    for address in (EDGE4, EDGE6):
        assert handshake(lab, ALLOWED, address) == f"hello from {ALLOWED}"
        start = time.monotonic()
        assert handshake(lab, OTHER, address) == "reset"
        assert time.monotonic() - start < 1, "refused at once, not timed out"
    result = status(lab)
    blocks = [b for b in result["recent_blocks"] if b["host"] == OTHER]
    assert {b["address"] for b in blocks} == {EDGE4, EDGE6}
    assert blocks[0]["message"] == (f"registry access to {OTHER} is not allowed (its TLS server name, at {EDGE4})")
    assert blocks[0]["reason"] == "not_allowlisted" and blocks[0]["transport"] == "tcp"
    assert blocks[0]["client"]["recorded"] and blocks[0]["client"]["pid"] == os.getpid(), "who asked, from the kernel"
    assert result["tls"]["state"] == "active" and result["tls"]["counters"]["refused"] == 2
    assert result["counters"]["tls_refused"] >= 2
    time.sleep(3.5)  # the allowed flows were acknowledged by the server (IPv4 and IPv6), not timed out
    result = status(lab)
    assert result["tls"]["counters"]["refused"] == 2 and result["tls"]["flows_waiting"] <= 4


def test_client_hellos_in_two_and_three_segments(edge_lab):
    lab = edge_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    n = len(allowed)
    cuts = sorted({1, 2, 4, 5, 6, 9, 10, 43, 44, 76, 77, n - 5, n - 1} | set(range(20, n, 61)))
    before = status(lab)["tls"]["counters"].get("segments", 0)
    for cut in cuts:
        assert send_in_pieces(lab, allowed, [cut]) == "answered", cut
        assert send_in_pieces(lab, other, [cut]) == "reset", cut
    pairs = [(a, b) for a in cuts for b in cuts if a < b][::5]
    for first, second in pairs:
        assert send_in_pieces(lab, allowed, [first, second]) == "answered", (first, second)
        assert send_in_pieces(lab, other, [first, second]) == "reset", (first, second)
    queued = status(lab)["tls"]["counters"]["segments"] - before
    assert queued == 2 * 2 * len(cuts) + 2 * 3 * len(pairs), "exactly the ClientHello's segments reach the daemon"


def test_what_cannot_be_checked_is_reset(edge_lab):
    lab = edge_lab
    allowed = tls.client_hello(ALLOWED)
    for what, record in (("no SNI", tls.client_hello(None)), ("ECH", tls.with_ech(allowed)),
                         ("plain HTTP", f"GET /v2/ HTTP/1.1\r\nHost: {ALLOWED}\r\n\r\n".encode()),
                         ("SSH", b"SSH-2.0-OpenSSH_9.2\r\n")):
        assert send_in_pieces(lab, record, []) == "reset", what
    messages = [b["message"] for b in status(lab)["recent_blocks"]]
    assert any("no server_name" in m for m in messages) and any("encrypted client hello" in m for m in messages)
    assert any("not TLS" in m for m in messages)


def test_quic_to_the_tls_port_is_refused(edge_lab):
    lab = edge_lab
    with lab.net.inside():
        server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((EDGE4, 443))
    server.settimeout(1)
    with lab.vm.inside():
        quic = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    quic.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    try:
        try:
            quic.sendto(b"\xc0\x00\x00\x00\x01" + bytes(1195), (EDGE4, 443))  # a QUIC Initial's first bytes
        except PermissionError:
            pass  # refused on the way out
        with pytest.raises(OSError):
            server.recv(2000)
    finally:
        server.close()
        quic.close()
    deadline = time.monotonic() + 3
    while not any("QUIC" in b["message"] for b in status(lab)["recent_blocks"]):
        assert time.monotonic() < deadline, "the refused QUIC packet is named"
        time.sleep(0.1)
    assert status(lab)["counters"]["quic_refused"] >= 1


def test_established_flows_never_reach_the_daemon(edge_lab):
    lab = edge_lab

    def echo_after_greeting(conn, name):
        conn.sendall(b"ready\n")
        while data := conn.recv(65536):
            conn.sendall(data)

    lab.edge.handler = echo_after_greeting
    before = status(lab)["tls"]["counters"].get("segments", 0)
    sock = client(lab)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(sock, server_hostname=ALLOWED) as conn:
        assert conn.recv(6) == b"ready\n"
        for _ in range(200):
            conn.sendall(b"x" * 3000)
            got = b""
            while len(got) < 3000:
                got += conn.recv(3000 - len(got))
    # its ClientHello (one segment here), and at times the client's next flight: it can overtake the
    # copy of the server's acknowledgment, which ends the check
    assert status(lab)["tls"]["counters"]["segments"] - before in (1, 2)


def test_without_a_daemon_flows_pass_on_their_address_and_status_says_so(edge_lab):
    lab = edge_lab
    lab.daemon.terminate()
    lab.daemon.wait(10)
    assert handshake(lab, OTHER) == f"hello from {OTHER}", "the queue's bypass: the address check alone"
    result = lab.ramfw("status", "--config", lab.config)
    assert "TLS server names are NOT checked" in result.stdout
    doctor = lab.ramfw("doctor", "--config", lab.config)
    assert "TLS server names: checked by a running daemon on TCP ports 443" in doctor.stdout


def test_check_off_by_setting(lab, write_config, write_policy, tmp_path):
    add_addresses(lab)
    lab.servers.append(Edge(lab.net, Authority(tmp_path / "edge"), [ALLOWED, OTHER]))
    lab.start_dnsmasq(NET4, f"--host-record={ALLOWED},{EDGE4}", f"--host-record={OTHER},{EDGE4}")
    write_policy([ALLOWED])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', tls_check=False)
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve(ALLOWED)
    assert handshake(lab, OTHER) == f"hello from {OTHER}"
    assert "TLS server names: off" in " ".join(status(lab)["notes"])
    assert "jump tls" not in lab.vm.run("nft", "list", "chain", "inet", "ramfw", "output").stdout


def test_through_a_proxy_the_connect_host_and_the_tunnels_server_name_are_checked(lab, write_config, write_policy,
                                                                                 tmp_path):
    from tests.lab.edge import PROXY4, ConnectProxy

    add_addresses(lab, (EDGE4, PROXY4))
    lab.vm.run("sysctl", "-qw", "net.ipv4.tcp_autocorking=0")
    lab.servers += [Edge(lab.net, Authority(tmp_path / "edge"), [ALLOWED, OTHER], addresses=(EDGE4,)),
                    ConnectProxy(lab.net, lambda host: EDGE4)]
    lab.start_dnsmasq(NET4, f"--host-record={ALLOWED},{EDGE4}")
    write_policy([ALLOWED])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', proxies=[f"{PROXY4}:3128"])
    lab.daemon = lab.start_daemon(lab.config)

    def through(connect_to, server_name, request=None):
        with lab.vm.inside():
            sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
        sock.settimeout(3)

        def connect():
            sock.connect((PROXY4, 3128))
            sock.sendall(request or f"CONNECT {connect_to}:443 HTTP/1.1\r\nHost: {connect_to}:443\r\n\r\n".encode())
            answer = sock.recv(100)
            return None if answer.startswith(b"HTTP/1.1 200") else f"proxy said {answer!r}"
        return greeting(sock, server_name, connect)

    assert through(ALLOWED, ALLOWED) == f"hello from {ALLOWED}", "no lookup needed: the proxy resolves"
    assert through(OTHER, OTHER) == "reset"
    assert through(ALLOWED, OTHER) == "reset", "the tunnel's server name must be under the CONNECT host's entry"
    assert through("", "", request=f"GET http://{ALLOWED}/v2/ HTTP/1.1\r\nHost: {ALLOWED}\r\n\r\n".encode()) == "reset"
    assert through("", "", request=b"CONNECT 203.0.113.50:443 HTTP/1.1\r\n\r\n") == "reset"
    messages = [b["message"] for b in status(lab)["recent_blocks"]]
    assert f"registry access to {OTHER} is not allowed (CONNECT through the proxy {PROXY4})" in messages
    assert any("through a CONNECT tunnel" in m and OTHER in m for m in messages)
    assert any("not an HTTP CONNECT request" in m for m in messages)


def test_a_connection_made_while_no_daemon_ran_keeps_working_when_one_starts(edge_lab):
    """It passed on its address (the bypass); a new daemon never saw its SYN, so it clears its
    mark rather than reset it at its next segment."""
    lab = edge_lab

    def echo(conn, name):
        conn.sendall(f"{name}\n".encode())
        while data := conn.recv(65536):
            conn.sendall(data)

    lab.edge.handler = echo
    lab.daemon.terminate()
    lab.daemon.wait(10)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with context.wrap_socket(client(lab), server_hostname=OTHER) as conn:
        assert conn.recv(100) == f"{OTHER}\n".encode()
        lab.daemon = lab.start_daemon(lab.config)
        conn.sendall(b"ping")
        assert conn.recv(4) == b"ping"
    assert status(lab)["tls"]["counters"]["unchecked_at_start"] >= 1
    lab.edge.handler = lambda conn, name: conn.sendall(b"hello\n")
    assert handshake(lab, OTHER) == "reset", "new connections are checked again"


def raw_flow(lab, address=EDGE4):
    from tests.lab.rawtcp import RawFlow
    from tests.lab.sandbox import VM4, VM6

    flow = RawFlow(lab.vm, VM6 if ":" in address else VM4, address, mark=MARK)
    flow.handshake()
    return flow


def forget_flow(lab, flow):
    """Take the flow out of conntrack (as its expiry or a full table would): its next segment is
    picked up mid-stream as a new flow, without a SYN."""
    from ramfw.kernel import conntrack, netlink

    message = netlink.message((conntrack.NFNL_SUBSYS_CTNETLINK << 8) | 2, netlink.NLM_F_REQUEST | netlink.NLM_F_ACK,
                              1, flow.family, 0, conntrack._tuple(conntrack.CTA_TUPLE_REPLY, flow.dst, 443, flow.src,
                                                                  flow.sport))
    with lab.vm.inside():
        sock = netlink.open_socket()
    with sock:
        sock.send(message)
        netlink.wait_acks(sock, 1, "deleting a conntrack entry")


@FAMILIES
def test_a_hostile_client_of_raw_segments_cannot_show_one_name_and_send_another(edge_lab, address):
    """Segments out of order pass; overlaps that disagree, a cover copy with a bad checksum (the
    server's TCP drops it), a segment after conntrack lost the flow, and a reset not at the next
    byte (the server ignores it; this kernel's conntrack does too, older ones did not) do not let
    the other name reach the edge."""
    lab = edge_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    flow = raw_flow(lab, address)
    for start, end in ((300, len(allowed)), (0, 120), (120, 300)):
        flow.send(start, allowed[start:end])
    assert flow.outcome() == "answered" and lab.edge.asked == [ALLOWED], "out of order, read whole"
    flow.close()
    flow = raw_flow(lab, address)  # the real name sent over a cover that disagrees with it
    flow.send(5, allowed[5:200])
    flow.send(0, other)
    assert flow.outcome() == "reset"
    flow.close()
    flow = raw_flow(lab, address)  # a cover the server's TCP would drop for its checksum, then the real one once judged
    flow.send(0, allowed, good=False)
    time.sleep(0.2)
    flow.send(0, other)
    assert flow.outcome() in ("nothing", "reset")
    flow.close()
    flow = raw_flow(lab, address)  # conntrack loses the flow: its next segment would be a new flow without a SYN
    forget_flow(lab, flow)
    flow.send(0, other)
    assert flow.outcome() == "nothing"
    flow.close()
    for kind in ("ack", "urgent"):
        flow = raw_flow(lab, address)  # a cover the server does not take as the stream (it acknowledges data never
        cover = {"ack": flow.ack + 100_000} if kind == "ack" else {"urgent": True}  # sent, or is urgent),
        flow.send(0, allowed, **cover)  # then the real name
        time.sleep(0.3)
        flow.send(0, other)
        assert flow.outcome() == "reset", cover
        flow.close()
    flow = raw_flow(lab, address)  # a cover alone, which the server never acknowledges: refused after 3 s
    flow.send(0, allowed, ack=flow.ack + 100_000)
    time.sleep(4.5)
    flow.send(0, other)
    assert flow.outcome() == "reset"
    flow.close()
    flow = raw_flow(lab, address)  # a reset conntrack takes, the server not (not at its next byte), then the name
    flow.reset(100)
    time.sleep(0.05)
    flow.send(0, other)
    assert flow.outcome() in ("nothing", "reset")
    flow.close()
    time.sleep(0.5)
    assert OTHER not in lab.edge.asked, lab.edge.asked
    messages = [b["message"] for b in status(lab)["recent_blocks"]]
    assert any("overlapping segments disagree" in m for m in messages)


def test_containers_scope_checks_forwarded_flows_too(lab, write_config, write_policy, tmp_path):
    """A container's connection is judged in the forward hook, where the server's packets pass
    too: they are copied (its acknowledgment ends the check), never queued."""
    add_addresses(lab, (EDGE4,))
    container = lab.add_container()
    lab.servers.append(Edge(lab.net, Authority(tmp_path / "edge"), [ALLOWED, OTHER], addresses=(EDGE4,),
                            handler=lambda conn, name: (conn.sendall(f"{name}\n".encode()), conn.recv(10),
                                                        conn.sendall(b"x" * 20000))))
    lab.start_dnsmasq(NET4, f"--host-record={ALLOWED},{EDGE4}", f"--host-record={OTHER},{EDGE4}")
    write_policy([ALLOWED])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["containers"], registry_ports=[443])
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve(ALLOWED, source=container)

    def from_container(name):
        with container.inside():
            sock = socket.create_connection((EDGE4, 443), timeout=3)
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        try:
            with context.wrap_socket(sock, server_hostname=name) as conn:
                first = conn.recv(100).decode().strip()
                conn.sendall(b"more")
                got = 0
                while got < 20000 and (data := conn.recv(65536)):
                    got += len(data)
                return first, got
        except ConnectionResetError:
            return "reset", 0
        finally:
            sock.close()

    before = status(lab)["tls"]["counters"]
    assert from_container(ALLOWED) == (ALLOWED, 20000)
    assert from_container(OTHER) == ("reset", 0)
    after = status(lab)["tls"]["counters"]
    assert after["allowed"] - before.get("allowed", 0) == 1 and after["refused"] - before.get("refused", 0) == 1
    assert after["segments"] - before.get("segments", 0) <= 4, "the server's 20 kB were not queued"


def reset_by_the_server(conn, name):
    """The edge's handler for the allowed name: read the client's request, then close with a
    reset (unread data and a zero linger); conntrack keeps the entry, established, its mark cleared."""
    if name != ALLOWED:
        greet(conn, name)
        return
    conn.recv(10)
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def from_port(lab, port: int, name: str, address: str = EDGE4) -> ssl.SSLSocket:
    """A TLS connection asking for ``name`` from the vm's source port ``port`` (bound again at once)."""
    with lab.vm.inside():
        sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.settimeout(3)
    sock.bind(("::" if ":" in address else "0.0.0.0", port))
    sock.connect((address, 443))
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context.wrap_socket(sock, server_hostname=name)


@FAMILIES
def test_a_refusal_leaves_its_source_port_free_for_the_next_connection(edge_lab, address):
    """Review: a refused flow's entry stayed with the refused mark while packets refreshed it, and
    every new connection from that source port was reset: a user refused from each port in turn
    would refuse the engine those ports too."""
    lab = edge_lab
    with pytest.raises(OSError):
        from_port(lab, 41002, OTHER, address).recv(100)
    time.sleep(0.3)
    for _ in range(2):
        with from_port(lab, 41002, ALLOWED, address) as conn:
            assert conn.recv(100).decode().strip() == f"hello from {ALLOWED}"
        time.sleep(0.3)


@FAMILIES
def test_a_tuple_used_again_after_the_server_reset_it_is_checked_anew(lab, write_config, write_policy, tmp_path,
                                                                     address):
    """Review: the server's reset leaves conntrack's entry established with the mark the allowed
    flight cleared; a new connection from the same port asking for the other name was tracked as
    established and never read. A bare SYN on such an entry is now judged as a new connection."""
    add_addresses(lab)
    lab.servers.append(Edge(lab.net, Authority(tmp_path / "edge"), [ALLOWED, OTHER], handler=reset_by_the_server))
    lab.start_dnsmasq(NET4, f"--host-record={ALLOWED},{EDGE4},{EDGE6}", f"--host-record={OTHER},{EDGE4},{EDGE6}")
    write_policy([ALLOWED])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve(ALLOWED, "AAAA" if ":" in address else "A")

    first = from_port(lab, 41000, ALLOWED, address)
    time.sleep(0.3)  # the server's acknowledgment seen: the mark cleared
    first.send(b"GET\n")
    with contextlib.suppress(OSError):
        first.recv(100)  # reset by the server
    first.close()
    time.sleep(0.2)
    with pytest.raises((ConnectionResetError, ssl.SSLError, OSError)):
        second = from_port(lab, 41000, OTHER, address)
        second.recv(100)
    assert status(lab)["tls"]["counters"]["syns"] == 2, "the second SYN was copied: its flow read from its first byte"
    assert status(lab)["tls"]["counters"]["refused"] == 1


def forged_server_ack(lab, flow, ack: int) -> None:
    """What the server would send acknowledging ``ack``, forged by the client itself (a raw
    socket: CAP_NET_RAW) with a bad checksum, so that the local TCP drops it."""
    from tests.lab.rawtcp import ACK, ip4, ip6, with_checksum

    tcp = struct.pack("!HHIIBBHHH", 443, flow.sport, flow.ack & 0xFFFFFFFF, ack & 0xFFFFFFFF, 5 << 4, ACK, 65000, 0, 0)
    tcp = with_checksum(flow.dst, flow.src, tcp, good=False)
    with lab.vm.inside():
        raw = socket.socket(flow.family, socket.SOCK_RAW, socket.IPPROTO_RAW)
    with contextlib.suppress(PermissionError), raw:
        raw.sendto((ip6 if ":" in flow.dst else ip4)(flow.dst, flow.src, tcp), (flow.src, 0))


def send_with_md5_option(flow, payload: bytes) -> None:
    """A first flight with a TCP MD5 signature option: a server with no key for it drops it."""
    from tests.lab.rawtcp import ACK, PSH

    md5 = bytes([19, 18]) + bytes(16) + bytes([1, 1])
    flow._send(flow.packet(flow.isn + 1, PSH | ACK, payload, extra=md5))


@FAMILIES
def test_a_server_acknowledgment_forged_on_the_vm_does_not_end_the_check(edge_lab, address):
    """Review: a cover ClientHello the server drops (a TCP MD5 option it has no key for), then an
    acknowledgment of it forged locally in the server's name (dropped by the local TCP for its
    checksum, but copied in the output hook) cleared the mark, and the other name went through."""
    lab = edge_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    flow = raw_flow(lab, address)
    send_with_md5_option(flow, allowed)
    time.sleep(0.2)
    forged_server_ack(lab, flow, flow.isn + 1 + len(allowed))
    time.sleep(0.2)
    flow.send(0, other)
    assert flow.outcome() in ("nothing", "reset") and OTHER not in lab.edge.asked, lab.edge.asked
    flow.close()


FOREIGN = "ctmark-writer"  # wg-quick's rule: the packet mark saved into the conntrack mark, every bit of it


def first_line(lab, wanted, wait: float = 10.0):
    """``ramfw status``'s first line and exit code, once ``wanted(line)`` (the daemon reads the
    ruleset again within a second of a change, at most every 5 s)."""
    deadline = time.monotonic() + wait
    while True:
        result = lab.ramfw("status", "--config", lab.config)
        line = result.stdout.splitlines()[0]
        if wanted(line) or time.monotonic() > deadline:
            return line, result.returncode
        time.sleep(0.2)


def test_another_tables_write_of_the_checks_mark_bits_is_said_first_until_it_goes(edge_lab):
    lab = edge_lab
    assert "no other table writes the check's conntrack mark bits (0x300)" in lab.ramfw(
        "doctor", "--config", lab.config).stdout
    lab.vm.run("nft", "-f", "-", input=f"table ip {FOREIGN} {{ chain out {{ type route hook output priority "
                                        "mangle; ct mark set meta mark; }; }")
    writer = f"table ip {FOREIGN} chain out rule handle 2 (ct mark set meta mark)"
    line, code = first_line(lab, lambda line: "NOT" in line)
    assert code == 8 and line.startswith("ramfw is enforcing in enforce mode, but NOT as configured: TLS server names "
                                         "NOT reliably checked: another table may change the conntrack mark bits "
                                         f"the check keeps a flow's state in (0x300): {writer}; "), line
    assert status(lab)["tls"]["mark_writers"] == [writer]
    doctor = lab.ramfw("doctor", "--config", lab.config).stdout
    assert "TLS server names may NOT be checked: rules of other tables may change the conntrack mark bits" in doctor
    assert f"\n  {writer}\n" in doctor and "move enforcement.tls_ct_mark to a free bit" in doctor
    # why it is said: the other name's ClientHello is never read (its flow's bit is cleared) and passes
    assert handshake(lab, OTHER) == f"hello from {OTHER}"
    lab.vm.run("nft", "add", "table", "ip", "unrelated")  # a change that does not add a writer: said once only
    time.sleep(6)
    lab.daemon.log.seek(0)
    assert lab.daemon.log.read().decode().count("WARNING: TLS server names NOT reliably checked") == 1
    lab.vm.run("nft", "delete", "table", "ip", FOREIGN)
    line, code = first_line(lab, lambda line: "NOT" not in line)
    assert (line, code) == ("ramfw is enforcing in enforce mode", 0)
    assert status(lab)["tls"]["state"] == "active" and handshake(lab, OTHER) == "reset"
    lab.daemon.log.seek(0)
    assert "no other table writes its conntrack mark bits any more" in lab.daemon.log.read().decode()
