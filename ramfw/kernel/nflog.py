"""NFLOG (nfnetlink_log): packets the ruleset logs to a group, read over netlink.

ramfw uses one group for blocked connections (so status and the log can name them) and,
where the kernel cannot queue, one for passively copied DNS replies.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from . import netlink
from .netlink import (NFNL_SUBSYS_ULOG, NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_QTHRESH, NFULA_CFG_TIMEOUT,
                      NFULA_PAYLOAD, NFULNL_CFG_CMD_BIND, NFULNL_CFG_CMD_UNBIND, NFULNL_COPY_PACKET, NFULNL_MSG_CONFIG,
                      NFULNL_MSG_PACKET, attr, u32)

_PACKET = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
NFULA_IFINDEX_INDEV, NFULA_UID = 4, 11


@dataclass(frozen=True)
class Logged:
    """A logged packet, and whose it is as the kernel says: ``uid``, the owner of the local socket
    that sent it; ``indev``, the interface a packet from elsewhere came in by (None: not said)."""

    payload: bytes
    uid: int | None = None
    indev: int | None = None


class Log:
    """One bound NFLOG group; each logged packet arrives at once (queue threshold 1)."""

    def __init__(self, group: int, copy_range: int = 0xFFFF):
        self.group = group
        self.sock = netlink.open_socket()
        try:
            self._config(attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_BIND)))
            self._config(attr(NFULA_CFG_MODE, struct.pack("!IBx", copy_range, NFULNL_COPY_PACKET))
                         + u32(NFULA_CFG_QTHRESH, 1) + u32(NFULA_CFG_TIMEOUT, 0))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)  # the daemon's loop must never wait here

    def _config(self, attrs: bytes) -> None:
        netlink.request(self.sock, (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG, self.group, attrs,
                        f"NFLOG group {self.group}")

    def receive(self, bufsize: int = 1 << 17) -> list[bytes]:
        """The logged packets (network layer onwards) of the next waiting datagram; [] at once
        when none waits."""
        return [logged.payload for logged in self.receive_logged(bufsize)]

    def receive_logged(self, bufsize: int = 1 << 17) -> list[Logged]:
        """``receive``, with whose each packet is."""
        try:
            data = self.sock.recv(bufsize)
        except BlockingIOError:
            return []
        found = []
        for msg_type, start, end in netlink.messages(data):
            if msg_type == _PACKET:
                attrs = netlink.parse_attrs(data, start + netlink.NFGEN.size, end)
                if attrs.get(NFULA_PAYLOAD):
                    found.append(Logged(attrs[NFULA_PAYLOAD], _be32(attrs.get(NFULA_UID)),
                                        _be32(attrs.get(NFULA_IFINDEX_INDEV))))
        return found

    def close(self) -> None:
        try:
            self._config(attr(NFULA_CFG_CMD, struct.pack("B", NFULNL_CFG_CMD_UNBIND)))
        except OSError:
            pass
        self.sock.close()


def _be32(value: bytes | None) -> int | None:
    return struct.unpack("!I", value[:4])[0] if value is not None and len(value) >= 4 else None
