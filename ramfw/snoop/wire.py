"""DNS wire format read by hand on the hold path: the question name, and the A/AAAA chain.

dnspython reads everything else; the tests hold these readers to dnspython's answers.
"""

from __future__ import annotations

import socket
import struct


def question_name(wire: bytes) -> str | None:
    """The canonical question name of a DNS response, read by hand for the fast path."""
    if len(wire) < 12 or not wire[2] & 0x80 or struct.unpack_from("!H", wire, 4)[0] < 1:
        return None
    labels, offset = [], 12
    while offset < len(wire):
        length = wire[offset]
        if length == 0:
            try:
                return ".".join(labels).lower() if labels else "."
            except UnicodeDecodeError:
                return None
        if length > 63 or offset + 1 + length > len(wire):
            return None  # compression pointers do not belong in a question
        labels.append(wire[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length
    return None


_TYPE_A, _TYPE_CNAME, _TYPE_AAAA = 1, 5, 28
_CLASS_IN = 1
_RR = struct.Struct("!HHIH")
MAX_CHAIN = 16  # as dnspython's resolve_chaining


def _read_name(wire: bytes, offset: int) -> tuple[str, int]:
    """A possibly compressed name at ``offset``: (canonical text, offset after it)."""
    labels, end, jumps = [], None, 0
    while True:
        length = wire[offset]
        if length >= 0xC0:
            if end is None:
                end = offset + 2
            offset = ((length & 0x3F) << 8) | wire[offset + 1]
            jumps += 1
            if jumps > 64:
                raise ValueError("compression loop")
            continue
        if length > 63:
            raise ValueError("bad label")
        if length == 0:
            name = ".".join(labels).lower()
            return name, offset + 1 if end is None else end
        labels.append(wire[offset + 1 : offset + 1 + length].decode("ascii"))
        offset += 1 + length


def fast_chain(wire: bytes) -> tuple[list[str], int] | None:
    """A/AAAA at the end of the CNAME chain from the question name, and the chain's minimum TTL.

    The hold path's reading of an A or AAAA reply, equivalent to dnspython's
    ``resolve_chaining`` for those (tests compare the two); None for anything else (HTTPS,
    SVCB, several questions, odd records), which then goes to dnspython.
    """
    try:
        qdcount, ancount = struct.unpack_from("!HH", wire, 4)
        if qdcount != 1:
            return None
        qname, offset = _read_name(wire, 12)
        qtype, qclass = struct.unpack_from("!HH", wire, offset)
        if qtype not in (_TYPE_A, _TYPE_AAAA) or qclass != _CLASS_IN:
            return None
        offset += 4
        records: dict[tuple[str, int], list] = {}
        for _ in range(ancount):
            owner, offset = _read_name(wire, offset)
            rtype, rclass, ttl, rdlength = _RR.unpack_from(wire, offset)
            offset += _RR.size
            if offset + rdlength > len(wire):
                return None
            if rclass == _CLASS_IN and rtype in (qtype, _TYPE_CNAME):
                if rtype == _TYPE_CNAME:
                    data, _ = _read_name(wire, offset)
                else:
                    family = socket.AF_INET if rtype == _TYPE_A else socket.AF_INET6
                    data = socket.inet_ntop(family, wire[offset : offset + rdlength])
                ttls_and_data = records.setdefault((owner, rtype), [ttl, []])
                ttls_and_data[0] = min(ttls_and_data[0], ttl)
                ttls_and_data[1].append(data)
            offset += rdlength
    except (IndexError, struct.error, ValueError, UnicodeDecodeError):
        return None
    current, min_ttl = qname, 0xFFFFFFFF
    for _ in range(MAX_CHAIN):
        answer = records.get((current, qtype))
        if answer is not None:
            return list(dict.fromkeys(answer[1])), min(min_ttl, answer[0])
        cname = records.get((current, _TYPE_CNAME))
        if cname is None:
            return [], min_ttl
        min_ttl = min(min_ttl, cname[0])
        current = cname[1][0]
    return None
