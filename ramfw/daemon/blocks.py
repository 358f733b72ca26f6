"""What the daemon says about blocked connections (the recent ones for status, log lines
throttled per destination), and the throttle its other repeated log lines go through."""

from __future__ import annotations

import json
import logging
import re
import time
from collections import deque

from ..snoop.packet import flow
from . import logs
from .clients import Clients, quote

log = logging.getLogger("ramfw")
LOG_INTERVAL = 10.0  # seconds between two log lines about one destination
TRANSPORTS = {6: "tcp", 17: "udp", 33: "dccp", 132: "sctp", 136: "udplite", 1: "icmp", 58: "icmpv6"}


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
        self.clients = None  # a clients.Clients once ``name_clients``

    def name_clients(self, cgroup_mount: str | None, enforcement) -> None:
        """Record who connects (in the kernel), to name the client of each block, and count the
        connections to the registry ports (``config.EnforcementSettings``)."""
        self.clients = Clients(cgroup_mount, enforcement.engine_socket, tuple(enforcement.registry_ports))

    def keep(self, snooper, seen, force: bool = False) -> None:
        """Housekeeping: the connections the kernel counted to learned addresses, per name (an
        address learned for several names counts for each), into ``seen``, which is saved."""
        if snooper is not None and self.clients is not None and self.clients.recorder is not None:
            counted = self.clients.recorder.connections()
            if counted:
                per_name: dict[str, int] = {}
                for name, addresses in snooper.learned.items():
                    for address in counted.keys() & addresses.keys():
                        per_name[name] = per_name.get(name, 0) + counted[address]
                seen.connected(per_name, time.time())
        seen.save(force)

    def close(self) -> None:
        if self.clients is not None:
            self.clients.close()

    def record(self, message: str, address: str, port: int, names: list[str] = (), reason: str = "",
               client: dict | None = None, containers=None, transport: str = "tcp", host: str | None = None) -> None:
        """One log line per blocked destination and client per interval: a client retrying in a
        loop must not flood the log (status counts every one). A client in a container whose name
        the engine has not told yet is logged once ``containers`` (``clients.Containers``) knows.
        ``names``: those this VM resolved to ``address``; ``host``: the name refused, if not the first."""
        if self.audit:
            message = f"audit: would block: {message}"
        client = client or {}
        host = host if host is not None else names[0] if names else ""
        line = f"{message} ({address} port {port})"
        block = {"time": time.time(), "message": message, "address": address, "port": port, "transport": transport,
                 "host": host,
                 "destination_names": list(names), "reason": reason, "client": client}
        fields = {"verdict": self.verdict, **{k: v for k, v in block.items() if k not in ("time", "message")},
                  **({"advice": advice(host)} if host else {})}
        self.recent.append(block)

        def write() -> None:
            said = f"{line} by {client_text(client)}" if client.get("recorded") else line
            self._throttle.log(logging.WARNING, f"{line} {client.get('pid', '')}", said, logs.event("block", **fields))
        if containers is not None and "container" in client:
            containers.complete(client, write)
        else:
            write()

    def name_and_record(self, packets: list[bytes], snooper, seen) -> None:
        """Blocked packets (their headers, from the log group): each named by the replies the
        snooper kept and by its client (``clients.Clients``: what the kernel recorded at connect
        time), logged, and kept in ``seen`` (a ``seen.Seen``) for ``ramfw report``."""
        snooper.index_unread()  # the replies kept since the verdicts: read before the names are
        for packet in packets:
            found = flow(packet)
            if found is None:
                continue
            snooper.counters["blocks_named"] += 1
            names = snooper.names_of(found.dst)
            reason = snooper.block_reason(names)
            snooper.counters[f"blocks_{reason}"] += 1
            client = self.clients.describe(found) if self.clients is not None else {}
            self.record(snooper.message_for(found.dst, names, reason), found.dst, found.dport, names=names,
                        reason=reason, client=client, transport=TRANSPORTS.get(found.proto, str(found.proto)),
                        containers=self.clients.containers if self.clients is not None else None)
            host = names[0] if names else ""
            seen.refusal(host, found.dst, found.dport, found.src, self.verdict, time.time(), process_name(client))


def client_text(client: dict) -> str:
    """``dockerd (pid 812, uid 0, /usr/sbin/dockerd, cgroup /system.slice/docker.service)``, or
    ``wget (pid 91, uid 0) in container builder (moby/buildkit, 1f2e3d4c5b6a)``. The names a
    process or a container's maker chose are quoted unless plain (``clients.quote``)."""
    details = [f"pid {client['pid']}", f"uid {client.get('uid', '?')}"]
    if client.get("exe"):
        details.append(quote(client["exe"]) + (f" {client['exe_note']}" if client.get("exe_note") else ""))
    elif client.get("exe_note"):
        details.append(f"executable {client['exe_note']}")
    container, comm, cgroup = client.get("container"), quote(client["comm"]), quote(client.get("cgroup", ""))
    if container is None:
        details += [f"cgroup {cgroup}"] if client.get("cgroup") else []
        return f"{comm} ({', '.join(details)})"
    if not container.get("name"):
        return (f"{comm} ({', '.join(details)}) in cgroup {cgroup}, named for container "
                f"{container['id'][:12]}, which the engine does not say runs there")
    named = [quote(container[key]) for key in ("image",) if container.get(key)] + [container["id"][:12]]
    return f"{comm} ({', '.join(details)}) in container {quote(container['name'])} ({', '.join(named)})"


def process_name(client: dict) -> str:
    """What ``ramfw report`` lists among a host's clients: the process, or its container (each
    name quoted unless plain: a name holding ", " cannot make entries of its own)."""
    if not client.get("recorded"):
        return ""
    container = client.get("container")
    if container is None or not container.get("name"):
        return quote(client["comm"])
    return f"{quote(client['comm'])} in {quote(container['name'])}"


_WORD = r'(?:[A-Za-z0-9_./@:+=-]+|"(?:[ !#-\[\]-~]|\\["\\/bfnrtu])*")'  # as ``clients.quote`` writes
_LISTED = re.compile(rf"{_WORD}(?: in {_WORD})?")


def listed(entry: str) -> str:
    """An entry of ``ramfw report``'s clients as printed: as ``process_name`` wrote it, or quoted
    whole where it is not in that form (a state file written by an older daemon, or by hand)."""
    return entry if _LISTED.fullmatch(entry) else json.dumps(entry)
