"""A queued TCP segment, read and its checksum verified, and the header fields that decide
whether the server's TCP takes it (``Marks``).

A segment the server's TCP drops must not be read as the stream's either: a client could send a
cover ClientHello that never arrives, then the real one (the insertion attacks of Ptacek and
Newsham). A wrong checksum is checked here (the queue hands up a locally made segment with its
checksum filled in: nfnetlink_queue without NFQA_CFG_F_GSO computes what offload would have);
the rest by comparing the segments of one first flight (``flows``): a cover that dies on the way
(a small TTL), is dropped by the server (an ACK of data it never sent, a timestamp older than the
last it took: PAWS) or is read otherwise (urgent data leaves the stream) must differ from the
real segments in one of these fields.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from ..snoop.packet import TCP, Segment, parse_packet

URG = 0x20


@dataclass(frozen=True)
class Marks:
    """What a segment's headers say beside its data."""

    ttl: int  # IPv4 TTL, IPv6 hop limit
    ack: int
    urgent: bool
    tsval: int | None  # the timestamp option's value, None without one


@dataclass(frozen=True)
class Head:
    """A TCP packet's headers alone (a copy cut at its snap length has no more)."""

    src: str
    sport: int
    dst: str
    dport: int
    seq: int
    flags: int
    marks: Marks


def head(data: bytes) -> Head | None:
    found, at = marks(data), _tcp(data)
    if found is None or at is None:
        return None
    family = socket.AF_INET if data[0] >> 4 == 4 else socket.AF_INET6
    addresses = (data[12:16], data[16:20]) if family == socket.AF_INET else (data[8:24], data[24:40])
    sport, dport, seq = struct.unpack_from("!HHI", data, at)
    return Head(socket.inet_ntop(family, addresses[0]), sport, socket.inet_ntop(family, addresses[1]), dport, seq,
                data[at + 13], found)


def _tcp(data: bytes) -> int | None:
    """Where the TCP header begins, or None when the packet is not TCP."""
    try:
        if data[0] >> 4 == 4:
            return (data[0] & 0x0F) * 4 if data[9] == TCP else None
        if data[0] >> 4 != 6:
            return None
        proto, start = data[6], 40
        while proto in (0, 43, 60):
            proto, start = data[start], start + (data[start + 1] + 1) * 8
        return start if proto == TCP else None
    except IndexError:
        return None


def marks(data: bytes) -> Marks | None:
    """The header fields of a TCP packet (IPv4/IPv6) the first flight's segments must share."""
    start = _tcp(data)
    if start is None:
        return None
    try:
        ttl = data[8] if data[0] >> 4 == 4 else data[7]
        ack, flags = struct.unpack_from("!I", data, start + 8)[0], data[start + 13]
        end, at, tsval = start + (data[start + 12] >> 4) * 4, start + 20, None
        while at < end:
            kind = data[at]
            if kind == 0:
                break
            if kind == 1:
                at += 1
                continue
            length = data[at + 1]
            if length < 2:
                return None
            if kind == 8 and length == 10:
                tsval = struct.unpack_from("!I", data, at + 2)[0]
            at += length
    except (IndexError, struct.error):
        return None
    return Marks(ttl, ack, bool(flags & URG), tsval)


def segment(data: bytes) -> Segment | None:
    """The TCP segment in an IPv4/IPv6 packet with a right checksum, or None."""
    found = parse_packet(data)
    if found is None or found.proto != TCP or not checksum_ok(data):
        return None
    return found


def checksum_ok(data: bytes) -> bool:
    """The TCP checksum over the pseudo-header and the segment (RFC 793, RFC 8200 8.1). The
    one's complement sum of 16-bit words is their sum modulo 0xFFFF (2**16 = 1 modulo 0xFFFF),
    so the bytes read as one big number give it at once; a right checksum makes it 0."""
    try:
        if data[0] >> 4 == 4:
            start, end = (data[0] & 0x0F) * 4, struct.unpack_from("!H", data, 2)[0]
            seg = data[start:end]
            pseudo = data[12:20] + bytes([0, data[9]]) + struct.pack("!H", len(seg))
        else:
            proto, start, end = data[6], 40, 40 + struct.unpack_from("!H", data, 4)[0]
            while proto in (0, 43, 60):
                proto, start = data[start], start + (data[start + 1] + 1) * 8
            seg = data[start:end]
            pseudo = data[8:40] + struct.pack("!I", len(seg)) + bytes([0, 0, 0, proto])
    except (IndexError, struct.error):
        return False
    blob = pseudo + seg + (b"\0" if len(seg) % 2 else b"")
    return int.from_bytes(blob, "big") % 0xFFFF == 0
