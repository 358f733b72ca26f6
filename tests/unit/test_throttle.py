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
