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

import ctypes
import os
import struct
from typing import Iterable

from ..policy.names import Pattern
from . import bpf
from .bpf import (ADD32_X, ADD_K, ADD_X, AND_K, BPF_PSEUDO_MAP_FD, CALL, EXIT, FUNC_MAP_LOOKUP_ELEM, JA, JEQ_K,
                  JGE_X, JGT_K, JNE_K, LD_ABS_B, LD_IMM64, LD_IND_B, LDX_DW, LSH_K, MOV_K, MOV_X, MUL32_K, OR_K,
                  R0, R1, R2, R6, R7, R8, R9, R10, RSH_K, STX_DW, STX_W, SUB_K)

MAX_KEYS = 65536
MAX_LABEL = 63  # a longer length byte is not a label (0xC0 and up: a compression pointer)
MAX_LABELS, MAX_HASHED = 128, 130  # the loop bounds; two labels are 128 wire bytes at most
COUNTER = -16  # stack slot of the current loop's bound


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


def would_hold(packet: bytes, keys: set[int]) -> bool:
    """The program's decision, in plain Python: its executable specification, which the tests
    hold ``program()`` and ``bpf/dns_prefilter.bpf.c`` to. ``packet`` starts at the IP header
    (as the xt match sees it); ``keys`` is what the map holds (``keys_for``)."""

    def byte(at: int) -> int:  # LD_ABS/LD_IND
        if at >= len(packet):
            raise _Cut
        return packet[at]

    try:
        version = byte(0) >> 4
        if version == 6:
            if byte(6) != 17:
                return True  # a next header other than UDP (extension headers): not followed
            at = 40 + 8 + 12
        elif version == 4:
            at = (byte(0) & 0x0F) * 4 + 8 + 12  # IHL as it is, options included
        else:
            return True
        starts = []  # where each label of the question name begins
        while (length := byte(at)) != 0:
            if length > MAX_LABEL:
                return True  # a compression pointer: not followed
            starts.append(at)
            at += 1 + length
            if len(starts) == MAX_LABELS:
                return True  # the loop's bound, reached before the next length byte is read
    except _Cut:
        return False
    if not starts:
        return False  # the root name
    # ``at`` is the terminating zero, which was read: the bytes before it are all there.
    last = packet[starts[-1] : at]
    last_two = packet[starts[-2] : at] if len(starts) > 1 else last
    if len(last) >= MAX_HASHED or len(last_two) >= MAX_HASHED:
        return True  # the hash loop's bound
    return key(last) in keys or key(last_two) in keys


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


def program(map_fd: int) -> bytes:
    """The socket filter (returns 1 = hold, 0 = do not hold). Registers:
    r6 the skb (LD_ABS/LD_IND need it there), r7 the read position / end of the name,
    r8 and r9 the starts of the last and second-last labels, then the hash loop's position
    and hash; the loop counters are spilled to the stack so the verifier sees their bounds."""
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
        a.label(f"hash{n}")
        a(MOV_K, R9, imm=0)
        a.start_count(MAX_HASHED)            # bytes left to hash
        a.label(f"byte{n}")
        a(JGE_X, R8, R7, off=f"hashed{n}")
        a(LD_IND_B, src=R8, imm=0)
        a(OR_K, R0, imm=0x20)
        a(MUL32_K, R9, imm=31)
        a(ADD32_X, R9, R0)
        a(ADD_K, R8, imm=1)
        a.count_down("hold")
        a(JA, off=f"byte{n}")
        a.label(f"hashed{n}")
        a(STX_W, R10, R9, off=slot)
    for slot in (-4, -8):
        a(LD_IMM64, R1, BPF_PSEUDO_MAP_FD, imm=map_fd)
        a(0, imm=0)
        a(MOV_X, R2, R10)
        a(ADD_K, R2, imm=slot)
        a(CALL, imm=FUNC_MAP_LOOKUP_ELEM)
        a(JNE_K, R0, off="hold", imm=0)
    a.label("pass")
    a(MOV_K, R0, imm=0)
    a(EXIT)
    a.label("hold")
    a(MOV_K, R0, imm=1)
    a(EXIT)
    return a.assemble()


class Prefilter:
    """The prefilter's map and program; ``update`` keeps the map equal to the policy's keys."""

    def __init__(self):
        attr = struct.pack("<IIIII", bpf.BPF_MAP_TYPE_HASH, 4, 1, MAX_KEYS, 0).ljust(72, b"\0")
        self.map_fd = bpf.bpf(bpf.BPF_MAP_CREATE, attr)
        try:
            self.prog_fd = bpf.load_program(program(self.map_fd), bpf.BPF_PROG_TYPE_SOCKET_FILTER, 0, b"ramfw_dns")
        except OSError:
            os.close(self.map_fd)
            raise
        self.keys: set[int] = set()

    def _elem(self, cmd: int, k: int) -> None:
        key_buf = ctypes.create_string_buffer(struct.pack("<I", k))
        value = ctypes.create_string_buffer(b"\1")
        value_ptr = ctypes.addressof(value) if cmd == bpf.BPF_MAP_UPDATE_ELEM else 0  # delete takes none
        bpf.bpf(cmd, struct.pack("<IIQQQ", self.map_fd, 0, ctypes.addressof(key_buf), value_ptr, 0).ljust(32, b"\0"))

    def update(self, patterns: Iterable[Pattern]) -> None:
        wanted = keys_for(patterns)
        if len(wanted) > MAX_KEYS:
            raise OSError(28, f"more than {MAX_KEYS} prefilter keys")
        for k in wanted - self.keys:
            self._elem(bpf.BPF_MAP_UPDATE_ELEM, k)
        for k in self.keys - wanted:
            self._elem(bpf.BPF_MAP_DELETE_ELEM, k)
        self.keys = wanted

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            try:
                os.close(fd)
            except OSError:
                pass
