"""DNS replies paired with their queries in the kernel: the pairing half of the prefilter.

A UDP reply teaches only if it answers a query this VM (or a container it forwards for) sent:
to the port the query came from, from the resolver it went to, with its ID and its question,
once. The daemon could pair them from a copy of every query (``snoop.snooper``), but reading
that copy costs the hold path about 20 µs. Here the prefilter's programs do it: the query
rule's program records each query that may be for an allowlisted name in an LRU hash map (its
key, with the time); the reply rule's program holds a reply only if its key is there, younger
than PAIR_SECONDS, and deletes it (once: of two replies racing on two CPUs, only one deletes
it). A reply that answers nothing is not held: the daemon reads its copy, counts it
``unmatched``, and learns nothing from it. The daemon reads no query at all.

The key (``key_of``, as the kernel lays it out on the stack, words in host order): the
client's address and the resolver's (16 bytes each, IPv4 zero-padded), the client's port and
the DNS ID, the IP version and the question's type, the key of the name's last two labels and
the name's length. Not a hash of the whole name: that loop, after the others, is more than the
verifier will follow (it gave up at a million instructions). Two outstanding questions that
differ only before their last two labels, with the same length, type, port and ID, share a
key: a forger must still guess the port and the ID (32 bits) while the query is outstanding.
"""

from __future__ import annotations

import struct

from .bpf import (CALL, EXIT, FUNC_KTIME_GET_NS, FUNC_MAP_DELETE_ELEM, FUNC_MAP_LOOKUP_ELEM, FUNC_MAP_UPDATE_ELEM,
                  JA, JEQ_K, JGT_X, JNE_K, LD_ABS_B, LD_ABS_W, LD_IMM64, LD_IND_H, LDX_DW, LDX_W, LSH_K, MOV_K, MOV_X,
                  OR_X, R0, R1, R7, R8, R9, R10, RSH_K, ST_W, STX_DW, STX_W, SUB_K, SUB_X, ADD_K)

MAX_PAIRS = 16384  # outstanding queries for names that may be allowlisted (least recently used go first)
PAIR_SECONDS = 15.0  # a query unanswered this long is forgotten (stubs retry within 5 s)
QUERY, REPLY = "query", "reply"  # which side of the pairing a program is
RECORDED, PAIRED = 0, 1  # the counters: queries recorded, replies that answered one
PAIR_KEY = 48
# Stack slots (offsets from r10) beside the prefilter's own: where the question name starts
# (the prefilter keeps it), the key, the query's time, a counter's index.
NAME_START, KEY, WHEN, INDEX = -40, -88, -96, -100
LAST_TWO = -8  # the prefilter's slot for the key of the name's last two labels


def key_of(packet: bytes, start: int, end: int, last_two: int, side: str) -> bytes | None:
    """The key of a query (``QUERY``) or reply (``REPLY``) whose question name the prefilter
    read from ``start`` to its terminating zero at ``end``, ``last_two`` the key of its last
    two labels; None where the question's type is cut short (the kernel's read past the end)."""
    if end + 2 >= len(packet):
        return None
    version = packet[0] >> 4
    src, dst = (packet[12:16], packet[16:20]) if version == 4 else (packet[8:24], packet[24:40])
    client, resolver = (src, dst) if side == QUERY else (dst, src)
    transport = start - 20
    port = packet[transport + (0 if side == QUERY else 2) :][:2]

    def words(data: bytes) -> bytes:
        data = data.ljust(16, b"\0")
        return b"".join(struct.pack("=I", int.from_bytes(data[i : i + 4], "big")) for i in range(0, 16, 4))

    return words(client) + words(resolver) + struct.pack(
        "=IIII", int.from_bytes(port + packet[transport + 8 : transport + 10], "big"),
        version << 16 | int.from_bytes(packet[end + 1 : end + 3], "big"), last_two, end - start)


def emit(a, side: str, pairs_fd: int, counters_fd: int, max_age_ns: int) -> None:
    """The pairing's part of a prefilter program, from where the name may be allowlisted (r7
    its end): build the key at KEY, then record it (``QUERY``: returns 0 through the
    program's "pass") or consume it (``REPLY``: 1 if it was there). LD_ABS/LD_IND and calls
    clobber r0-r5: nothing lives there across them."""
    a(LDX_W, R9, R10, off=LAST_TWO)
    a(STX_W, R10, R9, off=KEY + 40)
    a(MOV_X, R9, R7)
    a(LDX_DW, R8, R10, off=NAME_START)
    a(SUB_X, R9, R8)
    a(STX_W, R10, R9, off=KEY + 44)          # the name's length
    a(LD_IND_H, src=R7, imm=1)               # the question's type (a read past the end: 0)
    a(MOV_X, R9, R0)
    a(LD_ABS_B, imm=0)
    a(RSH_K, R0, imm=4)
    a(MOV_X, R8, R0)                         # r8 = the IP version
    a(LSH_K, R0, imm=16)
    a(OR_X, R9, R0)
    a(STX_W, R10, R9, off=KEY + 36)          # version << 16 | type
    a(LDX_DW, R7, R10, off=NAME_START)
    a(SUB_K, R7, imm=20)                     # r7 = the UDP header
    a(MOV_X, R9, R7)
    a(ADD_K, R9, imm=8)
    a(LD_IND_H, src=R9, imm=0)               # the DNS ID
    a(MOV_X, R9, R0)
    a(LD_IND_H, src=R7, imm=0 if side == QUERY else 2)  # the client's port: a query's source, a reply's destination
    a(LSH_K, R0, imm=16)
    a(OR_X, R9, R0)
    a(STX_W, R10, R9, off=KEY + 32)
    client, resolver = (KEY, KEY + 16) if side == QUERY else (KEY + 16, KEY)  # where the source and destination go
    a(JEQ_K, R8, off="addr6", imm=6)
    for at, slot in ((12, client), (16, resolver)):
        a(LD_ABS_W, imm=at)
        a(STX_W, R10, R0, off=slot)
        for word in (4, 8, 12):
            a(ST_W, R10, off=slot + word, imm=0)
    a(JA, off="keyed")
    a.label("addr6")
    for at, slot in ((8, client), (24, resolver)):
        for word in (0, 4, 8, 12):
            a(LD_ABS_W, imm=at + word)
            a(STX_W, R10, R0, off=slot + word)
    a.label("keyed")
    if side == QUERY:
        a(CALL, imm=FUNC_KTIME_GET_NS)
        a(STX_DW, R10, R0, off=WHEN)
        a.map_call(FUNC_MAP_UPDATE_ELEM, pairs_fd, KEY, value=WHEN)
        a.count(counters_fd, RECORDED, INDEX)
        a(JA, off="pass")
        return
    a.map_call(FUNC_MAP_LOOKUP_ELEM, pairs_fd, KEY)
    a(JEQ_K, R0, off="pass", imm=0)          # no such query
    a(LDX_DW, R8, R0, off=0)                 # r8 = when it was asked
    a(CALL, imm=FUNC_KTIME_GET_NS)
    a(SUB_X, R0, R8)
    a(LD_IMM64, R1, imm=max_age_ns & 0xFFFFFFFF)
    a(0, imm=max_age_ns >> 32)
    a(JGT_X, R0, R1, off="pass")             # asked too long ago
    a.map_call(FUNC_MAP_DELETE_ELEM, pairs_fd, KEY)
    a(JNE_K, R0, off="pass", imm=0)          # another reply took it first
    a.count(counters_fd, PAIRED, INDEX)
    a(MOV_K, R0, imm=1)
    a(EXIT)
