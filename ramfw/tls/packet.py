"""A queued TCP segment, read and its checksum verified.

A segment whose checksum is wrong never reaches the server's TCP (it drops it), so its bytes must
not be read as the stream's either: a client could send a cover ClientHello with a bad checksum
and the real one after. The queue hands up a locally made segment with its checksum filled in
(the kernel computes what offload would have: nfnetlink_queue without NFQA_CFG_F_GSO).
"""

from __future__ import annotations

import struct

from ..snoop.packet import TCP, Segment, parse_packet


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
