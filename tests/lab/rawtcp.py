"""A TCP client made of raw packets (IPv4), for the lab: it sends its segments as a hostile
client with CAP_NET_RAW would, in any order, overlapping, with bad checksums, and a reset only
conntrack believes. The lab, never shipped.

The kernel of the namespace it runs in would answer the server's SYN-ACK with a reset (no socket
of its own asked): a table of its own there drops those resets, and goes with the namespace.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time

SYN, RST, PSH, ACK, URG = 0x02, 0x04, 0x08, 0x10, 0x20


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class RawFlow:
    def __init__(self, ns, src: str, dst: str, dport: int = 443, mark: int = 0x52410000):
        self.src, self.dst, self.dport = src, dst, dport
        self.sport = random.randrange(20000, 30000)
        self.isn = random.randrange(1 << 32)
        self.ack = 0
        ns.run("nft", f"add table ip rawtcp{self.sport}; add chain ip rawtcp{self.sport} out "
                      f"{{ type filter hook output priority -300; }}; add rule ip rawtcp{self.sport} out "
                      f"meta mark 0 tcp sport {self.sport} tcp flags rst drop")  # the kernel's own, not ours (marked)
        with ns.inside():
            self.out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.inp = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)  # the kernel's resets have none

    def packet(self, seq: int, flags: int, payload: bytes = b"", ack: int | None = None, good: bool = True,
               ttl: int = 64, tsval: int | None = None) -> bytes:
        options = struct.pack("!BBH", 2, 4, 1460) if flags & SYN else b""
        if tsval is not None:
            options += struct.pack("!BBBBII", 1, 1, 8, 10, tsval, 0)
        offset = (20 + len(options)) // 4
        header = struct.pack("!HHIIBBHHH", self.sport, self.dport, seq & 0xFFFFFFFF,
                             (self.ack if ack is None else ack) & 0xFFFFFFFF, offset << 4, flags, 64240, 0, 0)
        segment = header + options + payload
        pseudo = socket.inet_aton(self.src) + socket.inet_aton(self.dst) + struct.pack("!BBH", 0, 6, len(segment))
        checksum = _sum(pseudo + segment) ^ (0 if good else 0x5A5A)
        segment = segment[:16] + struct.pack("!H", checksum) + segment[18:]
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment), random.randrange(65536), 0x4000, ttl, 6, 0,
                         socket.inet_aton(self.src), socket.inet_aton(self.dst))
        return ip + segment

    def _send(self, data: bytes) -> None:
        try:
            self.out.sendto(data, (self.dst, 0))
        except PermissionError:  # dropped on the way out by a rule
            pass

    def replies(self, timeout: float):
        """(flags, payload) of the server's packets to this flow, until ``timeout`` passes quiet."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.inp], [], [], left)[0]:
                return
            data = self.inp.recv(65536)
            ihl = (data[0] & 0x0F) * 4
            sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", data, ihl)
            if data[12:16] != socket.inet_aton(self.dst) or sport != self.dport or dport != self.sport:
                continue
            yield flags, seq, data[ihl + (off >> 4) * 4:]

    def handshake(self) -> None:
        self._send(self.packet(self.isn, SYN, ack=0))
        for flags, seq, _ in self.replies(3):
            if flags & (SYN | ACK) == SYN | ACK:
                self.ack = seq + 1
                self._send(self.packet(self.isn + 1, ACK))
                return
        raise RuntimeError("no SYN-ACK")

    def send(self, offset: int, payload: bytes, good: bool = True, ttl: int = 64, ack: int | None = None,
             urgent: bool = False, tsval: int | None = None) -> None:
        """A data segment at ``offset`` in the stream (0: the byte after the SYN); ``ack``: an
        acknowledgment other than the right one, ``urgent``: with URG set."""
        flags = PSH | ACK | (URG if urgent else 0)
        self._send(self.packet(self.isn + 1 + offset, flags, payload, ack=ack, good=good, ttl=ttl, tsval=tsval))

    def reset(self, offset: int) -> None:
        self._send(self.packet(self.isn + 1 + offset, RST | ACK))

    def outcome(self, timeout: float = 1.5) -> str:
        """"answered" (the server sent data), "reset", or "nothing"."""
        for flags, _, payload in self.replies(timeout):
            if flags & RST:
                return "reset"
            if payload:
                return "answered"
        return "nothing"

    def close(self) -> None:
        self.out.close()
        self.inp.close()
