"""Repeated log lines are throttled per key, and what was held back is counted."""

import logging
import struct

from ramfw.daemon.blocks import Throttle


def test_one_line_per_key_per_interval_and_the_held_back_counted(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("ramfw.daemon.blocks.time.monotonic", lambda: clock[0])
    throttle = Throttle(interval=10)
    with caplog.at_level(logging.ERROR, logger="ramfw"):
        for _ in range(50_000):  # a packet that makes the same error, over and over
            throttle.log(logging.ERROR, "reading a reply", "reading a reply: UnicodeDecodeError(...)")
        throttle.log(logging.ERROR, "queue", "queue: ENOBUFS")
        clock[0] += 10
        throttle.log(logging.ERROR, "reading a reply", "reading a reply: again")
    assert [r.getMessage() for r in caplog.records] == [
        "reading a reply: UnicodeDecodeError(...)", "queue: ENOBUFS",
        "reading a reply: again (seen 49999 more times since the last report)"]


def blocked_syn(address: str) -> bytes:
    from tests.support.packets import CLIENT, checksum_free_ipv4

    return checksum_free_ipv4(6, struct.pack("!HHIIBBHHH", 40000, 443, 1, 0, 5 << 4, 0x02, 65535, 0, 0),
                              CLIENT, address)


def blocking_snooper():
    from ramfw import policy
    from ramfw.config import DnsSettings
    from tests.support.packets import RESOLVER, AskedSnooper

    allowed = policy.from_data({"organizations": [{"name": "t", "registryAccess": {
        "allowDockerHub": False, "registries": [{"address": "allowed-registry.test"}]}}]})
    return AskedSnooper(allowed, {RESOLVER}, DnsSettings())


def test_a_block_message_says_what_its_names_and_reason_say():
    """The message was kept per destination for 10 s while the names and reason were read
    afresh (and before the kept replies were): one event said "no DNS name was seen" with
    reason not_allowlisted, or named nothing for a name a reply had just given."""
    from ramfw.daemon.blocks import BlockLog
    from ramfw.daemon.seen import Seen
    from tests.support.packets import reply, udp

    snooper, log = blocking_snooper(), BlockLog(audit=False)
    log.name_and_record([blocked_syn("203.0.113.20")], snooper, Seen())
    first = log.recent[-1]
    assert first["reason"] == "no_name_seen" and first["destination_names"] == []
    assert first["message"] == "registry access to 203.0.113.20 is not allowed (no DNS name was seen for it)"
    snooper.on_packet(udp(reply("blocked-registry.test", "blocked-registry.test. 300 A 203.0.113.20")), 0)
    log.name_and_record([blocked_syn("203.0.113.20")], snooper, Seen())
    second = log.recent[-1]
    assert second["reason"] == "not_allowlisted" and second["destination_names"] == ["blocked-registry.test"]
    assert second["message"] == "registry access to blocked-registry.test is not allowed"
    assert second["host"] == "blocked-registry.test"


def test_the_kept_replies_are_read_once_however_many_packets_are_blocked(monkeypatch):
    """Issue #10, 4: every blocked packet searched the kept replies before the log throttle.
    They are read once (``index_unread`` lets them go); each block is then a lookup."""
    from ramfw.daemon.blocks import BlockLog
    from ramfw.daemon.seen import Seen
    from tests.support.packets import reply, udp

    snooper, log = blocking_snooper(), BlockLog(audit=False)
    snooper.on_packet(udp(reply("blocked-registry.test", "blocked-registry.test. 300 A 203.0.113.20")), 0)
    read = []
    original = snooper._remember
    monkeypatch.setattr(snooper, "_remember", lambda address, name: (read.append(address), original(address, name)))
    for _ in range(1000):
        log.name_and_record([blocked_syn("203.0.113.20")], snooper, Seen())
    assert read == ["203.0.113.20"]
    assert log.recent[-1]["message"] == "registry access to blocked-registry.test is not allowed"
