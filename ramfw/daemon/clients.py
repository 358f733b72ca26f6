"""The client of a blocked connection, for its block event: what the kernel recorded when it
connected (``kernel/clients``), and what /proc, the cgroup tree and the engine add to it.

Only the kernel's record says who connected: the pid, the process name and the cgroup come from
it, never from a guess made afterwards, and only from a record made in the ``RECORD_SECONDS``
before (a refused SYN is named within milliseconds; an older record is another packet's). The
executable is read from /proc at once, and only while the pid still runs the process that
connected (started before the connection, under the name it connected with); a path its own
mount namespace gives it is said to be one. The container's name and image come from the
engine's API, off the loop, in a thread of their own.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import http.client
import json
import logging
import os
import queue
import re
import socket
import struct
import threading
import time
import urllib.parse
from pathlib import Path

from ..kernel import bpf
from ..kernel.clients import MAX_ENTRIES, ClientRecorder, Connect
from ..snoop.packet import TCP, Flow

log = logging.getLogger("ramfw")
_CONTAINER = re.compile(r"(?:^|[-/:])([0-9a-f]{64})(?:\.scope)?$")  # docker-<id>.scope, /docker/<id>, ...
_SAFE = re.compile(r"[A-Za-z0-9_./@:+=-]+")  # a name printed as it is in a text line; others are quoted
_TICKS = os.sysconf("SC_CLK_TCK")
RECORD_SECONDS = 5  # a connect() recorded longer before its blocked packet is not believed to be its
MAX_CGROUPS = 4096  # cgroup directories looked at to name one cgroup id, where handles do not work
MISS_SECONDS = 10.0  # a cgroup id not found is looked for again after this long
ENGINE_SECONDS = 2.0  # for one whole question to the engine's API: connect, ask, read the answer
UNKNOWN_SECONDS = 30.0  # a container the engine did not place in a cgroup is asked about again after this
FILEID_KERNFS = 0xFE  # a kernfs (cgroup) file handle: the node's 64-bit id, which is the cgroup id
UNRECORDED = (f"no connect() recorded for it within {RECORD_SECONDS} s: made before this daemon started, a raw "
              f"socket's or forged packet, recorded longer ago (a port reused, a forged copy of a connection), or "
              f"evicted by more than {MAX_ENTRIES} newer connections")
RENAMED = "not read: the process has another name than it connected with (it may run another program since)"
OTHER_MOUNTS = "as its own mount namespace names it"  # that path is another file, or none, in ramfw's
DELETED = "deleted or replaced since it started"


class Clients:
    """Names the clients of blocked packets; ``problem`` says why it cannot (then every event
    says the client was not recorded, and why)."""

    def __init__(self, cgroup_mount: str | None, engine_socket: str, count_ports: tuple[int, ...] | None = None):
        """``cgroup_mount``: the engine scope's (a mount of its own where the namespace has none);
        ``count_ports``: those whose connections are counted per destination (the registry ports)."""
        cgroup_mount = cgroup_mount or bpf.cgroup2_mount()
        self.recorder, self.problem, self.mount = None, "", cgroup_mount
        self.cgroups = CgroupPaths(cgroup_mount)
        self.containers = Containers(engine_socket)
        if cgroup_mount is None:
            self.problem = "no cgroup v2 hierarchy to attach the client recorder to"
            return
        try:
            self.recorder = ClientRecorder(cgroup_mount, count_ports)
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
        return self.client(self.recorder.lookup(found.src, found.sport, found.dst, found.dport))

    def client(self, connect: Connect | None) -> dict:
        """A record (from ``lookup``) as a ``client`` field: unrecorded if there is none, or it is
        older than ``RECORD_SECONDS`` on the boot clock."""
        age_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME) - connect.boot_ns if connect is not None else 0
        if connect is None or age_ns > RECORD_SECONDS * 1_000_000_000:
            return {"recorded": False, "why": UNRECORDED}
        exe, note = executable(connect)
        client = {"recorded": True, "pid": connect.pid, "comm": printable(connect.comm), "uid": connect.uid,
                  "exe": printable(exe), **({"exe_note": note} if note else {}),
                  "cgroup": printable(self.cgroups.path(connect.cgroup_id))}
        match = _CONTAINER.search(client["cgroup"])
        if match:  # a container's, if the engine says so (``Containers``)
            client["container"] = {"id": match.group(1), "name": "", "image": ""}
        return client

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self.containers.close()


class CgroupPaths:
    """Cgroup ids to paths: the paths found are kept (ids are not reused; cgroup v2 directories
    cannot be renamed), the ids not found are looked for again after ``MISS_SECONDS``."""

    def __init__(self, mount: str | None):
        self.mount = mount
        self._found: dict[int, str] = {}
        self._missed: dict[int, float] = {}  # id -> when it was not found

    def path(self, cgroup_id: int) -> str:
        """The cgroup v2 path of an id, relative to the mount; "" if not found."""
        if cgroup_id in self._found:
            return self._found[cgroup_id]
        now = time.monotonic()
        if not self.mount or now - self._missed.get(cgroup_id, -MISS_SECONDS) < MISS_SECONDS:
            return ""
        path = find_cgroup(self.mount, cgroup_id)
        cache = self._found if path else self._missed
        if len(cache) >= 1024:
            cache.clear()
        cache[cgroup_id] = path if path else now
        return path


def find_cgroup(mount: str, cgroup_id: int) -> str:
    """A cgroup id's path: opened by its file handle (one system call), or where the kernel does
    not take the handle, by a walk of the tree (bounded: ``MAX_CGROUPS``)."""
    if cgroup_id == 1:
        return "/"
    try:
        return cgroup_by_handle(mount, cgroup_id)
    except OSError as err:
        if err.errno == errno.ESTALE:  # the kernel knows no such cgroup (any more)
            return ""
    return walk_cgroups(mount, cgroup_id)


_libc = ctypes.CDLL(None, use_errno=True)


def cgroup_by_handle(mount: str, cgroup_id: int) -> str:
    """open_by_handle_at(2) with a kernfs handle (the id), then the path the opened directory has
    here; "" if it is outside ``mount``. Needs CAP_DAC_READ_SEARCH (the daemon runs as root)."""
    open_by_handle = getattr(_libc, "open_by_handle_at", None)
    if open_by_handle is None:
        raise OSError(errno.ENOSYS, "no open_by_handle_at in this C library")
    handle = ctypes.create_string_buffer(struct.pack("<IiQ", 8, FILEID_KERNFS, cgroup_id))
    mount_fd = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = open_by_handle(mount_fd, handle, os.O_RDONLY | os.O_DIRECTORY)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        os.close(mount_fd)
    try:
        path = os.readlink(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    root = os.path.realpath(mount).rstrip("/")
    if path == root or path == root + "/":
        return "/"
    return path[len(root):] if path.startswith(root + "/") else ""


def walk_cgroups(mount: str, cgroup_id: int) -> str:
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


def executable(connect: Connect) -> tuple[str, str]:
    """/proc/<pid>/exe and a note on it: ("", "") if the pid has exited or names a process
    started after the connect; ("", ``RENAMED``) if the process has another name now than it
    connected with (an exec since names the new program); the path and ``OTHER_MOUNTS`` where
    it names another file in ramfw's mount namespace (or none) than the process runs."""
    pid = connect.pid
    try:
        path = os.readlink(f"/proc/{pid}/exe")
        running = os.stat(f"/proc/{pid}/exe")
        stat = Path(f"/proc/{pid}/stat").read_text()  # read after the path: an exec before it shows below
        started = int(stat.rsplit(")", 1)[1].split()[19]) * 1_000_000_000 // _TICKS
        if started > connect.boot_ns:
            return "", ""
        if thread_name(pid, connect.thread) != connect.comm:
            return "", RENAMED
    except (OSError, ValueError, IndexError):
        return "", ""
    try:
        here = os.stat(path)
    except (OSError, ValueError):
        here = None
    if here is not None and (here.st_dev, here.st_ino) == (running.st_dev, running.st_ino):
        return path, ""
    return path, DELETED if running.st_nlink == 0 else OTHER_MOUNTS


def thread_name(pid: int, thread: int) -> str:
    """The name (comm) of the thread that connected, or where it has gone, of the process."""
    for where in (f"/proc/{pid}/task/{thread}/comm", f"/proc/{pid}/comm"):
        with contextlib.suppress(FileNotFoundError):
            return Path(where).read_bytes().rstrip(b"\n").decode(errors="replace")
    raise FileNotFoundError(f"/proc/{pid}/comm")


class _Deadline(socket.socket):
    """A Unix socket whose every operation takes from one ``deadline`` (``time.monotonic``): an
    engine that answers a byte at a time cannot hold an event longer than that."""

    deadline = 0.0

    def _left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no whole answer within {ENGINE_SECONDS:g} s")
        self.settimeout(left)

    def connect(self, address) -> None:
        self._left()
        super().connect(address)

    def sendall(self, data, *flags) -> None:
        self._left()
        super().sendall(data, *flags)

    def recv_into(self, *args) -> int:
        self._left()
        return super().recv_into(*args)


class Containers:
    """Container names and images from the engine's API (``GET /containers/<id>/json``), asked in
    a thread, one question at a time, each ``ENGINE_SECONDS`` at most: a slow engine never holds
    up the loop.

    A cgroup's name is not proof: anyone with a delegated cgroup subtree (systemd gives each
    user one) can name a cgroup ``docker-<id>.scope`` after a real container. A container is
    named only when the engine says its process runs in the cgroup the kernel recorded (``_fill``).
    What the engine placed is kept; what it did not (no such container, not running, no
    answer) is asked again only after ``UNKNOWN_SECONDS``."""

    def __init__(self, engine_socket: str):
        self.socket = engine_socket
        self._known: dict[str, dict] = {}  # id -> name, image, cgroup (its process's), as the engine said
        self._unknown: dict[str, float] = {}  # id -> when the engine did not place it
        self._work: queue.Queue = queue.Queue(maxsize=256)
        self._thread: threading.Thread | None = None

    def complete(self, client: dict, done) -> None:
        """Fill in ``client["container"]`` (its ``id`` given) with ``name`` and ``image``, then call
        ``done()``: at once if known (or recently unknown), else from the thread once the engine
        answers (or does not)."""
        container_id = client["container"]["id"]
        known = self._known.get(container_id)
        if known is not None or self._recently_unknown(container_id):
            _fill(client, known or {})
            done()
            return
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ramfw-containers", daemon=True)
            self._thread.start()
        try:
            self._work.put_nowait((client, done))
        except queue.Full:  # a flood of new containers: the event goes out without the names
            done()

    def _recently_unknown(self, container_id: str) -> bool:
        return time.monotonic() - self._unknown.get(container_id, -UNKNOWN_SECONDS) < UNKNOWN_SECONDS

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            client, done = item
            try:
                _fill(client, self.known(client["container"]["id"]))
            except Exception:  # noqa: BLE001: nothing may end the thread
                log.exception("a container could not be named")
            try:
                done()
            except Exception:  # noqa: BLE001: a log call must not end the thread
                log.exception("a block event could not be written")

    def known(self, container_id: str) -> dict:
        """What is known of a container, asking the engine unless it was asked recently."""
        known = self._known.get(container_id)
        if known is not None or self._recently_unknown(container_id):
            return known or {}
        try:
            known = self.inspect(container_id)
        except Exception as err:  # noqa: BLE001: what an engine sends (deeply nested JSON...) must not end the thread
            log.warning("the engine at %s did not name container %s: %r", self.socket, container_id[:12], err)
            known = {"name": "", "image": "", "cgroup": ""}
        cache = self._known if known["cgroup"] else self._unknown
        if len(cache) >= 1024:
            cache.clear()
        cache[container_id] = known if known["cgroup"] else time.monotonic()
        return known

    def inspect(self, container_id: str) -> dict:
        """What the engine says of a container: name, image, and the cgroup its process is in
        ("" if it runs none). Raises what a failed or junk answer raises."""
        conn = http.client.HTTPConnection("engine")
        try:
            conn.sock = _Deadline(socket.AF_UNIX, socket.SOCK_STREAM)
            conn.sock.deadline = time.monotonic() + ENGINE_SECONDS
            conn.sock.connect(self.socket)
            conn.request("GET", f"/containers/{urllib.parse.quote(container_id)}/json")
            response = conn.getresponse()
            body = json.loads(response.read(1 << 20)) if response.status == 200 else {}
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
                self._work.put(None, timeout=ENGINE_SECONDS)
            self._thread.join(ENGINE_SECONDS + 1)
            self._thread = None


def _fill(client: dict, known: dict) -> None:
    """The engine's names, where the client's cgroup is its container's process's or below the
    container's: the two paths agree up to and including the component holding the id."""
    if same_container(client["cgroup"], known.get("cgroup") or "", client["container"]["id"]):
        client["container"].update(name=known["name"], image=known["image"])


def same_container(cgroup: str, engine_cgroup: str, container_id: str) -> bool:
    """Both paths hold the id, and are the same up to the component that does: the process is
    in the container's cgroup or below it (``.../docker-<id>.scope/init`` and ``.../other`` are
    one container's, as in docker-in-docker); a path without the id is no container's."""
    mine = _up_to_id(cgroup, container_id)
    return bool(container_id) and mine is not None and mine == _up_to_id(engine_cgroup, container_id)


def _up_to_id(path: str, container_id: str) -> list[str] | None:
    parts = path.split("/")
    for index, part in enumerate(parts):
        if container_id in part:
            return parts[:index + 1]
    return None


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


def quote(text: str) -> str:
    """A name as a text line shows it: as it is if made of ``_SAFE`` characters only, else quoted
    as a JSON string (a path holding ", cgroup /x)" cannot write the rest of the line)."""
    return text if _SAFE.fullmatch(text) else json.dumps(text)
