"""Copy one nf_tables table's content into another, as raw netlink: how ramfw writes a table it
owns. ``read`` dumps a table; the rest is pure (dumped objects in, transaction steps out), and
``table`` sends the steps.

An owned table (``NFT_TABLE_F_OWNER``) takes writes from one netlink socket only, and
libnftables writes through a socket of its own. So the JSON document is built by libnftables
into a private, dormant staging table (its base chains hook nothing), read back with netlink
dumps, and replayed into the owned table from the owner's socket in one transaction, with the
staging table deleted in the same one. The replay does what the document would have done to
the real table: sets and counters are added (an existing one keeps its elements, so what the
daemon learned stays), the chains and sets the document flushes are flushed and refilled.

Only attributes a NEW message accepts are copied (an allowlist: kernels keep adding dump-only
attributes, such as a set's type and count, which a NEW message refuses with EINVAL); the
table attribute is rewritten; every set gets an id unique in the transaction. Anonymous sets
(``__setN``, bound to one rule) are made, with their elements, just before the rules, after
the old rules that bound the old ones were flushed.
"""

from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field

from . import netlink as nl

TABLE = 1  # the table attribute of a chain, rule, set, set element list and object
# Attribute numbers (include/uapi/linux/netfilter/nf_tables.h)
NFTA_CHAIN_NAME, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 3, 2, 4
NFTA_SET_NAME, NFTA_SET_FLAGS, NFTA_SET_ID = 2, 3, 10
NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 2, 3
NFT_SET_ANONYMOUS = 0x1
KEEP = {
    "chain": {1, 3, 4, 5, 7, 10, 12},  # table, name, hook, policy, type, flags, userdata
    "rule": {1, 2, 4, 7},  # table, chain, expressions, userdata (not handle, position)
    "set": {1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 15, 17, 18},  # not id, handle, type, count
    "element": {1, 2, 3, 4, 5, 6, 7, 9, 10, 11},  # key, data, flags, timeout, expiration, ...
    "object": {1, 2, 3, 4, 8},  # table, name, type, data, userdata
}
LEARNED_KEEP = {1, 4, 5, 6}  # a learned element: key, timeout, expiration (what is left), comment
ELEMENTS_BYTES = 60 << 10  # one message's element list: an attribute's length is 16 bits

Attrs = list[tuple[int, bytes]]  # (attribute type with its flag bits, value), in order


def attrs(data: bytes) -> Attrs:
    """The attributes of a dumped object, keeping their order and nested flag."""
    found, offset = [], 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4 or offset + length > len(data):
            break
        found.append((kind, data[offset + 4 : offset + length]))
        offset += (length + 3) & ~3
    return found


def value(items: Attrs, kind: int) -> bytes | None:
    return next((v for k, v in items if k & 0x3FFF == kind), None)


def name(items: Attrs, kind: int) -> str:
    return (value(items, kind) or b"").rstrip(b"\0").decode(errors="replace")


def _build(items: Attrs) -> bytes:
    return b"".join(nl.attr(k, v) for k, v in items)


def _copy(items: Attrs, keep: set[int], table: str | None = None) -> Attrs:
    return [(k, (table.encode() + b"\0") if table is not None and k & 0x3FFF == TABLE else v)
            for k, v in items if k & 0x3FFF in keep]


@dataclass
class Snapshot:
    """A table's content as its dumps gave it."""

    sets: list[Attrs] = field(default_factory=list)
    elements: dict[str, list[bytes]] = field(default_factory=dict)  # set -> each element's attributes
    chains: list[Attrs] = field(default_factory=list)
    rules: list[Attrs] = field(default_factory=list)
    objects: list[Attrs] = field(default_factory=list)


def read(sock, table: str, seq: int) -> Snapshot:
    """A table's named objects, sets (with their elements), chains and rules, dumped over
    ``sock`` (sequence numbers from ``seq`` on)."""
    where, seqs = nl.string(TABLE, table), itertools.count(seq)

    def dump(msg_type: int, request: bytes = where) -> list[Attrs]:
        found = map(attrs, nl.dump(sock, msg_type, nl.NFPROTO["inet"], request, next(seqs)))
        return [items for items in found if name(items, TABLE) == table]

    snapshot = Snapshot(objects=dump(nl.NFT_MSG_GETOBJ), sets=dump(nl.NFT_MSG_GETSET))
    for items in snapshot.sets:
        set_name = name(items, NFTA_SET_NAME)
        snapshot.elements[set_name] = [e for m in nl.dump(sock, nl.NFT_MSG_GETSETELEM, nl.NFPROTO["inet"],
                                                          where + nl.string(NFTA_SET_ELEM_LIST_SET, set_name),
                                                          next(seqs)) for e in elements_of(m)]
    snapshot.chains = dump(nl.NFT_MSG_GETCHAIN, b"")
    snapshot.rules = dump(nl.NFT_MSG_GETRULE)
    return snapshot


def elements_of(dumped: bytes) -> list[bytes]:
    """The elements (their attributes) in one set-element dump message."""
    listed = value(attrs(dumped), NFTA_SET_ELEM_LIST_ELEMENTS) or b""
    return [v for _, v in attrs(listed)]


def element_steps(table: str, set_name: str, elements: list[bytes], keep: set[int] = KEEP["element"],
                  msg_type: int = nl.NFT_MSG_NEWSETELEM) -> list[tuple[int, int, int, bytes]]:
    """Add (or delete) elements, as many messages as their attribute lengths need."""
    steps, chunk, size = [], [], 0
    where = nl.string(TABLE, table) + nl.string(NFTA_SET_ELEM_LIST_SET, set_name)
    flags = nl.NLM_F_CREATE if msg_type == nl.NFT_MSG_NEWSETELEM else 0
    for element in elements:
        item = nl.nested(nl.NFTA_LIST_ELEM, _build(_copy(attrs(element), keep)))
        if chunk and size + len(item) > ELEMENTS_BYTES:
            steps.append((msg_type, flags, nl.NFPROTO["inet"], where + nl.nested(NFTA_SET_ELEM_LIST_ELEMENTS, *chunk)))
            chunk, size = [], 0
        chunk.append(item)
        size += len(item)
    if chunk:
        steps.append((msg_type, flags, nl.NFPROTO["inet"], where + nl.nested(NFTA_SET_ELEM_LIST_ELEMENTS, *chunk)))
    return steps


def flush_set(table: str, set_name: str) -> tuple[int, int, int, bytes]:
    """A set-element deletion naming no element empties the set."""
    return (nl.NFT_MSG_DELSETELEM, 0, nl.NFPROTO["inet"],
            nl.string(TABLE, table) + nl.string(NFTA_SET_ELEM_LIST_SET, set_name))


def flush_chain(table: str, chain: str) -> tuple[int, int, int, bytes]:
    """A rule deletion naming only the chain deletes all its rules."""
    return (nl.NFT_MSG_DELRULE, 0, nl.NFPROTO["inet"], nl.string(TABLE, table) + nl.string(NFTA_RULE_CHAIN, chain))


def steps(snapshot: Snapshot, target: str, flushed_chains: set[str], flushed_sets: set[str],
          first_set_id: int = 1) -> list[tuple[int, int, int, bytes]]:
    """Make ``target`` hold what ``snapshot`` holds, as the document that built the snapshot
    would have: objects and sets added, the flushed sets emptied and refilled (the others get
    the snapshot's elements added), chains added, the flushed chains' rules replaced."""
    inet, create = nl.NFPROTO["inet"], nl.NLM_F_CREATE
    out = [(nl.NFT_MSG_NEWOBJ, create, inet, _build(_copy(o, KEEP["object"], target))) for o in snapshot.objects]
    anonymous = []
    for set_id, items in enumerate(snapshot.sets, start=first_set_id):
        set_name = name(items, NFTA_SET_NAME)
        made = (nl.NFT_MSG_NEWSET, create, inet,
                _build(_copy(items, KEEP["set"], target) + [(NFTA_SET_ID, struct.pack("!I", set_id))]))
        fill = element_steps(target, set_name, snapshot.elements.get(set_name, []))
        flags = struct.unpack("!I", value(items, NFTA_SET_FLAGS) or b"\0" * 4)[0]
        if flags & NFT_SET_ANONYMOUS:
            anonymous += [made] + fill
            continue
        out += [made] + ([flush_set(target, set_name)] if set_name in flushed_sets else []) + fill
    out += [(nl.NFT_MSG_NEWCHAIN, create, inet, _build(_copy(c, KEEP["chain"], target))) for c in snapshot.chains]
    out += [flush_chain(target, chain) for chain in sorted(flushed_chains)]
    out += anonymous
    out += [(nl.NFT_MSG_NEWRULE, create | nl.NLM_F_APPEND, inet, _build(_copy(r, KEEP["rule"], target)))
            for r in snapshot.rules]
    return out


def for_staging(document: dict, table: str, stage: str) -> tuple[dict, set[str], set[str]]:
    """The document aimed at the staging table, without its table commands (a plain ``add
    table`` would wake the dormant staging table); and the chains and sets it flushes."""
    commands, chains, sets = [], set(), set()
    for command in document["nftables"]:
        (verb, body), = command.items()
        (kind, spec), = body.items()
        if kind == "table":
            continue
        if spec.get("table") == table:
            spec = {**spec, "table": stage}
        if verb == "flush" and kind in ("chain", "set"):
            (chains if kind == "chain" else sets).add(spec["name"])
        commands.append({verb: {kind: spec}})
    return {"nftables": commands}, chains, sets
