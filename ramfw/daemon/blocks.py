"""What the daemon says about blocked connections: the recent ones for status, and log lines
throttled per destination."""

from __future__ import annotations

import logging
import time
from collections import deque

log = logging.getLogger("ramfw")
LOG_INTERVAL = 10.0  # seconds between two log lines about one destination


class BlockLog:
    def __init__(self, audit: bool):
        self.audit = audit
        self.recent: deque[dict] = deque(maxlen=50)
        self._logged: dict[str, tuple[float, int]] = {}

    def record(self, message: str, address: str, port: int) -> None:
        if self.audit:
            message = f"audit: would block: {message}"
        self._log(f"{message} ({address} port {port})")
        self.recent.append({"time": time.time(), "message": message, "address": address, "port": port})

    def _log(self, line: str) -> None:
        """One log line per blocked destination per interval: a client retrying in a loop must
        not flood the log (status counts every one)."""
        now = time.monotonic()
        last, repeats = self._logged.get(line, (0.0, 0))
        if now - last < LOG_INTERVAL:
            self._logged[line] = (last, repeats + 1)
            return
        if len(self._logged) > 1024:
            self._logged.clear()
        self._logged[line] = (now, 0)
        log.warning("%s%s", line, f" (seen {repeats} more times since the last report)" if repeats else "")
