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
from ..kernel.clients import MAX_ENTRIES, ClientRecorder
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
            return {"recorded": False, "why": f"no connect() recorded for it: a raw socket's or forged packet, or "
                                              f"more than {MAX_ENTRIES} connections since"}
        client = {"recorded": True, "pid": connect.pid, "comm": printable(connect.comm), "uid": connect.uid,
                  "exe": printable(executable(connect.pid, connect.boot_ns)),
                  "cgroup": printable(self.cgroup_path(connect.cgroup_id))}
        match = _CONTAINER.search(client["cgroup"])
        if match:  # a container's, if the engine says so (``Containers``)
            client["container"] = {"id": match.group(1), "name": "", "image": ""}
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
    a thread: a slow engine never holds up the loop.

    A cgroup's name is not proof: anyone with a delegated cgroup subtree (systemd gives each
    user one) can name a cgroup ``docker-<id>.scope`` after a real container. A container is
    named only when the engine says its process runs in the very cgroup the kernel recorded."""

    def __init__(self, engine_socket: str):
        self.socket = engine_socket
        self._known: dict[str, dict] = {}  # id -> name, image, cgroup (its process's), as the engine said
        self._work: queue.Queue = queue.Queue(maxsize=256)
        self._thread: threading.Thread | None = None

    def complete(self, client: dict, done) -> None:
        """Fill in ``client["container"]`` (its ``id`` given) with ``name`` and ``image``, then call
        ``done()``: at once if known, else from the thread once the engine answers (or does not)."""
        known = self._known.get(client["container"]["id"])
        if known is not None:
            _fill(client, known)
            done()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ramfw-containers", daemon=True)
            self._thread.start()
        try:
            self._work.put_nowait((client, done))
        except queue.Full:  # a flood of new containers: the event goes out without the names
            done()

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            client, done = item
            container_id = client["container"]["id"]
            known = self._known.get(container_id) or self.inspect(container_id)
            if known["name"]:  # what the engine could not say is asked again next time
                if len(self._known) >= 1024:
                    self._known.clear()
                self._known[container_id] = known
            _fill(client, known)
            try:
                done()
            except Exception:  # noqa: BLE001: a log call must not end the thread
                log.exception("a block event could not be written")

    def inspect(self, container_id: str) -> dict:
        """What the engine says of a container: name, image, and the cgroup its process is in."""
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
            body = {}
        finally:
            conn.close()
        body = body if isinstance(body, dict) else {}
        config, state = body.get("Config"), body.get("State")
        pid = state.get("Pid") if isinstance(state, dict) else None
        return {"name": printable(str(body.get("Name", "")).lstrip("/")),
                "image": printable(str(config.get("Image", ""))) if isinstance(config, dict) else "",
                "cgroup": process_cgroup(pid) if isinstance(pid, int) and pid > 0 else ""}

    def close(self) -> None:
        if self._thread is not None:
            with contextlib.suppress(queue.Full):
                self._work.put(None, timeout=ENGINE_TIMEOUT)
            self._thread.join(ENGINE_TIMEOUT + 1)
            self._thread = None


def _fill(client: dict, known: dict) -> None:
    """The engine's names, where its container's process runs in the client's cgroup (or above it)."""
    cgroup = known.get("cgroup") or ""
    if cgroup and (client["cgroup"] == cgroup or client["cgroup"].startswith(cgroup.rstrip("/") + "/")):
        client["container"].update(name=known["name"], image=known["image"])


def process_cgroup(pid: int) -> str:
    """A process's cgroup v2 path, as /proc shows it to ramfw; "" if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        pass
    return ""


def printable(text: str) -> str:
    """A name a process gave itself (``comm``, a path, a container's): control characters would
    let it write lines of its own into a text log."""
    return "".join(c if c.isprintable() else "?" for c in text)
