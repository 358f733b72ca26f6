"""The client of a blocked connection, for its block event: what the kernel recorded when it
connected (``kernel/clients``), and what /proc, the cgroup tree and the engine add to it.

Only the kernel's record says who connected: the pid, the process name and the cgroup come from
it, never from a guess made afterwards. The executable is read from /proc at once, and only while
the pid still runs the process that connected (started before the connection); the container's
name and image come from the engine's API, off the loop, in a thread of their own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import os
import queue
import re
import socket
import threading
import urllib.parse
from pathlib import Path

from ..kernel import bpf
from ..snoop.packet import TCP, Flow

log = logging.getLogger("ramfw")
_CONTAINER = re.compile(r"(?:^|[-/:])([0-9a-f]{64})(?:\.scope)?$")  # docker-<id>.scope, /docker/<id>, ...
_TICKS = os.sysconf("SC_CLK_TCK")
MAX_CGROUPS = 4096  # cgroup directories looked at to name one cgroup id
ENGINE_TIMEOUT = 2.0  # seconds for one answer of the engine's API


class Clients:
    """Names the clients of blocked packets; ``problem`` says why it cannot (then every event
    says the client was not recorded, and why)."""

    def __init__(self, cgroup_mount: str | None, engine_socket: str):
        """``cgroup_mount``: the engine scope's (a mount of its own where the namespace has none)."""
        cgroup_mount = cgroup_mount or bpf.cgroup2_mount()
        self.recorder, self.problem, self.mount = None, "", cgroup_mount
        self._cgroups: dict[int, str] = {}
        self.containers = Containers(engine_socket)
        if cgroup_mount is None:
            self.problem = "no cgroup v2 hierarchy to attach the client recorder to"
            return
        from ..kernel.clients import ClientRecorder
        try:
            self.recorder = ClientRecorder(cgroup_mount)
        except OSError as err:
            self.problem = f"the kernel refused the client recorder: {err.strerror}"
        if self.problem:
            log.warning("block events cannot name their clients: %s", self.problem)

    def describe(self, found: Flow) -> dict:
        """The client of a blocked packet, as a block event's ``client`` field."""
        if self.recorder is None:
            return {"recorded": False, "why": self.problem}
        if found.proto != TCP:
            return {"recorded": False, "why": "only TCP connections are recorded"}
        connect = self.recorder.lookup(found.src, found.sport, found.dst, found.dport)
        if connect is None:
            return {"recorded": False, "why": "no connect() made this packet (a raw socket's, or forged)"}
        client = {"recorded": True, "pid": connect.pid, "comm": connect.comm, "uid": connect.uid,
                  "exe": executable(connect.pid, connect.boot_ns), "cgroup": self.cgroup_path(connect.cgroup_id)}
        match = _CONTAINER.search(client["cgroup"])
        if match:
            client["container"] = {"id": match.group(1), "name": "", "image": ""}  # the engine names it
        return client

    def cgroup_path(self, cgroup_id: int) -> str:
        """The cgroup v2 path of an id (the directory's inode number), cached; "" if not found."""
        if cgroup_id not in self._cgroups:
            if len(self._cgroups) >= 1024:
                self._cgroups.clear()
            self._cgroups[cgroup_id] = find_cgroup(self.mount, cgroup_id) if self.mount else ""
        return self._cgroups[cgroup_id]

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self.containers.close()


def find_cgroup(mount: str, cgroup_id: int) -> str:
    if cgroup_id == 1:
        return "/"
    looked, pending = 0, [mount]
    while pending and looked < MAX_CGROUPS:
        directory = pending.pop()
        try:
            with os.scandir(directory) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        looked += 1
                        if entry.inode() == cgroup_id:
                            return "/" + os.path.relpath(entry.path, mount)
                        pending.append(entry.path)
        except OSError:
            continue
    return ""


def executable(pid: int, connected_ns: int) -> str:
    """/proc/<pid>/exe, if ``pid`` is still the process that connected (it started before
    ``connected_ns``, on the boot clock); "" if it has exited or the pid names another."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        started = int(stat.rsplit(")", 1)[1].split()[19]) * 1_000_000_000 // _TICKS
        if started > connected_ns:
            return ""
        return os.readlink(f"/proc/{pid}/exe")
    except (OSError, ValueError, IndexError):
        return ""


class Containers:
    """Container names and images from the engine's API (``GET /containers/<id>/json``), asked in
    a thread: a slow engine never holds up the loop. ``complete(event, fields, done)`` fills in
    the container of an event's client, then calls ``done``, in order."""

    def __init__(self, engine_socket: str):
        self.socket = engine_socket
        self._known: dict[str, dict] = {}
        self._work: queue.Queue = queue.Queue(maxsize=256)
        self._thread: threading.Thread | None = None

    def known(self, container_id: str) -> dict | None:
        return self._known.get(container_id)

    def complete(self, container: dict, done) -> None:
        """Fill in ``container`` (its ``id`` given) with ``name`` and ``image``, then call ``done()``:
        at once if known, else from the thread once the engine answers (or does not)."""
        known = self._known.get(container["id"])
        if known is not None:
            container.update(known)
            done()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ramfw-containers", daemon=True)
            self._thread.start()
        try:
            self._work.put_nowait((container, done))
        except queue.Full:  # a flood of new containers: the event goes out without the names
            done()

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            container, done = item
            if container["id"] not in self._known:
                found = self.inspect(container["id"])
                if found.get("name") or len(self._known) < 1024:
                    self._known[container["id"]] = found
            container.update(self._known.get(container["id"], {}))
            try:
                done()
            except Exception:  # noqa: BLE001: a log call must not end the thread
                log.exception("a block event could not be written")

    def inspect(self, container_id: str) -> dict:
        conn = http.client.HTTPConnection("engine", timeout=ENGINE_TIMEOUT)
        try:
            conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.sock.settimeout(ENGINE_TIMEOUT)
            conn.sock.connect(self.socket)
            conn.request("GET", f"/containers/{urllib.parse.quote(container_id)}/json")
            response = conn.getresponse()
            body = json.loads(response.read(1 << 20)) if response.status == 200 else {}
        except (OSError, ValueError, http.client.HTTPException) as err:
            log.warning("the engine at %s did not name container %s: %s", self.socket, container_id[:12], err)
            return {"name": "", "image": ""}
        finally:
            conn.close()
        config = body.get("Config") if isinstance(body, dict) else None
        return {"name": str(body.get("Name", "")).lstrip("/") if isinstance(body, dict) else "",
                "image": str(config.get("Image", "")) if isinstance(config, dict) else ""}

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._work.put(None, timeout=ENGINE_TIMEOUT)
            self._thread.join(ENGINE_TIMEOUT + 1)
            self._thread = None
