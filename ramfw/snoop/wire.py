"""DNS wire format read by hand on the hold path: the question name, and the A/AAAA chain.

dnspython reads everything else; the tests hold these readers to dnspython's answers on
adversarial wire. A name reads as dnspython writes it (``to_text``, without the final dot),
in lower case: a byte that is not printable ASCII is ``\\DDD``; a dot inside a label is
``\\.``, and so are a backslash and ``"();@$`` escaped. So two names are equal only when
their labels are, and a name with an escape can never equal an allowlist entry or end in
one (entries are letters, digits and hyphens).
"""

from __future__ import annotations

import socket
import struct

_SPECIAL = b'"().;\\@$'  # printable, but escaped by dnspython
_PLAIN = bytes(c for c in range(0x21, 0x7F) if c not in _SPECIAL)
_ESCAPED = [chr(c) if c in _PLAIN else "\\" + chr(c) if c in _SPECIAL else f"\\{c:03d}" for c in range(256)]
MAX_NAME = 255  # wire bytes, the root's included
MAX_POINTERS = 16  # as dnspython (2.9)


def _text(label: bytes) -> str:
    return "".join(_ESCAPED[c] for c in label)


def _read_name(wire: bytes, offset: int, end: int | None = None) -> tuple[str, int]:
    """A possibly compressed name at ``offset``: (its text, the offset after it). Read by
    dnspython's rules: a pointer only points backwards, its target lies wholly before the
    part of the name that points to it, at most 16 of them, at most 255 bytes in all. Raises
    ValueError where dnspython refuses the name."""
    limit = len(wire) if end is None else end
    labels, after, start, pointers, size = [], None, offset, 0, 1
    while True:
        if offset >= limit:
            raise ValueError("name cut short")
        length = wire[offset]
        if length == 0:
            break
        if length < 64:
            size += 1 + length
            if offset + 1 + length > limit or size > MAX_NAME:
                raise ValueError("name cut short or too long")
            labels.append(wire[offset + 1 : offset + 1 + length])
            offset += 1 + length
        elif length >= 0xC0:
            if offset + 1 >= limit:
                raise ValueError("pointer cut short")
            target = ((length & 0x3F) << 8) | wire[offset + 1]
            pointers += 1
            if target >= start or pointers > MAX_POINTERS:
                raise ValueError("bad compression pointer")
            if after is None:
                after = offset + 2
            limit, offset, start = start, target, target
        else:
            raise ValueError("bad label type")
    return _name_text(labels), offset + 1 if after is None else after


def _name_text(labels: list[bytes]) -> str:
    if not labels:
        return "."
    raw = b".".join(labels)
    if len(raw.translate(None, _PLAIN)) == len(labels) - 1:  # only the dots between labels
        return raw.decode("ascii").lower()
    return ".".join(_text(label) for label in labels).lower()


def question_name(wire: bytes, response: bool = True) -> str | None:
    """The question name of a DNS response (or, without ``response``, of a query), as
    dnspython reads it (see the module's docstring); None if there is none. Never raises.

    The eBPF prefilter hashes raw label bytes, so it does not hold a reply for a name like
    ``\\x07ghcr.io`` (one label); it is safe only because this reads ``ghcr\\.io``, which no
    entry matches: the daemon does not learn from the copy either."""
    found = question(wire, response)
    return found[0] if found is not None else None


def question(wire: bytes, response: bool = True) -> tuple[str, bytes] | None:
    """The question name (as ``question_name``) and its type and class (4 bytes, as on the
    wire; empty if cut short); None if there is none. Never raises."""
    if len(wire) < 12 or bool(wire[2] & 0x80) != response or struct.unpack_from("!H", wire, 4)[0] < 1:
        return None
    try:
        name, end = _read_name(wire, 12)
    except ValueError:
        return None
    return name, wire[end : end + 4]


_TYPE_A, _TYPE_CNAME, _TYPE_AAAA = 1, 5, 28
_CLASS_IN = 1
_NXDOMAIN = 3
_RR = struct.Struct("!HHIH")
MAX_CHAIN = 16  # as dnspython's resolve_chaining


def fast_chain(wire: bytes) -> tuple[list[str], int] | None:
    """A/AAAA at the end of the CNAME chain from the question name, and the chain's minimum TTL.

    The hold path's reading of an A or AAAA reply, equivalent to dnspython's
    ``resolve_chaining`` for those (tests compare the two); None for anything else (HTTPS,
    SVCB, several questions, odd records), which then goes to dnspython.
    """
    try:
        qdcount, ancount = struct.unpack_from("!HH", wire, 4)
        if qdcount != 1 or not wire[2] & 0x80:
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
                    data, after = _read_name(wire, offset, offset + rdlength)
                    if after != offset + rdlength:
                        return None
                else:
                    family = socket.AF_INET if rtype == _TYPE_A else socket.AF_INET6
                    data = socket.inet_ntop(family, wire[offset : offset + rdlength])
                ttls_and_data = records.setdefault((owner, rtype), [ttl, []])
                ttls_and_data[0] = min(ttls_and_data[0], ttl)
                ttls_and_data[1].append(data)
            offset += rdlength
    except (IndexError, struct.error, ValueError):
        return None
    current, min_ttl = qname, 0xFFFFFFFF
    for _ in range(MAX_CHAIN):
        answer = records.get((current, qtype))
        if answer is not None:
            if wire[3] & 0x0F == _NXDOMAIN:
                return None  # dnspython refuses an answer to NXDOMAIN (unless EDNS says otherwise)
            return list(dict.fromkeys(answer[1])), min(min_ttl, answer[0])
        cname = records.get((current, _TYPE_CNAME))
        if cname is None:
            return [], min_ttl
        min_ttl = min(min_ttl, cname[0])
        current = cname[1][-1]  # a CNAME is a singleton: dnspython keeps the last one read
    return None
