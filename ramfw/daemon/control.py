"""The control protocol, server and client: one JSON line each way over a Unix socket.

The daemon listens on a socket file in its run directory and on an abstract socket of its
network namespace. The abstract socket is also the lock that keeps one daemon per namespace
(what WSL2 needs: its distributions share a network namespace, not /run), and a control
socket every distribution can reach. Mutating commands need uid 0 (``SO_PEERCRED``).

No client can stall the daemon's loop: each connection is read and answered by a thread of
its own, within a deadline for the whole request (a client that sends a byte a second is cut
off), and at most ``MAX_CLIENTS`` at once; only the command itself runs in the loop, handed
over through a queue and a wake-up. A command that touches nothing of the loop's runs in the
client's thread instead (``THREADED``: ``check`` probes registries for ``ramfw check``, and its
connections are the daemon's own, exempt from host scope by its cgroup as the policy polls
are). A client believes only a server running as root.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import threading
import time
from pathlib import Path
from typing import Callable

from ..config import Config
from ..errors import DaemonError

READ_ONLY = ("ping", "status")  # what any local user may ask
MAX_CLIENTS = 16
DEADLINE = 2.0  # seconds for a whole request to arrive, and for its answer to leave


def check(request: dict) -> dict:
    """``ramfw check``'s probes, made by the daemon (root asked): the images, the logins the
    caller read from its Docker config, the resolvers to ask, the engine's certs.d."""
    from ..check import probe

    images, logins = request.get("images"), request.get("logins") or {}
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images) or not isinstance(logins, dict):
        return {"ok": False, "error": "check takes a list of images"}
    nameservers = [str(n) for n in request.get("nameservers") or []]
    results = probe.probe_all(images, {k: v for k, v in logins.items() if isinstance(v, dict)}, nameservers,
                              str(request.get("certs_dir") or probe.CERTS_DIR), by="the ramfw daemon")
    return {"ok": True, "results": results}


THREADED = {"check": check}  # answered in the client's thread, without the loop


def abstract_address(config: Config) -> str:
    return f"\0ramfw/{config.enforcement.table}"


def read_line(conn: socket.socket, limit: int = 65536, deadline: float | None = None) -> str:
    """One line; with ``deadline`` (a time.monotonic() value) the whole line must come by then,
    else TimeoutError."""
    data = bytearray()
    while b"\n" not in data[-65536:] and len(data) < limit:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the request did not arrive in time")
            conn.settimeout(remaining)
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


def peer_cred(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the other end, as the kernel recorded it (SO_PEERCRED)."""
    pid, uid, _ = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    return pid, uid


def peer_uid(conn: socket.socket) -> int:
    return peer_cred(conn)[1]


class _Request:
    def __init__(self, command: str, uid: int):
        self.command, self.uid = command, uid
        self.reply: dict = {"ok": False, "error": "the daemon did not answer in time"}
        self.prepared: object = None
        self.done = threading.Event()


class ControlServer:
    """The daemon's two listening sockets. ``serve`` (in the loop) accepts a connection and
    gives it a thread; ``run_pending`` (in the loop) runs the commands those threads read,
    with ``handle(command, uid, prepared)``; ``wake`` (set by the loop) tells the loop one is
    waiting. ``prepare`` (set by the loop), when a command needs slow work first (a reload
    fetching the policy URL), does it in the client's thread: what it returns is ``prepared``."""

    def __init__(self, config: Config, handle: Callable[[str, int], dict]):
        self.config, self.handle = config, handle
        self.lock: socket.socket | None = None
        self.control: socket.socket | None = None
        self.wake: Callable[[], None] = lambda: None
        self.prepare: Callable[[str], object] = lambda command: None
        self.pending: queue.Queue[_Request] = queue.Queue()
        self.clients = threading.BoundedSemaphore(MAX_CLIENTS)

    def take_lock(self) -> None:
        """Bind the namespace's abstract address: a second daemon stops here, before it
        touches anything."""
        self.lock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.lock.bind(abstract_address(self.config))
        except OSError:
            self.lock.close()
            self.lock = None
            holder = _holder(abstract_address(self.config))
            if holder and holder[1] != 0:
                raise DaemonError(f"the daemon's address in this network namespace is held by pid {holder[0]} "
                                  f"(uid {holder[1]}), not by a ramfw daemon: stop that process") from None
            raise DaemonError("another ramfw daemon is running in this network namespace "
                              "(`ramfw status` talks to it)") from None
        self.lock.listen(16)

    def open(self) -> None:
        """The control socket: a file for this system, beside the namespace's abstract one."""
        path = Path(self.config.daemon.socket)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.control = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.control.bind(str(path))
        os.chmod(path, 0o600)
        self.control.listen(16)

    def listeners(self) -> list[socket.socket]:
        return [s for s in (self.control, self.lock) if s is not None]

    def serve(self, listener: socket.socket) -> None:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        try:
            limited = peer_uid(conn) != 0  # root always gets an answer; others share MAX_CLIENTS
        except OSError:
            conn.close()
            return
        if limited and not self.clients.acquire(blocking=False):
            conn.close()  # too many at once: the loop never waits for a client
            return
        threading.Thread(target=self._client, args=(conn, limited), name="control-client", daemon=True).start()

    def _client(self, conn: socket.socket, limited: bool) -> None:
        try:
            with conn:
                reply = self._answer(conn)
                conn.settimeout(DEADLINE)
                conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass
        finally:
            if limited:
                self.clients.release()

    def _answer(self, conn: socket.socket) -> dict:
        try:
            request = json.loads(read_line(conn, deadline=time.monotonic() + DEADLINE) or "{}")
            command, uid = str(request.get("command", "")), peer_uid(conn)
        except Exception as err:  # noqa: BLE001 - any request gets an answer (deep nesting: RecursionError)
            return {"ok": False, "error": f"bad request: {type(err).__name__}"}
        if uid != 0 and command not in READ_ONLY:
            return {"ok": False, "error": f"{command} needs root"}
        if command in THREADED:
            try:
                return THREADED[command](request)
            except Exception as err:  # noqa: BLE001 - the client gets an answer
                return {"ok": False, "error": f"{command} failed: {err}"}
        pending = _Request(command, uid)
        try:
            pending.prepared = self.prepare(command)
        except Exception as err:  # noqa: BLE001 - the command still runs, and says what failed
            pending.prepared = err
        self.pending.put(pending)
        self.wake()
        pending.done.wait(30)
        return pending.reply

    def run_pending(self) -> None:
        """In the loop: run every command the client threads have read."""
        while True:
            try:
                pending = self.pending.get_nowait()
            except queue.Empty:
                return
            try:
                pending.reply = self.handle(pending.command, pending.uid, pending.prepared)
            except Exception as err:  # noqa: BLE001 - the client gets an answer, the loop goes on
                pending.reply = {"ok": False, "error": repr(err)}
            pending.done.set()

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.config.daemon.socket)
            except FileNotFoundError:
                pass
        if self.lock is not None:
            self.lock.close()


def request(config: Config, command: str, timeout: float = 5.0, arguments: dict | None = None) -> dict:
    """Ask the daemon (its socket file, else the namespace's abstract socket); DaemonError if
    neither answers. ``timeout`` is for each read."""
    failures = []
    for address in (config.daemon.socket, abstract_address(config)):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                if peer_uid(sock) != 0:  # a squatter on the address, not the daemon (which runs as root)
                    failures.append(f"{address!r} is held by uid {peer_uid(sock)}, not by the ramfw daemon")
                    continue
                sock.sendall(json.dumps({**(arguments or {}), "command": command}).encode() + b"\n")
                return json.loads(read_line(sock, 1 << 26))  # a status can be large; the timeout is per read
        except (OSError, ValueError) as err:
            failures.append(str(err))
    raise DaemonError(f"the ramfw daemon is not reachable ({config.daemon.socket}: {'; '.join(failures)})")


def _holder(address: str) -> tuple[int, int] | None:
    """(pid, uid) of whoever listens on ``address``, or None."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(address)
        except OSError:
            return None
        return peer_cred(sock)


def daemon_present(config: Config) -> bool:
    """A daemon holds this namespace's lock (running, or still starting): it listens on the
    abstract address, as root (anyone else there is a squatter, not the daemon)."""
    holder = _holder(abstract_address(config))
    return holder is not None and holder[1] == 0


def answers(config: Config) -> bool:
    try:
        request(config, "ping", timeout=1)
    except DaemonError:
        return False
    return True
