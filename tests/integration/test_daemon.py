"""The daemon with a real queue, real nftables and a real DNS server (dnsmasq) on test hosts."""

import contextlib
import ipaddress
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import dns.flags
import dns.message
import dns.rrset
import pytest

from ramfw import config as config_mod
from ramfw.kernel.table import Table
from tests.integration.test_engine_mark import run_in
from tests.lab.sandbox import ALLOWED4, ALLOWED6, BLOCKED4, CDN4, NET4, NET6, ROGUE_DNS4

MARK = 0x52410000
POLICY = ["allowed-registry.test", "chained-registry.test", "big-registry.test", "split-registry.test"]


@pytest.fixture
def daemon_lab(lab, write_config, write_policy, tmp_path):
    """dnsmasq on 203.0.113.2, servers on the test hosts, a config trusting that resolver."""
    lab.serve_tcp([ALLOWED4, BLOCKED4, CDN4, ALLOWED6], [443])
    big = [f"--host-record=big-registry.test,203.0.113.{i}" for i in range(100, 160)]
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4},{ALLOWED6}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}",
                      "--cname=chained-registry.test,edge.cdn-provider.test",
                      f"--host-record=edge.cdn-provider.test,{CDN4}",
                      *big, f"--host-record=big-registry.test,{ALLOWED4}", ttl=300)
    write_policy(POLICY)
    # Unowned: ``forget`` takes addresses out of the allowed sets from the test process, which an
    # owned table refuses (test_ownership covers the owned table).
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}", "{NET6}", "127.0.0.53"]\n', table_owner=False)
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve("warm-up.test")  # first use of dnspython in this process
    return lab


def status(lab, config=None):
    result = lab.ramfw("status", "--json", "--config", config or lab.config)
    return json.loads(result.stdout)


def forget(lab, *addresses):
    with lab.vm.inside():
        Table("ramfw").delete_elements(addresses)


def address_of(reply):
    return next(r.address for rrset in reply.answer for r in rrset if hasattr(r, "address"))


def test_resolve_then_connect_at_once_never_fails(daemon_lab):
    lab = daemon_lab
    failures = []
    for i in range(1000):
        forget(lab, ALLOWED4)
        address = address_of(lab.resolve("allowed-registry.test"))
        outcome, _ = lab.connect(address, mark=MARK)
        if outcome != "connected":
            failures.append((i, outcome))
    assert failures == []
    assert status(lab)["counters"]["blocked"] == 0


def test_blocked_name_is_refused_and_named_in_status(daemon_lab):
    lab = daemon_lab
    address = address_of(lab.resolve("blocked-registry.test"))
    outcome, seconds = lab.connect(address, mark=MARK)
    assert outcome == "refused" and seconds < 0.5
    deadline = time.monotonic() + 3
    while not status(lab)["recent_blocks"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    result = status(lab)
    assert result["recent_blocks"][-1]["message"] == "registry access to blocked-registry.test is not allowed"
    text = lab.ramfw("status", "--config", lab.config).stdout
    assert "registry access to blocked-registry.test is not allowed" in text
    assert ("to allow:   ask your administrators to add blocked-registry.test to your organization's allowed "
            "registries") in text


def test_a_flood_of_blocked_connections_is_counted_whole_and_named_at_a_bounded_rate(daemon_lab):
    """Issue #10, 4: every blocked packet went to the daemon whole, with no limit."""
    lab = daemon_lab
    before = status(lab)["counters"]
    start = time.monotonic()
    for _ in range(600):
        assert lab.connect(BLOCKED4, mark=MARK, timeout=1)[0] == "refused"
    seconds = time.monotonic() - start
    time.sleep(0.3)
    after = status(lab)["counters"]
    assert after["blocked"] - before["blocked"] >= 600
    assert after.get("blocks_named", 0) - before.get("blocks_named", 0) <= 100 + 50 * (seconds + 1)


def test_cname_chain_to_a_cdn_name(daemon_lab):
    lab = daemon_lab
    reply = lab.resolve("chained-registry.test")
    assert address_of(reply) == CDN4
    assert lab.connect(CDN4, mark=MARK)[0] == "connected"
    learned = status(lab)["learned"]["chained-registry.test"]
    assert [i["address"] for i in learned] == [CDN4]


def test_aaaa(daemon_lab):
    lab = daemon_lab
    assert address_of(lab.resolve("allowed-registry.test", "AAAA")) == ALLOWED6
    assert lab.connect(ALLOWED6, mark=MARK)[0] == "connected"


def test_large_answer_truncated_over_udp_and_whole_over_tcp(daemon_lab):
    lab = daemon_lab
    udp = lab.resolve("big-registry.test")
    assert udp.flags & dns.flags.TC
    tcp = lab.resolve("big-registry.test", tcp=True)
    assert len(tcp.answer[0]) == 61
    learned = {i["address"] for i in status(lab)["learned"]["big-registry.test"]}
    assert ALLOWED4 in learned and len(learned) == 61
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


@contextlib.contextmanager
def tcp_dns_server(lab, answer, send):
    """A DNS server on the trusted NET6, port 53, for one query over TCP: it answers with the
    rrsets ``answer(qname)`` and writes the framed reply with ``send(conn, framed)``."""
    with lab.net.inside():
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((NET6, 53))
    listener.listen(1)
    listener.settimeout(10)

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            length = struct.unpack("!H", conn.recv(2))[0]
            query = dns.message.from_wire(conn.recv(length))
            reply = dns.message.make_response(query)
            reply.answer += answer(query.question[0].name)
            wire = reply.to_wire()
            send(conn, struct.pack("!H", len(wire)) + wire)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield
    finally:
        thread.join(15)
        listener.close()


def a_record(address):
    return lambda qname: [dns.rrset.from_text(qname, 300, "IN", "A", address)]


def test_tcp_reply_split_across_segments(daemon_lab):
    """A server that writes the reply in three segments: each is read before the last is released."""
    lab = daemon_lab

    def send(conn, framed):
        for piece in (framed[:1], framed[1:20], framed[20:]):
            conn.sendall(piece)
            time.sleep(0.05)

    forget(lab, ALLOWED4)
    with tcp_dns_server(lab, a_record(ALLOWED4), send):
        reply = lab.resolve("split-registry.test", server=NET6, tcp=True)
    assert address_of(reply) == ALLOWED4
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_tcp_reply_whose_last_segment_carries_fin(daemon_lab):
    """The server closes as it answers: corked, the FIN rides on the reply's only data segment."""
    lab = daemon_lab

    def send(conn, framed):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
        conn.sendall(framed)
        conn.shutdown(socket.SHUT_WR)

    forget(lab, ALLOWED4)
    with tcp_dns_server(lab, a_record(ALLOWED4), send):
        reply = lab.resolve("fin.split-registry.test", server=NET6, tcp=True)
    assert address_of(reply) == ALLOWED4
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected", "the first connect after the reply"
    assert status(lab)["counters"].get("tcp_unsynced", 0) == 0


def test_a_thousand_aaaa_for_a_long_name_are_all_in_the_kernel_before_the_reply(daemon_lab):
    """1000 AAAA with a 127-character comment each: 176 KiB of set elements, more than one
    netlink attribute can carry. The client gets its answer; the kernel holds every address."""
    lab = daemon_lab
    name = f"{'a' * 63}.{'b' * 50}.split-registry.test"
    addresses = {ipaddress.ip_address(f"2001:db8:1::{i:x}") for i in range(1, 1001)}

    def answer(qname):
        return [dns.rrset.from_text_list(qname, 300, "IN", "AAAA", [str(a) for a in addresses])]

    with tcp_dns_server(lab, answer, lambda conn, framed: conn.sendall(framed)):
        reply = lab.resolve(name, "AAAA", server=NET6, tcp=True)
    assert len(reply.answer[0]) == 1000
    queues = lab.vm.run("cat", "/proc/net/netfilter/nfnetlink_queue").stdout.splitlines()
    assert queues and all(line.split()[2] == "0" for line in queues), "no reply waits for its verdict"
    with lab.vm.inside():
        learned = [item for item in Table("ramfw").learned() if item.name == name[:127]]
    assert {ipaddress.ip_address(item.address) for item in learned} == addresses
    counters = status(lab)["counters"]
    assert counters.get("program_failed", 0) == 0 and counters.get("errors", 0) == 0


def test_a_reply_from_an_untrusted_server_teaches_nothing(daemon_lab):
    lab = daemon_lab
    lab.start_dnsmasq(ROGUE_DNS4, f"--host-record=allowed-registry.test,{BLOCKED4}")
    reply = lab.resolve("allowed-registry.test", server=ROGUE_DNS4)
    assert address_of(reply) == BLOCKED4
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert status(lab)["counters"]["untrusted"] >= 1


def test_malformed_replies_are_released_and_counted(daemon_lab):
    lab = daemon_lab
    with lab.vm.inside():
        receiver = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    receiver.bind(("2001:db8::1", 0))
    receiver.settimeout(3)
    with lab.net.inside():
        sender = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sender.bind((NET6, 53))
    sender.settimeout(3)
    try:
        receiver.sendto(b"a query", (NET6, 53))  # a flow towards the resolver: its answers are replies
        assert sender.recvfrom(64)[0] == b"a query"
        for garbage in (b"", b"\x00", b"\xff" * 11, b"\x12\x34\x81\x80\x00\x01" + b"\xff" * 40):
            sender.sendto(garbage, receiver.getsockname()[:2])
            assert receiver.recv(2048) == garbage, "a malformed reply is released untouched"
    finally:
        sender.close()
        receiver.close()
    result = status(lab)
    assert result["counters"]["malformed"] >= 3 and result["daemon"]["running"]


def test_expiry_then_re_resolution(lab, write_config, write_policy):
    lab.serve_tcp([ALLOWED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}", ttl=1)
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\nttl_min = 1\nttl_max = 1\nttl_grace = 0\n')
    lab.start_daemon(config)
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    with lab.vm.inside():
        established = socket.create_connection((ALLOWED4, 443), timeout=3)
    established.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    with established:
        time.sleep(2.5)
        assert lab.connect(ALLOWED4, mark=MARK)[0] == "refused"
        established.sendall(b"still")
        assert established.recv(5) == b"still", "established connections survive expiry"
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_a_local_caching_stub_on_loopback_re_arms_addresses(daemon_lab):
    """systemd-resolved, Docker's embedded DNS and WSL2 answer from loopback, often from cache."""
    lab = daemon_lab
    lab.vm.run("ip", "addr", "add", "127.0.0.53/8", "dev", "lo", check=False)
    stub = lab.vm.popen("dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--bind-interfaces",
                        "--listen-address=127.0.0.53", "--port=53", "--user=root", "--pid-file=",
                        f"--server={NET4}", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lab.processes.append(stub)
    time.sleep(0.3)
    assert address_of(lab.resolve("allowed-registry.test", server="127.0.0.53")) == ALLOWED4
    for _ in range(3):  # answered from the stub's cache, over loopback: still read, still re-armed
        forget(lab, ALLOWED4)
        assert lab.connect(ALLOWED4, mark=MARK)[0] == "refused"
        assert address_of(lab.resolve("allowed-registry.test", server="127.0.0.53")) == ALLOWED4
        assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_sigkill_fails_closed_and_a_restart_picks_up_the_kernel_state(daemon_lab):
    lab = daemon_lab
    lab.resolve("allowed-registry.test")
    with lab.vm.inside():
        established = socket.create_connection((ALLOWED4, 443), timeout=3)
    established.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, MARK)
    try:
        lab.daemon.send_signal(signal.SIGKILL)
        lab.daemon.wait(5)
        # DNS keeps answering (queue bypass) ...
        assert address_of(lab.resolve("blocked-registry.test")) == BLOCKED4
        assert address_of(lab.resolve("chained-registry.test")) == CDN4
        # ... established connections keep working ...
        established.sendall(b"ping")
        assert established.recv(4) == b"ping"
        # ... and nothing new is learned: unknown addresses stay closed.
        assert lab.connect(CDN4, mark=MARK)[0] == "refused"
        assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
        down = status(lab)
        assert down["daemon"]["running"] is False and down["enforcing"]
        lab.daemon = lab.start_daemon(lab.config)
        learned = status(lab)["learned"]
        assert [i["address"] for i in learned["allowed-registry.test"]] == [ALLOWED4]
        established.sendall(b"pong")
        assert established.recv(4) == b"pong"
        lab.resolve("chained-registry.test")
        assert lab.connect(CDN4, mark=MARK)[0] == "connected"
    finally:
        established.close()


def test_sigterm_exits_and_leaves_enforcement(daemon_lab):
    lab = daemon_lab
    lab.daemon.send_signal(signal.SIGTERM)
    assert lab.daemon.wait(5) == 0
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"
    assert not os.path.exists(config_mod.load(lab.config).daemon.socket)


def test_reload_with_a_broken_policy_keeps_the_old_one(daemon_lab, write_policy):
    lab = daemon_lab
    write_policy(["allowed-registry.test", "https://bad.example"])
    result = lab.ramfw("reload", "--config", lab.config)
    assert result.returncode == 2 and "not URLs" in result.stderr and "stays" in result.stderr
    assert status(lab)["policy"]["registries"] == POLICY
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_reload_applies_a_new_policy_at_once(daemon_lab, write_policy):
    lab = daemon_lab
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    write_policy(["blocked-registry.test"])
    lab.daemon.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 5
    while status(lab)["policy"]["registries"] != ["blocked-registry.test"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "refused", "removed names lose their addresses at once"
    lab.resolve("blocked-registry.test")
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "connected"


def test_down_stops_the_daemon_and_removes_everything(daemon_lab):
    lab = daemon_lab
    result = lab.ramfw("down", "--config", lab.config)
    assert result.returncode == 0, result.stderr
    assert lab.daemon.wait(5) == 0
    assert lab.vm.run("nft", "list", "ruleset").stdout == ""
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "connected"


def test_passive_snooping_learns_and_softens_the_race(lab, write_config, write_policy):
    """Where the kernel cannot queue, replies are copied (NFLOG): forced here with dns.hold."""
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}")
    write_policy(["allowed-registry.test"])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\nhold = "passive"\n', table_owner=False)  # forget
    lab.start_daemon(lab.config)
    for _ in range(20):
        forget(lab, ALLOWED4)
        outcome, seconds = lab.connect(address_of(lab.resolve("allowed-registry.test")), mark=MARK)
        assert outcome == "connected" and seconds < 2.5
    outcome, seconds = lab.connect(address_of(lab.resolve("blocked-registry.test")), mark=MARK)
    assert outcome == "refused" and 0.5 < seconds < 2.5, "blocked: one retransmission, then a reset"
    result = status(lab)
    assert result["dns_hold"].startswith("passive;")
    assert any("first connection to a new address can be lost" in n for n in result["notes"])
    assert "DNS hold:   passive" in lab.ramfw("status", "--config", lab.config).stdout


@pytest.fixture
def policy_server(lab, tmp_path):
    """An HTTPS policy server on a test host, with a throw-away CA, that honours ETags."""
    import hashlib
    import http.server
    import ssl
    import subprocess

    ca_key, ca, key, csr, cert = (tmp_path / n for n in ("ca.key", "ca.crt", "srv.key", "srv.csr", "srv.crt"))
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
                    "-days", "1", "-subj", "/CN=ramfw test CA"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr,
                    "-subj", "/CN=policy"], check=True, capture_output=True)
    ext = tmp_path / "ext.cnf"
    ext.write_text(f"subjectAltName = IP:{NET4}\n")
    subprocess.run(["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
                    "-out", cert, "-days", "1", "-extfile", ext], check=True, capture_output=True)
    state = {"body": b"", "seen_etags": []}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            etag = '"' + hashlib.sha256(state["body"]).hexdigest()[:16] + '"'
            state["seen_etags"].append(self.headers.get("If-None-Match"))
            if self.headers.get("If-None-Match") == etag:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("ETag", etag)
            self.send_header("Content-Length", str(len(state["body"])))
            self.end_headers()
            self.wfile.write(state["body"])

        def log_message(self, *args):
            pass

    with lab.net.inside():
        server = http.server.ThreadingHTTPServer((NET4, 8443), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["ca"] = str(ca)
    state["url"] = f"https://{NET4}:8443/policy.json"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


def test_policy_from_an_https_url_with_etag_and_a_cache(lab, policy_server, tmp_path):
    def serve(registries):
        policy_server["body"] = json.dumps({"organizations": [{"name": "acme", "registryAccess": {
            "registries": [{"address": r} for r in registries]}}]}).encode()

    def wait_for(predicate):
        deadline = time.monotonic() + 10
        while not predicate(status(lab)):
            assert time.monotonic() < deadline
            time.sleep(0.1)

    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}")
    serve(["allowed-registry.test"])
    lab.config = str(tmp_path / "url.toml")
    Path(lab.config).write_text(
        f'[policy]\nsource = "{policy_server["url"]}"\ncache = "{tmp_path}/cache/policy.json"\n'
        f'refresh_interval = 1\nca_file = "{policy_server["ca"]}"\n'
        f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[daemon]\nrun_dir = "{tmp_path}/run-url"\n')
    lab.daemon = lab.start_daemon(lab.config)
    assert status(lab)["policy"]["registries"] == ["allowed-registry.test"]
    serve(["allowed-registry.test", "blocked-registry.test"])
    wait_for(lambda s: s["policy"]["registries"] == ["allowed-registry.test", "blocked-registry.test"])
    assert any(etag for etag in policy_server["seen_etags"]), "polls send If-None-Match"
    lab.resolve("blocked-registry.test")
    assert lab.connect(BLOCKED4, mark=MARK)[0] == "connected"
    policy_server["body"] = b"{ broken"
    wait_for(lambda s: "invalid policy" in s["policy"].get("url_error", ""))
    assert status(lab)["policy"]["registries"] == ["allowed-registry.test", "blocked-registry.test"]
    # Unreachable source at start: the cached last good policy is enforced, never nothing.
    lab.daemon.terminate()
    lab.daemon.wait(5)
    Path(lab.config).write_text(Path(lab.config).read_text().replace(":8443/", ":8444/"))
    lab.daemon = lab.start_daemon(lab.config)
    result = status(lab)
    assert result["policy"]["registries"] == ["allowed-registry.test", "blocked-registry.test"]
    assert "last good copy" in result["policy"]["source"] and "unreachable" in result["policy"]["url_error"]


def test_host_scope_lets_the_daemons_own_policy_polls_through_and_no_one_else(lab, policy_server, tmp_path):
    """Issue #9, 7: host scope sent ramfw's own polls to the registry chain: the policy never
    changed after start. Its cgroup (its own, as a service's) passes; another process does not."""
    def serve(registries):
        policy_server["body"] = json.dumps({"organizations": [{"name": "acme", "registryAccess": {
            "registries": [{"address": r} for r in registries]}}]}).encode()

    serve(["allowed-registry.test"])
    lab.config = str(tmp_path / "host.toml")
    Path(lab.config).write_text(
        f'[policy]\nsource = "{policy_server["url"]}"\ncache = "{tmp_path}/cache/policy.json"\n'
        f'refresh_interval = 1\nca_file = "{policy_server["ca"]}"\n'
        '[enforcement]\nscope = ["host"]\nregistry_ports = [443, 8443]\nengine_processes = ["ramfw-test-no-engine"]\n'
        f'[dns]\ntrusted_resolvers = ["{NET4}"]\n[daemon]\nrun_dir = "{tmp_path}/run-host"\n')
    lab.daemon = lab.start_daemon(lab.config)
    assert lab.connect(NET4, 8443)[0] == "refused", "the policy server is no registry: others may not reach it"
    serve(["allowed-registry.test", "blocked-registry.test"])
    deadline = time.monotonic() + 10
    while (result := status(lab))["policy"]["registries"] != ["allowed-registry.test", "blocked-registry.test"]:
        assert time.monotonic() < deadline, result["policy"]
        time.sleep(0.1)
    assert any("exempt from host scope by its cgroup" in note for note in result["notes"])
    assert lab.connect(NET4, 8443)[0] == "refused"
    # A process that joins the daemon's cgroup ends the exemption (within a second's check).
    home = next(c for c in reversed(lab.cgroups) if c.name.endswith("-daemon"))
    lab.processes.append(subprocess.Popen(["sleep", "60"], preexec_fn=lambda: (home / "cgroup.procs").write_text(
        str(os.getpid()))))
    deadline = time.monotonic() + 5
    while not any("holds other processes too" in note for note in status(lab)["notes"]):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert run_in(lab, home, NET4, 8443) == "refused"


SLOW_CLIENT = """
import os, socket, sys, time
os.setgid(65534); os.setuid(65534)
print("connected", flush=True)
while True:  # cut off at the deadline, it comes back: the pressure lasts
    s = socket.socket(socket.AF_UNIX)
    s.connect("\\0" + sys.argv[1])
    try:
        for byte in b'{"command": "status"}':
            s.send(bytes([byte]))
            time.sleep(1)
    except OSError:
        pass
    s.close()
"""


def test_no_local_user_can_stall_the_daemon_through_its_control_socket(daemon_lab):
    """Issue #8, 5: a client (uid 65534) sending a byte a second stalled the loop (a 2 s timeout
    per read, in the loop): allowlisted lookups timed out, root's status took 5 s. Clients are
    now served beside the loop, with a deadline for the whole request, and root always gets in."""
    lab = daemon_lab
    address = "ramfw/ramfw"  # the abstract address, less its leading NUL
    slow = [lab.vm.popen(sys.executable, "-c", SLOW_CLIENT, address, stdout=subprocess.PIPE) for _ in range(20)]
    lab.processes.extend(slow)
    for client in slow:
        assert client.stdout.readline() == b"connected\n"
    for _ in range(5):
        forget(lab, ALLOWED4)
        start = time.monotonic()
        assert address_of(lab.resolve("allowed-registry.test")) == ALLOWED4
        assert time.monotonic() - start < 1.0  # a stalled loop: the lookup timed out (seconds)
        assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
        start = time.monotonic()
        assert status(lab)["daemon"]["running"] and time.monotonic() - start < 3, "root's status at once"
        time.sleep(0.3)


def test_a_user_who_is_not_root_gets_a_status_without_the_learned_list(daemon_lab):
    lab = daemon_lab
    lab.resolve("allowed-registry.test")
    asker = ("import os, socket; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
             "s.connect('\\0ramfw/ramfw'); s.sendall(b'{\"command\": \"status\"}\\n'); s.shutdown(socket.SHUT_WR); "
             "print(b''.join(iter(lambda: s.recv(65536), b'')).decode())")
    answer = json.loads(lab.vm.run(sys.executable, "-c", asker).stdout)["status"]
    assert answer["learned"] == {} and answer["counters"] and status(lab)["learned"]


def test_a_request_nested_too_deep_gets_an_answer(daemon_lab):
    """A review found: 60,000 nested brackets raised RecursionError in the client's thread: no answer."""
    lab = daemon_lab
    with lab.vm.inside():
        sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(5)
    sock.connect("\0ramfw/ramfw")
    sock.sendall(b"[" * 60000 + b"\n")
    answer = json.loads(sock.recv(65536))
    sock.close()
    assert answer == {"ok": False, "error": "bad request: RecursionError"}
    assert status(lab)["daemon"]["running"]


def test_a_squatter_on_the_daemons_address_is_named_and_fools_no_one(lab, write_config, write_policy):
    """An unprivileged process listening on the namespace's abstract address: `ramfw up` is not
    refused for it, and a daemon that cannot start names it."""
    write_policy(["allowed-registry.test"])
    config = write_config()
    squat = ("import os, socket, time; os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
             "s.bind('\\0ramfw/ramfw'); s.listen(); print('ready', flush=True); time.sleep(60)")
    squatter = lab.vm.popen(sys.executable, "-c", squat, stdout=subprocess.PIPE)
    lab.processes.append(squatter)
    assert squatter.stdout.readline() == b"ready\n"
    assert lab.ramfw("up", "--config", config).returncode == 0
    reload = lab.ramfw("reload", "--config", config)  # the squatter's answer was believed: rc 0
    assert reload.returncode == 5 and "held by uid 65534, not by the ramfw daemon" in reload.stderr
    with pytest.raises(RuntimeError, match=f"held by pid {squatter.pid} \\(uid 65534\\), not by a ramfw daemon"):
        lab.start_daemon(config)


def test_up_while_the_daemon_runs_refuses_and_keeps_the_dns_hold(daemon_lab):
    """Issue #9, 8: `ramfw up` re-applied the table with no DNS hold rules: the daemon ran on and
    never learned again."""
    lab = daemon_lab
    result = lab.ramfw("up", "--config", lab.config)
    assert result.returncode == 5 and "ramfw reload" in result.stderr
    forget(lab, ALLOWED4)
    assert address_of(lab.resolve("allowed-registry.test")) == ALLOWED4
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_containers_scope_filters_forwarded_traffic(lab, write_config, write_policy):
    """Traffic the vm forwards from a container bridge, as buildx's docker-container driver makes."""
    container = lab.add_container()
    lab.serve_tcp([ALLOWED4, BLOCKED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}",
                      f"--host-record=blocked-registry.test,{BLOCKED4}")
    write_policy(["allowed-registry.test"])
    config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["containers"], registry_ports=[443])
    lab.start_daemon(config)
    for name, expected in (("allowed-registry.test", "connected"), ("blocked-registry.test", "refused")):
        address = address_of(lab.resolve(name, source=container))
        outcome, seconds = lab.connect(address, source=container)
        assert outcome == expected and seconds < 0.5, (name, outcome)
    assert lab.connect(BLOCKED4, 443)[0] == "connected", "the vm's own traffic is not in containers scope"


def test_wsl_boot_from_two_distributions_starts_one_daemon(lab, write_config, write_policy, tmp_path):
    """Two "distributions" (own mount namespaces, the VM's network) boot at once: one daemon."""
    write_policy(["allowed-registry.test"])
    config = lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
    boot = str(Path(__file__).resolve().parents[2] / "scripts" / "wsl-boot")
    runs = [subprocess.Popen(["unshare", "-m", "--propagation", "private", *lab.vm.prefix(), boot,
                              "--config", config, "--log", str(tmp_path / f"ramfw{i}.log")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [run.communicate(timeout=60) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    daemons = lab.vm.processes(b"daemon")
    assert len(daemons) == 1, outputs
    again = subprocess.run([*lab.vm.prefix(), boot, "--config", config], capture_output=True, text=True)
    assert again.returncode == 0 and "already running" in again.stdout
    assert status(lab)["daemon"]["running"]


def test_wsl_boot_install_is_idempotent(tmp_path):
    boot = str(Path(__file__).resolve().parents[2] / "scripts" / "wsl-boot")
    conf = tmp_path / "wsl.conf"
    conf.write_text("[network]\nhostname = dev\n")
    for _ in range(2):
        assert subprocess.run([boot, "--install", "--wsl-conf", str(conf)], capture_output=True).returncode == 0
    assert conf.read_text().count("wsl-boot") == 1 and "[network]" in conf.read_text()


def test_only_replies_that_may_be_allowlisted_are_held(daemon_lab):
    lab = daemon_lab
    before = status(lab)["counters"]
    lab.resolve("blocked-registry.test")
    lab.resolve("allowed-registry.test")
    after = status(lab)["counters"]
    if "prefilter" not in status(lab)["dns_hold"]:
        pytest.skip("no eBPF DNS prefilter on this kernel: every reply is held")
    assert after.get("held", 0) - before.get("held", 0) == 1
    # copied: the other name's reply, and, unless the kernel pairs (the prefilter's pairing
    # records it instead), the allowlisted name's query (to pair its reply with); the other
    # name's query is not copied: the prefilter reads queries too
    kernel_pairs = status(lab)["dns_hold"].endswith("in the kernel")
    assert after.get("copied", 0) - before.get("copied", 0) == (1 if kernel_pairs else 2)
    assert after.get("queries", 0) - before.get("queries", 0) == 1
    if kernel_pairs:
        assert after["paired"] - before["paired"] == 1


def test_trusted_resolvers_follow_resolv_conf(lab, write_config, write_policy, tmp_path):
    """By default the daemon trusts resolv.conf's nameservers, and notices when they change."""
    lab.serve_tcp([ALLOWED4], [443])
    lab.start_dnsmasq(NET4, f"--host-record=allowed-registry.test,{ALLOWED4}")
    write_policy(["allowed-registry.test"])
    lab.config = write_config()  # no dns.trusted_resolvers
    resolv = tmp_path / "resolv.conf"
    resolv.write_text(f"nameserver {ROGUE_DNS4}\n")
    script = (f"mount --bind {resolv} /etc/resolv.conf; exec {' '.join(lab.vm.prefix())} "
              f"{sys.executable} -m ramfw.cli daemon --config {lab.config}")
    daemon = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c", script],
                              cwd=str(Path(__file__).resolve().parents[2]), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    lab.processes.append(daemon)
    deadline = time.monotonic() + 20
    while not status(lab)["daemon"]["running"]:
        assert time.monotonic() < deadline and daemon.poll() is None
        time.sleep(0.1)
    assert NET4 not in status(lab)["trusted_resolvers"]
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "refused", "a reply from an untrusted server teaches nothing"
    resolv.write_text(f"nameserver {NET4}\n")
    while NET4 not in status(lab)["trusted_resolvers"]:
        assert time.monotonic() < deadline + 10
        time.sleep(0.2)
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_a_daemon_starting_on_a_broken_policy_file_enforces_the_last_good_one(daemon_lab, write_policy):
    lab = daemon_lab
    lab.daemon.terminate()
    lab.daemon.wait(10)
    write_policy(["allowed-registry.test", "10.0.0.1"])  # the source breaks while it is down
    lab.daemon = lab.start_daemon(lab.config)
    result = status(lab)
    assert result["policy"]["registries"] == POLICY
    assert "last good copy" in result["policy"]["source"] and "not IP addresses" in result["policy"]["source"]
    lab.resolve("allowed-registry.test")
    assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"


def test_a_block_and_a_copied_reply_waiting_together_never_stall_the_loop(daemon_lab):
    """The loop stall (one select returns the blocks socket and the snoop socket; the block
    handler drains the snoop socket, then the snoop handler blocked in recv on an empty socket
    while held replies waited). Made deterministic: the daemon is stopped while a blocked
    connection and a copied reply queue up, in that order, so one select sees both."""
    lab = daemon_lab
    if "prefilter" not in status(lab)["dns_hold"]:
        pytest.skip("no eBPF DNS prefilter on this kernel: no copied replies beside held ones")
    for _ in range(3):
        lab.daemon.send_signal(signal.SIGSTOP)
        try:
            assert lab.connect(BLOCKED4, mark=MARK)[0] == "refused"  # a block datagram waits
            lab.resolve("blocked-registry.test")  # not allowlisted: a copy waits, not held
        finally:
            lab.daemon.send_signal(signal.SIGCONT)
        forget(lab, ALLOWED4)
        assert address_of(lab.resolve("allowed-registry.test")) == ALLOWED4  # held: needs the loop
        assert lab.connect(ALLOWED4, mark=MARK)[0] == "connected"
    start = time.monotonic()
    lab.daemon.send_signal(signal.SIGTERM)
    assert lab.daemon.wait(5) == 0
    assert time.monotonic() - start < 1.0, "SIGTERM ends the daemon within a second"
