"""What the daemon saw, kept across restarts: the host names clients were refused (in audit
mode: would have been), and the allowlisted names they looked up.

``ramfw report`` shows it and ``ramfw policy suggest`` turns it into a policy: weeks of audit
mode become an allowlist, and the lookups per policy entry show which entries nobody uses.
Bounded (``MAX_HOSTS`` of each, the least recently seen go first; a few clients and ports
each) and saved atomically to a state file: a flood of blocks to random addresses costs a
bounded file, not the disk.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

log = logging.getLogger("ramfw")
MAX_HOSTS = 2048
MAX_EACH = 8  # clients, ports kept per host
SAVE_SECONDS = 10.0
FORMAT = 1


def seen_path(config) -> str:
    """Beside the policy's cache: /var/lib/ramfw/seen.json by default."""
    return str(Path(config.policy.cache).with_name("seen.json"))


class Seen:
    def __init__(self, path: str = ""):
        self.path = path
        self.refused: dict[str, dict] = {}  # host name (or "address <a>" when unnamed) -> what was seen
        self.looked_up: dict[str, dict] = {}  # allowlisted name -> lookups learned from
        self._changed, self._saved = False, time.monotonic()

    @classmethod
    def load(cls, path: str) -> "Seen":
        """The state a daemon saved before; an unreadable file is logged and started afresh."""
        seen = cls(path)
        try:
            data = json.loads(Path(path).read_text())
            if data.get("format") == FORMAT:
                seen.refused, seen.looked_up = dict(data["refused"]), dict(data["looked_up"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("what ramfw saw before is unreadable (%s: %s); starting afresh", path, err)
        return seen

    def refusal(self, host: str, address: str, port: int, client: str, verdict: str, now: float,
                process: str = "") -> None:
        """A refusal of ``client`` (its address; ``process``: who there, as the kernel recorded it)."""
        key = host or f"address {address}"
        entry = self._touch(self.refused, key, now)
        entry["verdict"] = verdict
        for field, value in (("ports", port), ("clients", client), ("addresses", address), ("processes", process)):
            kept = entry.setdefault(field, [])
            if value not in kept and value not in ("", None):
                kept.append(value)
                del kept[:-MAX_EACH]

    def learned(self, elements, now: float) -> None:
        """A trusted reply taught these elements (snooper.Element): one lookup per name."""
        for name in {element.name for element in elements}:
            self._touch(self.looked_up, name, now)

    def connected(self, names: dict[str, int], now: float) -> None:
        """Connections the kernel counted to the addresses learned for these allowlisted names."""
        for name, count in names.items():
            entry = self._touch(self.looked_up, name, now, "connections", count)
            entry["last_connection"] = now

    def _touch(self, table: dict[str, dict], key: str, now: float, field: str = "count", by: int = 1) -> dict:
        entry = table.pop(key, None)  # re-inserted last: the dict's order is the recency
        if entry is None:
            entry = {"count": 0, "first": now}
            while len(table) >= MAX_HOSTS:
                del table[next(iter(table))]
        entry[field] = entry.get(field, 0) + by
        entry["last"] = now
        table[key] = entry
        self._changed = True
        return entry

    def save(self, force: bool = False) -> None:
        """Written at most every ``SAVE_SECONDS`` (and at stop), atomically (a rename)."""
        if not self.path or not self._changed or (not force and time.monotonic() - self._saved < SAVE_SECONDS):
            return
        self._saved, self._changed = time.monotonic(), False
        target = Path(self.path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"format": FORMAT, "refused": self.refused, "looked_up": self.looked_up}))
            os.replace(tmp, target)
        except OSError as err:
            log.warning("could not save what ramfw saw to %s: %s", self.path, err)


DOCKER_HUB = "Docker Hub (allowDockerHub)"


def usage(looked_up: dict[str, dict], policy) -> dict[str, dict]:
    """Per policy entry: lookups learned from, connections to what they taught, and when last;
    entries nobody used have 0. Docker Hub's hosts (``allowDockerHub``) count as one entry."""
    registries = {registry.pattern.to_text() for registry in policy.registries}
    unused = {"lookups": 0, "connections": 0, "last": None}
    per_entry = {entry: dict(unused) for entry in sorted(registries)}
    if policy.allow_docker_hub:
        per_entry[DOCKER_HUB] = dict(unused)
    for name, seen in looked_up.items():
        pattern = policy.matcher.match(name)
        if pattern is None:
            continue
        entry = per_entry.get(pattern.to_text() if pattern.to_text() in registries else DOCKER_HUB)
        if entry is not None:
            entry["lookups"] += seen["count"]
            entry["connections"] += seen.get("connections", 0)
            entry["last"] = max(entry["last"] or 0, seen["last"])
    return per_entry


__all__ = ["Seen", "usage", "seen_path", "MAX_HOSTS"]
