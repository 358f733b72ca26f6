"""The transport segment of a packet the kernel hands up (IP header onwards)."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

UDP, TCP = 17, 6
TCP_FIN, TCP_SYN, TCP_RST = 0x01, 0x02, 0x04


@dataclass(frozen=True)
class Segment:
    src: str
    dst: str
    proto: int
    sport: int
    dport: int
    payload: bytes
    seq: int = 0
    flags: int = 0


def parse_packet(data: bytes) -> Segment | None:
    """The transport segment in an IPv4/IPv6 packet, or None if it cannot be read."""
    try:
        version = data[0] >> 4
        if version == 4:
            ihl = (data[0] & 0x0F) * 4
            total = struct.unpack_from("!H", data, 2)[0]
            if ihl < 20 or total > len(data) or struct.unpack_from("!H", data, 6)[0] & 0x3FFF:
                return None  # short, or a fragment (conntrack reassembles before the hooks)
            proto, family, src, dst = data[9], socket.AF_INET, data[12:16], data[16:20]
            offset, end = ihl, total
        elif version == 6:
            proto, family, src, dst = data[6], socket.AF_INET6, data[8:24], data[24:40]
            offset, end = 40, 40 + struct.unpack_from("!H", data, 4)[0]
            while proto in (0, 43, 60):  # hop-by-hop, routing, destination options
                proto, offset = data[offset], offset + (data[offset + 1] + 1) * 8
            if end > len(data):
                return None
        else:
            return None
        if proto == UDP:
            sport, dport, length = struct.unpack_from("!HHH", data, offset)
            if length < 8 or offset + length > end:
                return None
            payload, seq, flags = data[offset + 8 : offset + length], 0, 0
        elif proto == TCP:
            sport, dport, seq = struct.unpack_from("!HHI", data, offset)
            doff, flags = (data[offset + 12] >> 4) * 4, data[offset + 13]
            if doff < 20 or offset + doff > end:
                return None
            payload = data[offset + doff : end]
        else:
            return None
        return Segment(socket.inet_ntop(family, src), socket.inet_ntop(family, dst), proto,
                       sport, dport, payload, seq, flags)
    except (IndexError, struct.error, ValueError):
        return None


PORTED = {6, 17, 33, 132, 136}  # TCP, UDP, DCCP, SCTP, UDP-Lite: the destination port follows the source port


@dataclass(frozen=True)
class Flow:
    """A packet's addresses and ports (0 for a transport without ports)."""

    proto: int
    src: str
    sport: int
    dst: str
    dport: int


def flow(data: bytes) -> Flow | None:
    """A packet's flow, from its headers alone: a blocked packet reaches the daemon cut short
    (the log rule's snap length), so the lengths in its headers are not checked."""
    try:
        version = data[0] >> 4
        if version == 4:
            proto, family, src, dst, offset = data[9], socket.AF_INET, data[12:16], data[16:20], (data[0] & 0x0F) * 4
        elif version == 6:
            proto, family, src, dst, offset = data[6], socket.AF_INET6, data[8:24], data[24:40], 40
            while proto in (0, 43, 60):
                proto, offset = data[offset], offset + (data[offset + 1] + 1) * 8
        else:
            return None
        sport, dport = struct.unpack_from("!HH", data, offset) if proto in PORTED else (0, 0)
        return Flow(proto, socket.inet_ntop(family, src), sport, socket.inet_ntop(family, dst), dport)
    except (IndexError, struct.error, ValueError):
        return None


def destination(data: bytes) -> tuple[str, int] | None:
    """Where a packet was going (address, port; 0 for a transport without ports)."""
    found = flow(data)
    return None if found is None else (found.dst, found.dport)


def source(data: bytes) -> str:
    """Where a packet came from (its source address), or "" when its header is cut short."""
    try:
        version = data[0] >> 4
        if version == 4 and len(data) >= 20:
            return socket.inet_ntop(socket.AF_INET, data[12:16])
        if version == 6 and len(data) >= 40:
            return socket.inet_ntop(socket.AF_INET6, data[8:24])
    except (IndexError, ValueError):
        pass
    return ""
