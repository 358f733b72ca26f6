"""The kernel-side DNS prefilter: hold only the replies that may be for an allowlisted name.

Most DNS replies on a developer's machine are for names nobody allowlisted; holding each of
them in the queue costs a round trip through userspace. This eBPF socket-filter program,
used as an xt ``bpf`` match in front of the queue rule, reads a UDP reply's question name and
looks its last label, and its last two labels, up in a hash map of keys made from the
allowlist. No hit: the reply is not held (a later rule copies it to the daemon
asynchronously, for block messages and counters). A hit, or what the program does not follow
(a compression pointer in the question, IPv6 extension headers, a name of 128 labels or
more): the reply is held. A read past the end of the packet (a question cut short) ends the
program with 0, by the kernel's rule for LD_ABS/LD_IND: such a reply is not held, only
copied; the daemon reads the copy too and finds no whole question in it.

``bpf/dns_prefilter.bpf.c`` is the readable reference of this program; the tests hold the
hand-assembled program, that reference (where bcc compiles) and ``would_hold`` to the same
decision on generated and adversarial packets.

The map is a superset test, never the decision: a hash collision only holds a reply the
daemon then releases. Every entry ``a.b.example.com`` or ``*.example.com`` is keyed by its
last two labels (``example.com``), a one-label entry by its only label, and a name is looked
up by both of its own, so no allowlisted name can miss the filter. One known exception, on
the daemon's side: it reads wire labels that contain a dot (``pkg.ghcr`` + ``io``) as the
name ``pkg.ghcr.io``, which this program keys as the labels they are: such a reply is only
copied (an xfail test in tests/integration/test_prefilter_reference.py).
"""

from __future__ import annotations

import os
import struct
from typing import Iterable

from ..policy.names import Pattern
from . import bpf, pairing
from .pairing import MAX_PAIRS, PAIR_KEY, PAIR_SECONDS, PAIRED, QUERY, RECORDED, REPLY
from .bpf import (ADD32_X, ADD_K, ADD_X, AND_K, EXIT, FUNC_MAP_LOOKUP_ELEM, JA, JEQ_K, JGE_X, JGT_K, JNE_K,
                  LD_ABS_B, LD_IND_B, LDX_DW, LSH_K, MOV_K, MOV_X, MUL32_K, OR_K, R0, R1, R6, R7, R8, R9, R10, RSH_K,
                  STX_DW, STX_W, SUB_K)

MAX_KEYS = 65536
MAX_LABEL = 63  # a longer length byte is not a label (0xC0 and up: a compression pointer)
MAX_LABELS, MAX_HASHED = 128, 130  # the loop bounds; two labels are 128 wire bytes at most
FILTER = "filter"  # the program that only decides (``pairing`` has the other two)
COUNTER = -16  # stack slot of the current loop's bound (pairing.py lists the others it uses)


def key(wire: bytes) -> int:
    """The 32-bit hash the program computes: h = h * 31 + (byte | 0x20). The OR folds case
    without a branch (it also changes length bytes, the same way on both sides)."""
    h = 0
    for byte in wire:
        h = (h * 31 + (byte | 0x20)) & 0xFFFFFFFF
    return h


def _wire(labels: list[str]) -> bytes:
    return b"".join(bytes([len(label)]) + label.encode("ascii") for label in labels)


def keys_for(patterns: Iterable[Pattern]) -> set[int]:
    found = set()
    for pattern in patterns:
        labels = pattern.domain.split(".")
        found.add(key(_wire(labels[-2:])))
    return found


class _Cut(Exception):
    """A read past the end of the packet: the kernel ends the program, with 0."""


def pair_key(packet: bytes, keys: set[int], side: str) -> bytes | None:
    """The key the pairing programs make of a query (``pairing.QUERY``: recorded) or a reply
    (``pairing.REPLY``: looked up, and consumed); None where nothing is recorded or held: a
    name that cannot be allowlisted, what the program does not follow, a packet cut short."""
    outcome, start, end, last_two = _walk(packet, keys)
    return pairing.key_of(packet, start, end, key(last_two), side) if outcome == "hit" else None


def _walk(packet: bytes, keys: set[int]) -> tuple[str, int, int, bytes]:
    """The program's reading of a packet: ("pass" | "hold" | "hit", where the question name
    starts, where it ends, its last two labels). "hold" is what the program does not follow;
    "hit" a name that may be allowlisted."""

    def byte(at: int) -> int:  # LD_ABS/LD_IND
        if at >= len(packet):
            raise _Cut
        return packet[at]

    try:
        version = byte(0) >> 4
        if version == 6:
            if byte(6) != 17:
                return "hold", 0, 0, b""  # a next header other than UDP (extension headers): not followed
            at = 40 + 8 + 12
        elif version == 4:
            at = (byte(0) & 0x0F) * 4 + 8 + 12  # IHL as it is, options included
        else:
            return "hold", 0, 0, b""
        start, starts = at, []  # where each label of the question name begins
        while (length := byte(at)) != 0:
            if length > MAX_LABEL:
                return "hold", 0, 0, b""  # a compression pointer: not followed
            starts.append(at)
            at += 1 + length
            if len(starts) == MAX_LABELS:
                return "hold", 0, 0, b""  # the loop's bound, reached before the next length byte is read
    except _Cut:
        return "pass", 0, 0, b""
    if not starts:
        return "pass", 0, 0, b""  # the root name
    # ``at`` is the terminating zero, which was read: the bytes before it are all there.
    last = packet[starts[-1] : at]
    last_two = packet[starts[-2] : at] if len(starts) > 1 else last
    if len(last) >= MAX_HASHED or len(last_two) >= MAX_HASHED:
        return "hold", 0, 0, b""  # the hash loop's bound
    return ("hit" if key(last) in keys or key(last_two) in keys else "pass"), start, at, last_two


def would_hold(packet: bytes, keys: set[int]) -> bool:
    """The filter program's decision, in plain Python: its executable specification, which the
    tests hold ``program()`` and ``bpf/dns_prefilter.bpf.c`` to. ``packet`` starts at the IP
    header (as the xt match sees it); ``keys`` is what the map holds (``keys_for``)."""
    return _walk(packet, keys)[0] != "pass"


class _Asm(bpf.Assembler):
    """The assembler, with the bounded loop the verifier needs."""

    def start_count(self, count: int) -> None:
        """A loop bound in a stack slot (spilled and filled whole, so the verifier keeps it exact)."""
        self(MOV_K, R1, imm=count)
        self(STX_DW, R10, R1, off=COUNTER)

    def count_down(self, exhausted: str) -> None:
        """One more iteration: jump to ``exhausted`` when the bound is reached."""
        self(LDX_DW, R1, R10, off=COUNTER)
        self(SUB_K, R1, imm=1)
        self(STX_DW, R10, R1, off=COUNTER)
        self(JEQ_K, R1, off=exhausted, imm=0)

    def hash_loop(self, n, bound: int, exhausted: str) -> None:
        """r9 = key() of the packet's bytes from r8 up to r7 (r8 moves to r7); ``exhausted``
        when ``bound`` bytes are reached first."""
        self.label(f"hash{n}")
        self(MOV_K, R9, imm=0)
        self.start_count(bound)
        self.label(f"byte{n}")
        self(JGE_X, R8, R7, off=f"hashed{n}")
        self(LD_IND_B, src=R8, imm=0)
        self(OR_K, R0, imm=0x20)
        self(MUL32_K, R9, imm=31)
        self(ADD32_X, R9, R0)
        self(ADD_K, R8, imm=1)
        self.count_down(exhausted)
        self(JA, off=f"byte{n}")
        self.label(f"hashed{n}")


def program(map_fd: int, side: str = FILTER, pairs_fd: int = -1, counters_fd: int = -1,
            pair_seconds: float = PAIR_SECONDS) -> bytes:
    """The socket filter. ``FILTER`` returns 1 (hold) for a reply that may be for an
    allowlisted name, and for what it does not follow; 0 otherwise. ``QUERY`` and ``REPLY``
    pair replies with queries in the kernel: for a query that may be for an allowlisted name
    ``QUERY`` records its key (``pair_key``) with the time in ``pairs_fd`` and returns 0 (the
    rule never matches: nothing is copied); ``REPLY`` returns 1 only for a reply whose key is
    recorded, less than ``pair_seconds`` old, and which it deletes first (once: of two replies
    racing on two CPUs only one deletes it). What they do not follow returns 0: not recorded,
    not held (a reply then teaches nothing, and its first connection fails closed).

    Registers: r6 the skb (LD_ABS/LD_IND need it there), r7 the read position / end of the
    name, r8 and r9 the starts of the last and second-last labels, then each hash loop's
    position and hash; the loop counters are spilled to the stack so the verifier sees their
    bounds. LD_ABS/LD_IND and calls clobber r0-r5: nothing lives there across them."""
    a = _Asm()
    a(MOV_X, R6, R1)
    a(LD_ABS_B, imm=0)                       # r0 = version/IHL byte
    a(RSH_K, R0, imm=4)
    a(JEQ_K, R0, off="v6", imm=6)
    a(JNE_K, R0, off="hold", imm=4)
    a(LD_ABS_B, imm=0)
    a(AND_K, R0, imm=0x0F)
    a(LSH_K, R0, imm=2)                      # r0 = IPv4 header length
    a(MOV_X, R7, R0)
    a(ADD_K, R7, imm=8 + 12)                 # r7 = question name (after UDP and DNS headers)
    a(JA, off="walk")
    a.label("v6")
    a(LD_ABS_B, imm=6)
    a(JNE_K, R0, off="hold", imm=17)         # extension headers: hold, let the daemon read it
    a(MOV_K, R7, imm=40 + 8 + 12)
    a.label("walk")
    a(STX_DW, R10, R7, off=pairing.NAME_START)
    a(MOV_K, R8, imm=-1)
    a(MOV_K, R9, imm=-1)
    a.start_count(MAX_LABELS)                # labels left to read
    a.label("label")
    a(LD_IND_B, src=R7, imm=0)               # r0 = label length
    a(JEQ_K, R0, off="walked", imm=0)
    a(JGT_K, R0, off="hold", imm=MAX_LABEL)  # a compression pointer in a question: hold
    a(MOV_X, R9, R8)
    a(MOV_X, R8, R7)
    a(ADD_X, R7, R0)
    a(ADD_K, R7, imm=1)
    a.count_down("hold")
    a(JA, off="label")
    a.label("walked")
    a(JEQ_K, R8, off="pass", imm=-1)         # the root name: nothing to hold for
    a(STX_DW, R10, R9, off=-24)              # keep the second-last label's start
    for n, (slot, start) in enumerate(((-4, None), (-8, -24))):
        if start is not None:                # second key: the last two labels, if there are two
            a(LDX_DW, R8, R10, off=start)
            a(JNE_K, R8, off=f"hash{n}", imm=-1)
            a(LDX_DW, R8, R10, off=-32)      # one label only: the last label's start again
        else:
            a(STX_DW, R10, R8, off=-32)
        a.hash_loop(n, MAX_HASHED, "hold")
        a(STX_W, R10, R9, off=slot)
    for slot in (-4, -8):
        a.map_call(FUNC_MAP_LOOKUP_ELEM, map_fd, slot)
        a(JNE_K, R0, off="hit", imm=0)
    a.label("pass")
    a(MOV_K, R0, imm=0)
    a(EXIT)
    if side == FILTER:
        a.label("hit")
        a.label("hold")
        a(MOV_K, R0, imm=1)
        a(EXIT)
        return a.assemble()
    a.label("hold")                          # not followed: neither recorded nor held
    a(JA, off="pass")
    a.label("hit")
    pairing.emit(a, side, pairs_fd, counters_fd, int(pair_seconds * 1e9))
    return a.assemble()


class Prefilter:
    """The prefilter's maps and programs; ``update`` keeps the keys' map equal to the policy's.
    With ``pairing``, also the pairing's programs (``query_fd``, ``reply_fd``), the
    outstanding queries (an LRU map of MAX_PAIRS) and its counters; without, those are None."""

    def __init__(self, patterns: Iterable[Pattern] = (), pairing: bool = False, pair_seconds: float = PAIR_SECONDS):
        self._fds: list[int] = []
        self.query_fd = self.reply_fd = self.pairs_fd = self.counters_fd = None
        try:
            self.map_fd = self._own(bpf.map_create(bpf.BPF_MAP_TYPE_HASH, 4, 1, MAX_KEYS))
            self.prog_fd = self._load(program(self.map_fd), b"ramfw_dns")
            if pairing:
                self.pairs_fd = self._own(bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, PAIR_KEY, 8, MAX_PAIRS))
                self.counters_fd = self._own(bpf.map_create(bpf.BPF_MAP_TYPE_ARRAY, 4, 8, 2))
                self.query_fd, self.reply_fd = (
                    self._load(program(self.map_fd, side, self.pairs_fd, self.counters_fd, pair_seconds), name)
                    for side, name in ((QUERY, b"ramfw_dns_query"), (REPLY, b"ramfw_dns_reply")))
            self.keys: set[int] = set()
            self.update(patterns)
        except OSError:
            self.close()
            raise

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _load(self, code: bytes, name: bytes) -> int:
        return self._own(bpf.load_program(code, bpf.BPF_PROG_TYPE_SOCKET_FILTER, 0, name))

    def update(self, patterns: Iterable[Pattern]) -> None:
        wanted = keys_for(patterns)
        if len(wanted) > MAX_KEYS:
            raise OSError(28, f"more than {MAX_KEYS} prefilter keys")
        for k in wanted - self.keys:
            bpf.map_update(self.map_fd, struct.pack("<I", k), b"\1")
        for k in self.keys - wanted:
            bpf.map_delete(self.map_fd, struct.pack("<I", k))
        self.keys = wanted

    @property
    def reply_program(self) -> int:
        """The program the reply rule runs: the pairing's reply side, or the filter."""
        return self.reply_fd if self.reply_fd is not None else self.prog_fd

    def pairing_counters(self) -> dict[str, int]:
        """What the pairing programs counted: queries recorded, replies paired with one."""
        if self.counters_fd is None:
            return {}
        read = lambda index: struct.unpack("=Q", bpf.map_lookup(self.counters_fd, struct.pack("=I", index), 8))[0]  # noqa: E731
        return {"queries": read(RECORDED), "paired": read(PAIRED)}

    def close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []


def pairing_problem() -> str | None:
    """Why the kernel cannot pair here, or None: a prefilter with pairing, whose keys hold
    ``probe.invalid``, sees its reply before the query, the query, then the reply three
    times; the reply side must hold only the first of those (``doctor``'s probe)."""
    import dns.message

    query = dns.message.make_query("probe.invalid", "A")

    def packet(payload: bytes, src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
        udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        return struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, 17, 0, src, dst) + udp

    client, resolver = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 53])
    asked = packet(query.to_wire(), client, resolver, 40000, 53)
    answered = packet(dns.message.make_response(query).to_wire(), resolver, client, 53, 40000)
    try:
        prefilter = Prefilter([Pattern("probe.invalid")], pairing=True)
    except OSError as err:
        return f"the pairing programs do not load: {err}"
    try:
        verdicts = [bpf.test_run(prefilter.reply_fd, answered), bpf.test_run(prefilter.query_fd, asked)]
        verdicts += [bpf.test_run(prefilter.reply_fd, answered) for _ in range(3)]
    except OSError as err:
        return f"the pairing programs cannot be tried: {err}"
    finally:
        prefilter.close()
    return None if verdicts == [0, 0, 1, 0, 0] else f"the pairing programs decided {verdicts}, not [0, 0, 1, 0, 0]"
