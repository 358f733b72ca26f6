"""The TLS check's shared limits under a local user's flood (review of issue #13): the daemon's
table of flows waiting to be read and the kernel's queue are shared by every client; an
unprivileged user who opens thousands of connections, or holds thousands of first flights
unfinished, must not get the engine's connections refused or dropped."""

import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_sni import ALLOWED, handshake, start_edge, status
from tests.lab.edge import EDGE4

# Connects to the edge (as its user), on each connection sends ``sys.argv[3]`` bytes of a TLS
# record header that announces more (nothing: only connects); says how many connected, then waits.
FLOOD = """
import selectors, socket, sys, time
address, count, send = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3])
sel, socks, connected = selectors.DefaultSelector(), [], 0
for _ in range(count):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((address, 443))
    sel.register(s, selectors.EVENT_WRITE)
    socks.append(s)
deadline = time.monotonic() + 3
while time.monotonic() < deadline and len(sel.get_map()):
    for key, _ in sel.select(0.1):
        sel.unregister(key.fileobj)
        if key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            connected += 1
            if send:
                try:
                    key.fileobj.send(send)
                except OSError:
                    pass
print(connected, flush=True)
sys.stdin.read()
"""
HEADER_ONLY = bytes([0x16, 3, 1, 2, 0]).hex()  # a handshake record of 512 bytes: its first 5 come


@pytest.fixture
def host_lab(lab, write_config, write_policy, tmp_path):
    """The edge lab with the host in scope: every local user's connections to TLS ports are read."""
    return start_edge(lab, write_config, write_policy, tmp_path, scope=["engine", "host"])


def flood(lab, count, send=""):
    """An unprivileged user's flood (uid 65534): the process, once it said how many connected."""
    def limits():
        resource.setrlimit(resource.RLIMIT_NOFILE, (count + 100, count + 100))

    proc = lab.vm.popen("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", FLOOD,
                        EDGE4, str(count), send, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                        preexec_fn=limits)
    proc.connected = int(proc.stdout.readline())
    return proc


def queue_dropped(lab, queue_num=5243) -> int:
    """Packets the kernel dropped because the queue was full (/proc/net/netfilter/nfnetlink_queue)."""
    with lab.vm.inside():
        lines = Path("/proc/net/netfilter/nfnetlink_queue").read_text().splitlines()
    for line in lines:
        fields = line.split()
        if int(fields[0]) == queue_num:
            return int(fields[5])
    raise AssertionError(f"queue {queue_num} is not bound")


def settle(lab, until, seconds=6.0):
    """Status once ``until(status)`` holds (the daemon has read the flood's copies)."""
    deadline = time.monotonic() + seconds
    while True:
        found = status(lab)
        if until(found) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_thousands_of_idle_connections_do_not_evict_the_engines_flow(host_lab):
    from tests.integration.test_sni import client, greeting

    engine = client(host_lab)  # connected, its ClientHello not yet sent
    attacker = flood(host_lab, 9000)
    try:
        # every SYN's copy read (the engine's, then the user's 9,000) before the engine sends
        found = settle(host_lab, lambda s: s["tls"]["counters"].get("syns", 0) >= 9001, 10)
        assert found["tls"]["counters"]["syns"] >= 9001, found["tls"]["counters"]
        assert greeting(engine, ALLOWED).startswith("hello"), "the engine's flow was not pushed out of the table"
        assert found["tls"]["flows_waiting"] <= 1024 + 2, "one user holds at most its share of the table"
    finally:
        attacker.communicate("", timeout=20)
    assert handshake(host_lab, ALLOWED).startswith("hello")


def test_thousands_of_unfinished_first_flights_do_not_fill_the_queue(host_lab):
    attacker = flood(host_lab, 4500, send=HEADER_ONLY)
    try:
        assert attacker.connected > 500
        found = settle(host_lab, lambda s: s["tls"]["counters"].get("segments", 0) >= attacker.connected, 4)
        assert found["tls"]["segments_held"] <= 512, "one user holds at most its share of the queue"
        assert handshake(host_lab, ALLOWED).startswith("hello"), "the engine's ClientHello is read at once"
        assert queue_dropped(host_lab) == 0, "the queue never overflowed"
    finally:
        attacker.communicate("", timeout=20)
    assert found["tls"]["counters"]["over_share"] > 0, "the user's own flights over its share were refused"
