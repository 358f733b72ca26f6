"""A TCP client made of raw packets (IPv4 and IPv6), for the lab: it sends its segments as a
hostile client with CAP_NET_RAW would, in any order, overlapping, with bad checksums, a reset only
conntrack believes, and over IPv6 behind extension headers or in fragments. The lab, never shipped.

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
HOP, ROUTING, FRAGMENT, AUTH, DSTOPTS = 0, 43, 44, 51, 60  # IPv6 extension headers (RFC 8200, RFC 4302)

Header = tuple[int, bytes]  # an IPv6 extension header: its type, and its bytes after the first two


def _sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _v6(address: str) -> bool:
    return ":" in address


def pseudo_header(src: str, dst: str, length: int) -> bytes:
    """TCP's pseudo-header (RFC 793; RFC 8200 8.1: IPv6's names the final destination)."""
    if _v6(dst):
        return socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + \
            struct.pack("!IxxxB", length, 6)
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 6, length)


def with_checksum(src: str, dst: str, segment: bytes, good: bool = True) -> bytes:
    checksum = _sum(pseudo_header(src, dst, len(segment)) + segment) ^ (0 if good else 0x5A5A)
    return segment[:16] + struct.pack("!H", checksum) + segment[18:]


EXPERIMENT = bytes([0x1E, 6]) + bytes(6)  # an option for experiments (RFC 4727): skipped where unknown


def options(kind: int, body: bytes = b"", size: int = 8) -> Header:
    """A hop-by-hop (``HOP``) or destination options (``DSTOPTS``) header holding the options
    ``body``, padded (PadN) to ``size`` bytes or the next multiple of 8 (Linux drops a packet with
    more than 7 bytes of padding in a row)."""
    pad = max(size, 2 + len(body) + 7 & ~7) - 2 - len(body)
    body += b"\0" if pad == 1 else bytes([1, pad - 2]) + bytes(pad - 2) if pad else b""
    return kind, body


def routing(kind: int, addresses: list[str], left: int = 0) -> Header:
    """A routing header of type ``kind`` (0: the deprecated source route; 4: a segment routing
    header, its list in reverse order as RFC 8754 wants) with ``left`` segments to go."""
    packed = b"".join(socket.inet_pton(socket.AF_INET6, a) for a in addresses)
    if kind == 4:
        return ROUTING, struct.pack("!BBBBH", 4, left, len(addresses) - 1, 0, 0) + packed
    return ROUTING, struct.pack("!BBI", kind, left, 0) + packed


def fragment(offset: int, more: bool, ident: int) -> Header:
    return FRAGMENT, struct.pack("!HI", offset | int(more), ident)


def auth(spi: int = 0x5241) -> Header:
    """An authentication header (RFC 4302) for a security association no one has."""
    return AUTH, struct.pack("!HII", 0, spi, 1) + bytes(12)


def ip6(src: str, dst: str, upper: bytes, headers: list[Header] = (), hop: int = 64, length: int | None = None,
        upper_type: int = 6) -> bytes:
    """An IPv6 packet: its header, ``headers`` in that order, then ``upper`` (``upper_type``);
    ``length``: a payload length other than the true one."""
    chain, types = b"", [kind for kind, _ in headers] + [upper_type]
    for (kind, body), after in zip(headers, types[1:]):
        size = 0 if kind == FRAGMENT else (len(body) + 2) // 4 - 2 if kind == AUTH else (len(body) + 2) // 8 - 1
        chain += bytes([after, size]) + body
    payload = chain + upper
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload) if length is None else length, types[0], hop,
                       socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)) + payload


def ip4(src: str, dst: str, segment: bytes, ttl: int = 64, ident: int | None = None) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(segment),
                       random.randrange(65536) if ident is None else ident, 0x4000, ttl, 6, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + segment


def fragments(src: str, dst: str, upper: bytes, pieces: list[tuple[int, int]], ident: int, hop: int = 64,
              before: list[Header] = ()) -> list[bytes]:
    """IPv6 fragments of ``upper`` (a TCP segment): one per (start, end) of ``pieces``, each
    start but the first a multiple of 8, the last ending at the end (overlaps as given);
    ``before``: the headers each fragment carries ahead of its Fragment header."""
    return [ip6(src, dst, upper[start:end], [*before, fragment(start, end < len(upper), ident)], hop)
            for start, end in pieces]


class RawFlow:
    def __init__(self, ns, src: str, dst: str, dport: int = 443, mark: int = 0x52410000):
        self.src, self.dst, self.dport = src, dst, dport
        self.family = socket.AF_INET6 if _v6(dst) else socket.AF_INET
        self.sport = random.randrange(20000, 30000)
        self.isn = random.randrange(1 << 32)
        self.ack = 0
        ns.run("nft", f"add table inet rawtcp{self.sport}; add chain inet rawtcp{self.sport} out "
                      f"{{ type filter hook output priority -300; }}; add rule inet rawtcp{self.sport} out "
                      f"meta mark 0 tcp sport {self.sport} tcp flags rst drop")  # the kernel's own, not ours (marked)
        with ns.inside():
            self.out = socket.socket(self.family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.inp = socket.socket(self.family, socket.SOCK_RAW, socket.IPPROTO_TCP)
        self.out.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)  # the kernel's resets have none

    def tcp(self, seq: int, flags: int, payload: bytes = b"", ack: int | None = None, good: bool = True,
            tsval: int | None = None, extra: bytes = b"") -> bytes:
        """A TCP segment of this flow; ``extra``: TCP options (padded to a word)."""
        opts = struct.pack("!BBH", 2, 4, 1460) if flags & SYN else b""
        if tsval is not None:
            opts += struct.pack("!BBBBII", 1, 1, 8, 10, tsval, 0)
        opts += extra + bytes(-len(extra) % 4)
        header = struct.pack("!HHIIBBHHH", self.sport, self.dport, seq & 0xFFFFFFFF,
                             (self.ack if ack is None else ack) & 0xFFFFFFFF, (20 + len(opts)) // 4 << 4, flags,
                             64240, 0, 0)
        return with_checksum(self.src, self.dst, header + opts + payload, good)

    def packet(self, seq: int, flags: int, payload: bytes = b"", ack: int | None = None, good: bool = True,
               ttl: int = 64, tsval: int | None = None, headers: list[Header] = (), extra: bytes = b"") -> bytes:
        """An IP packet of this flow (``ttl``: the IPv6 hop limit too; ``headers``: IPv6
        extension headers before TCP)."""
        segment = self.tcp(seq, flags, payload, ack, good, tsval, extra)
        if _v6(self.dst):
            return ip6(self.src, self.dst, segment, headers, ttl)
        return ip4(self.src, self.dst, segment, ttl)

    def _send(self, data: bytes) -> None:
        try:
            self.out.sendto(data, (self.dst, 0))
        except PermissionError:  # dropped on the way out by a rule
            pass

    def replies(self, timeout: float):
        """(flags, seq, payload) of the server's packets to this flow, until ``timeout`` passes quiet."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([self.inp], [], [], left)[0]:
                return
            data, peer = self.inp.recvfrom(65536)
            at = 0 if self.family == socket.AF_INET6 else (data[0] & 0x0F) * 4  # IPv6 raw: no IP header
            source = peer[0] if self.family == socket.AF_INET6 else socket.inet_ntoa(data[12:16])
            sport, dport, seq, ack, off, flags = struct.unpack_from("!HHIIBB", data, at)
            if socket.inet_pton(self.family, source) != socket.inet_pton(self.family, self.dst) \
                    or sport != self.dport or dport != self.sport:
                continue
            yield flags, seq, data[at + (off >> 4) * 4:]

    def handshake(self) -> None:
        self._send(self.packet(self.isn, SYN, ack=0))
        for flags, seq, _ in self.replies(3):
            if flags & (SYN | ACK) == SYN | ACK:
                self.ack = seq + 1
                self._send(self.packet(self.isn + 1, ACK))
                return
        raise RuntimeError("no SYN-ACK")

    def send(self, offset: int, payload: bytes, good: bool = True, ttl: int = 64, ack: int | None = None,
             urgent: bool = False, tsval: int | None = None, headers: list[Header] = ()) -> None:
        """A data segment at ``offset`` in the stream (0: the byte after the SYN); ``ack``: an
        acknowledgment other than the right one, ``urgent``: with URG set."""
        flags = PSH | ACK | (URG if urgent else 0)
        self._send(self.packet(self.isn + 1 + offset, flags, payload, ack=ack, good=good, ttl=ttl, tsval=tsval,
                               headers=headers))

    def data(self, offset: int, payload: bytes, **kw) -> bytes:
        """The TCP segment ``send`` would send (for fragments, or another IP header)."""
        return self.tcp(self.isn + 1 + offset, PSH | ACK, payload, **kw)

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
