"""What the daemon says about blocked connections (the recent ones for status, log lines
throttled per destination), and the throttle its other repeated log lines go through."""

from __future__ import annotations

import logging
import time
from collections import deque

from ..snoop.packet import destination, source
from . import logs

log = logging.getLogger("ramfw")
LOG_INTERVAL = 10.0  # seconds between two log lines about one destination


class Throttle:
    """At most one log line per key per interval; the lines held back are counted, and the
    next line that passes says how many there were. Bounded: 1024 keys at most."""

    def __init__(self, interval: float = LOG_INTERVAL):
        self.interval = interval
        self._logged: dict[str, tuple[float, int]] = {}

    def log(self, level: int, key: str, line: str, extra: dict | None = None) -> None:
        now = time.monotonic()
        last, repeats = self._logged.get(key, (-self.interval, 0))
        if now - last < self.interval:
            self._logged[key] = (last, repeats + 1)
            return
        if len(self._logged) >= 1024:
            self._logged.clear()
        self._logged[key] = (now, 0)
        extra = {"event": "message", "fields": {}} if extra is None else extra
        if repeats:
            extra = {**extra, "fields": {**extra["fields"], "repeats": repeats}}
        log.log(level, "%s%s", line, f" (seen {repeats} more times since the last report)" if repeats else "",
                extra=extra)


def advice(*hosts: str) -> str:
    """What a developer refused a registry can do about it."""
    return f"ask your administrators to add {', '.join(hosts)} to your organization's allowed registries"


class BlockLog:
    def __init__(self, audit: bool):
        self.audit = audit
        self.verdict = "audited" if audit else "blocked"  # what a block event says became of it
        self.recent: deque[dict] = deque(maxlen=50)
        self._throttle = Throttle()
        self._named: dict[str, tuple[float, str]] = {}  # address -> (when, message): one lookup per interval

    def message(self, address: str, lookup) -> str:
        """The block message for ``address``; ``lookup(address)`` (a search of the kept replies)
        runs at most once per destination per interval."""
        now = time.monotonic()
        known = self._named.get(address)
        if known is not None and now - known[0] < LOG_INTERVAL:
            return known[1]
        if len(self._named) >= 4096:
            self._named.clear()
        self._named[address] = (now, lookup(address))
        return self._named[address][1]

    def record(self, message: str, address: str, port: int, host: str = "") -> None:
        """One log line per blocked destination per interval: a client retrying in a loop must
        not flood the log (status counts every one)."""
        if self.audit:
            message = f"audit: would block: {message}"
        line = f"{message} ({address} port {port})"
        self._throttle.log(logging.WARNING, line, line, logs.event(
            "block", verdict=self.verdict, host=host, address=address, port=port,
            **({"advice": advice(host)} if host else {})))
        self.recent.append({"time": time.time(), "message": message, "address": address, "port": port,
                            "host": host})

    def name_and_record(self, packets: list[bytes], snooper, seen) -> None:
        """Blocked packets (their headers, from the log group): each named by the replies the
        snooper kept, logged, and kept in ``seen`` (a ``seen.Seen``) for ``ramfw report``."""
        for packet in packets:
            found = destination(packet)
            if found is None:
                continue
            snooper.counters["blocks_named"] += 1
            host = snooper.address_names.get(found[0], "")
            self.record(self.message(found[0], snooper.block_message), *found, host=host)
            seen.refusal(host, *found, source(packet), self.verdict, time.time())
