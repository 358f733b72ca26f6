"""Repeated log lines are throttled per key, and what was held back is counted."""

import logging

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


def test_a_destination_is_looked_up_once_per_interval():
    """Issue #10, 4: every blocked packet searched the kept replies before the log throttle."""
    from ramfw.daemon.blocks import BlockLog

    calls = []
    log = BlockLog(audit=False)

    def lookup(address):
        calls.append(address)
        return f"registry access to {address} is not allowed"

    for _ in range(1000):
        log.message("203.0.113.20", lookup)
    log.message("203.0.113.21", lookup)
    assert calls == ["203.0.113.20", "203.0.113.21"]
