"""The control protocol, server and client: one JSON line each way over a Unix socket.

The daemon listens on a socket file in its run directory and on an abstract socket of its
network namespace. The abstract socket is also the lock that keeps one daemon per namespace
(what WSL2 needs: its distributions share a network namespace, not /run), and a control
socket every distribution can reach. Mutating commands need uid 0 (``SO_PEERCRED``).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from pathlib import Path
from typing import Callable

from ..config import Config
from ..errors import DaemonError

READ_ONLY = ("ping", "status")  # what any local user may ask


def abstract_address(config: Config) -> str:
    return f"\0ramfw/{config.enforcement.table}"


def read_line(conn: socket.socket, limit: int = 65536) -> str:
    data = bytearray()
    while b"\n" not in data[-65536:] and len(data) < limit:
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


class ControlServer:
    """The daemon's two listening sockets; ``serve`` answers one connection with ``handle``."""

    def __init__(self, config: Config, handle: Callable[[str], dict]):
        self.config, self.handle = config, handle
        self.lock: socket.socket | None = None
        self.control: socket.socket | None = None

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
        with conn:
            conn.settimeout(2)
            try:
                request = json.loads(read_line(conn) or "{}")
                command = request.get("command", "")
                if peer_uid(conn) != 0 and command not in READ_ONLY:
                    reply = {"ok": False, "error": f"{command} needs root"}
                else:
                    reply = self.handle(command)
            except (OSError, ValueError) as err:
                reply = {"ok": False, "error": str(err)}
            try:
                conn.sendall(json.dumps(reply).encode() + b"\n")
            except OSError:
                pass

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
            try:
                os.unlink(self.config.daemon.socket)
            except FileNotFoundError:
                pass
        if self.lock is not None:
            self.lock.close()


def request(config: Config, command: str, timeout: float = 5.0) -> dict:
    """Ask the daemon (its socket file, else the namespace's abstract socket); DaemonError if
    neither answers."""
    failures = []
    for address in (config.daemon.socket, abstract_address(config)):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(timeout)
                sock.connect(address)
                if peer_uid(sock) != 0:  # a squatter on the address, not the daemon (which runs as root)
                    failures.append(f"{address!r} is held by uid {peer_uid(sock)}, not by the ramfw daemon")
                    continue
                sock.sendall(json.dumps({"command": command}).encode() + b"\n")
                return json.loads(read_line(sock, 1 << 26))
        except (OSError, ValueError) as err:
            failures.append(str(err))
    raise DaemonError(f"the ramfw daemon is not reachable ({config.daemon.socket}: {failures[0]})")


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
