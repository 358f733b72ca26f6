"""Every socket the daemon's loop reads returns at once when nothing waits (no handler blocks)."""

import select
import socket
import struct
import threading
import time

import dns.message
import pytest

from ramfw import config as config_mod
from ramfw import policy
from ramfw.config import DnsSettings, EnforcementSettings
from ramfw.daemon.loop import Daemon
from ramfw.kernel import netlink, nflog, nft, probes, ruleset
from ramfw.kernel.queue import Queue
from ramfw.kernel.ruleset import Hold
from ramfw.kernel.table import Table
from ramfw.snoop.snooper import Snooper
from tests.lab.sandbox import ALLOWED4, BLOCKED4, NET4
from tests.support.packets import AskedSnooper


def _returns_at_once(reader) -> list:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(reader.receive()), daemon=True)
    thread.start()
    thread.join(1.0)
    if thread.is_alive():
        reader.sock.close()  # unblocks nothing, but keeps close() from waiting on a stolen ack
        raise AssertionError("receive() blocked on an empty socket")
    reader.close()
    return result[0]


def test_an_empty_queue_and_empty_log_groups_return_nothing_at_once(lab):
    with lab.vm.inside():
        queue, log = Queue(7001), nflog.Log(7002)
    assert _returns_at_once(queue) == []
    assert _returns_at_once(log) == []


class RefusingTable:
    """The allowed sets' writer failing in a way nobody foresaw (as a 64 KiB batch once did)."""

    def add_elements(self, *args, **kwargs):
        raise struct.error("'H' format requires 0 <= number <= 65535")


def test_every_held_reply_gets_its_verdict_whatever_raises(lab, tmp_path):
    """A real queue, real hold rules and a real DNS server; programming fails on every reply.
    Each held reply is still released (accepted), none is left in the queue."""
    lab.start_dnsmasq(NET4, *(f"--host-record=r{i}.allowed-registry.test,{ALLOWED4}" for i in range(3)))
    with lab.vm.inside():
        queue = Queue(7003)
        table = Table("ramfw")
        table.run(ruleset.build_ruleset(EnforcementSettings(), [NET4], 100))
        for hold in (Hold.XT_NFQUEUE, Hold.NFT_QUEUE):
            try:
                table.swap_rules("dns_input", nft.hold_rules(hold, 7003, None, 0))
                break
            except OSError:
                continue
        else:
            queue.close()
            pytest.skip("this kernel can hold DNS replies in no queue")
    daemon = Daemon(config_mod.Config())
    daemon.queue, daemon.table, daemon.hold = queue, RefusingTable(), hold
    daemon.report = probes.Report("test", ())
    daemon.snooper = AskedSnooper(policy.from_data({"organizations": [{"name": "t", "registryAccess": {
        "registries": [{"address": "allowed-registry.test"}]}}]}), {NET4}, DnsSettings())
    clients = []
    for i in range(3):
        with lab.vm.inside():
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.sendto(dns.message.make_query(f"r{i}.allowed-registry.test", "A").to_wire(), (NET4, 53))
        clients.append(sock)
    try:
        answered = set()
        deadline = time.monotonic() + 3
        while len(answered) < 3 and time.monotonic() < deadline:
            if select.select([queue.sock], [], [], 0.05)[0]:
                daemon._guarded(daemon._on_queue)  # as the loop calls it
            for index, sock in enumerate(clients):
                if index not in answered and select.select([sock], [], [], 0)[0]:
                    sock.recv(512)
                    answered.add(index)
        assert answered == {0, 1, 2}, "a held reply was left without a verdict"
        assert daemon.snooper.counters["program_failed"] == 3
    finally:
        for sock in clients:
            sock.close()
        queue.close()


class RecordingTable:
    def __init__(self):
        self.names = []

    def add_elements(self, elements, *args, **kwargs):
        self.names += [e.name for e in elements]

    def close(self):
        pass


def held_daemon(lab):
    """A Daemon with a real queue and copy group, the real DNS chains, a recording table."""
    with lab.vm.inside():
        queue, snoop = Queue(7004), nflog.Log(7005)
        table = Table("ramfw")
        table.run(ruleset.build_ruleset(EnforcementSettings(), [NET4], 100))
        for hold in (Hold.XT_NFQUEUE, Hold.NFT_QUEUE):
            try:
                for chain, rules in nft.dns_chain_rules(hold, 7004, None, 7005).items():
                    table.swap_rules(chain, rules)
                break
            except OSError:
                continue
        else:
            queue.close()
            snoop.close()
            pytest.skip("this kernel can hold DNS replies in no queue")
    daemon = Daemon(config_mod.Config())
    daemon.queue, daemon.snoop, daemon.table, daemon.hold = queue, snoop, RecordingTable(), hold
    daemon.report = probes.Report("test", ())
    daemon.snooper = Snooper(policy.from_data({"organizations": [{"name": "t", "registryAccess": {
        "registries": [{"address": "allowed-registry.test"}]}}]}), {NET4}, DnsSettings())
    return daemon


def test_queries_to_other_addresses_cannot_bury_the_real_ones(lab):
    """Review finding: every UDP query to port 53 was copied, to any address; a local user's
    burst of them (names under an allowlisted domain pass the prefilter) pushed the real
    query's copy past what one turn reads, and its reply taught nothing. Only queries to a
    trusted resolver are copied now."""
    lab.start_dnsmasq(NET4, f"--host-record=a.allowed-registry.test,{ALLOWED4}")
    daemon = held_daemon(lab)
    with lab.vm.inside():
        client, junk = socket.socket(socket.AF_INET, socket.SOCK_DGRAM), socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(300):
            junk.sendto(dns.message.make_query(f"x{i}.allowed-registry.test", "A").to_wire(), (BLOCKED4, 53))
        client.sendto(dns.message.make_query("a.allowed-registry.test", "A").to_wire(), (NET4, 53))
        deadline = time.monotonic() + 3
        while not select.select([client], [], [], 0)[0] and time.monotonic() < deadline:
            if select.select([daemon.queue.sock], [], [], 0.05)[0]:
                daemon._guarded(daemon._on_queue)
        assert daemon.table.names == ["a.allowed-registry.test"] and daemon.snooper.counters["unmatched"] == 0
        assert daemon.snooper.counters["queries"] == 1
    finally:
        for thing in (client, junk, daemon.queue, daemon.snoop):
            thing.close()


def test_a_reply_received_while_others_are_decided_finds_its_query(lab):
    """Found by the soak benchmark (1 allowlisted reply in 140 taught nothing): the copies were
    read once per turn, before the held replies. A query sent and answered while that turn's
    replies were being decided had its reply read in the same turn, before its copy: no
    query to pair it with. Now the copies are read after each held reply is received."""
    lab.start_dnsmasq(NET4, *(f"--host-record={n}.allowed-registry.test,{ALLOWED4}" for n in ("a", "b")))
    daemon = held_daemon(lab)
    queue, snoop = daemon.queue, daemon.snoop
    with lab.vm.inside():
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    release = daemon._release

    def release_after_b_is_asked_and_answered(packet):
        if not hasattr(daemon, "asked_b"):
            daemon.asked_b = True
            client.sendto(dns.message.make_query("b.allowed-registry.test", "A").to_wire(), (NET4, 53))
            time.sleep(0.2)  # b's copy waits in the log, its reply in the queue behind a's
        release(packet)

    daemon._release = release_after_b_is_asked_and_answered
    try:
        client.sendto(dns.message.make_query("a.allowed-registry.test", "A").to_wire(), (NET4, 53))
        answered, deadline = 0, time.monotonic() + 3
        while answered < 2 and time.monotonic() < deadline:
            if select.select([queue.sock], [], [], 0.05)[0]:
                daemon._guarded(daemon._on_queue)
            while select.select([client], [], [], 0)[0]:
                client.recv(512)
                answered += 1
        assert answered == 2
        assert daemon.table.names == ["a.allowed-registry.test", "b.allowed-registry.test"]
        assert daemon.snooper.counters["unmatched"] == 0
    finally:
        client.close()
        queue.close()
        snoop.close()


def test_a_stopping_daemon_gives_every_held_reply_its_verdict_and_holds_no_new_one(lab):
    """Found by the rolling-restart benchmark (one lookup lost in about five restarts): the
    kernel drops what an unbound queue still holds, so a reply held when the daemon closed its
    queue never reached its client. Now the queue is first made to let new replies pass (full,
    failing open, as the bypass will), then every held reply gets its verdict, then it is
    unbound. Here a is held when the daemon stops; b, asked while a is being decided, passes
    at once unheld; both are answered and a is learned."""
    lab.start_dnsmasq(NET4, *(f"--host-record={n}.allowed-registry.test,{ALLOWED4}" for n in ("a", "b")))
    daemon = held_daemon(lab)
    with lab.vm.inside():
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    queries = {n: dns.message.make_query(f"{n}.allowed-registry.test", "A") for n in ("a", "b")}
    released, release = [], daemon._release

    def release_after_b_is_asked(packet):
        if not released:
            client.sendto(queries["b"].to_wire(), (NET4, 53))
            time.sleep(0.2)  # b's reply comes back meanwhile
        released.append(packet)
        release(packet)

    daemon._release = release_after_b_is_asked
    try:
        client.sendto(queries["a"].to_wire(), (NET4, 53))
        assert select.select([daemon.queue.sock], [], [], 3)[0], "a's reply was not held"
        time.sleep(0.1)
        daemon.close()
        answers = []
        while len(answers) < 2 and select.select([client], [], [], 2)[0]:
            answers.append(dns.message.from_wire(client.recv(512)).id)
        assert answers == [queries["b"].id, queries["a"].id], "a held reply was dropped at close"
        assert len(released) == 1 and daemon.table.names == ["a.allowed-registry.test"]
    finally:
        client.close()


def test_a_reply_read_while_the_queue_is_configured_is_kept_for_receive(lab):
    """Found by the rolling-restart benchmark (a lookup lost ~0.2 s after a restart, as the new
    daemon bound the queue): a held reply that reached the socket before the kernel's ack to a
    configuration request was read and thrown away with it, and never got a verdict."""
    lab.start_dnsmasq(NET4, f"--host-record=a.allowed-registry.test,{ALLOWED4}")
    daemon = held_daemon(lab)
    queue = daemon.queue
    with lab.vm.inside():
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        client.sendto(dns.message.make_query("a.allowed-registry.test", "A").to_wire(), (NET4, 53))
        assert select.select([queue.sock], [], [], 3)[0], "the reply was not held"
        queue._config(netlink.u32(netlink.NFQA_CFG_QUEUE_MAXLEN, 4096))  # its ack comes after the reply
        assert not select.select([queue.sock], [], [], 0)[0]
        packets = queue.receive()
        assert len(packets) == 1 and dns.message.from_wire(packets[0].payload[28:]).question
        queue.verdict(packets[0].packet_id)
        assert select.select([client], [], [], 2)[0], "the kept reply's verdict did not release it"
    finally:
        for thing in (client, queue, daemon.snoop):
            thing.close()
