"""The kernel-side DNS prefilter: hold only the replies that may be for an allowlisted name.

Most DNS replies on a developer's machine are for names nobody allowlisted; holding each of
them in the queue costs a round trip through userspace. This eBPF socket-filter program,
used as an xt ``bpf`` match in front of the queue rule, reads a UDP reply's question name and
looks its last label, and its last two labels, up in a hash map of keys made from the
allowlist. No hit: the reply is not held (a later rule copies it to the daemon
asynchronously, for block messages and counters). A hit, or anything the program does not
follow (compression, IPv6 extension headers, odd lengths): the reply is held as before.

The map is a superset test, never the decision: a hash collision only holds a reply the
daemon then releases. Every entry ``a.b.example.com`` or ``*.example.com`` is keyed by its
last two labels (``example.com``), a one-label entry by its only label, and a name is looked
up by both of its own, so no allowlisted name can miss the filter.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Iterable

from . import bpf
from .names import Pattern

BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 2, 3
BPF_MAP_TYPE_HASH = 1
BPF_PROG_TYPE_SOCKET_FILTER = 1
MAX_KEYS = 65536
R0, R1, R2, R6, R7, R8, R9, R10 = 0, 1, 2, 6, 7, 8, 9, 10


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


class _Asm:
    """Just enough of an eBPF assembler: instructions, labels, forward and backward jumps."""

    def __init__(self):
        self.code: list[list] = []
        self.labels: dict[str, int] = {}

    def __call__(self, op: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.code.append([op, dst, src, off, imm])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

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

    def assemble(self) -> bytes:
        out = []
        for index, (op, dst, src, off, imm) in enumerate(self.code):
            if isinstance(off, str):
                off = self.labels[off] - index - 1
            out.append(bpf.insn(op, dst, src, off, imm))
        return b"".join(out)


# opcodes
LD_ABS_B, LD_IND_B = 0x30, 0x50
MOV_K, MOV_X, ADD_K, ADD_X, AND_K, OR_K, LSH_K, RSH_K, SUB_K = 0xB7, 0xBF, 0x07, 0x0F, 0x57, 0x47, 0x67, 0x77, 0x17
MUL32_K, ADD32_X = 0x24, 0x0C
STX_W, STX_DW, LDX_DW = 0x63, 0x7B, 0x79
JA, JEQ_K, JNE_K, JGT_K, JGE_X = 0x05, 0x15, 0x55, 0x25, 0x3D
CALL, EXIT, LD_IMM64 = 0x85, 0x95, 0x18
BPF_PSEUDO_MAP_FD = 1
COUNTER = -16  # stack slot of the current loop's bound
MAP_LOOKUP_ELEM = 1


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
    a.start_count(128)                       # labels left to read
    a.label("label")
    a(LD_IND_B, src=R7, imm=0)               # r0 = label length
    a(JEQ_K, R0, off="walked", imm=0)
    a(JGT_K, R0, off="hold", imm=63)         # a compression pointer in a question: hold
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
        a.start_count(130)                   # bytes left to hash
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
        a(CALL, imm=MAP_LOOKUP_ELEM)
        a(JNE_K, R0, off="hold", imm=0)
    a.label("pass")
    a(MOV_K, R0, imm=0)
    a(EXIT)
    a.label("hold")
    a(MOV_K, R0, imm=1)
    a(EXIT)
    return a.assemble()


class DnsFilter:
    """The prefilter's map and program; ``update`` keeps the map equal to the policy's keys."""

    def __init__(self):
        attr = struct.pack("<IIIII", BPF_MAP_TYPE_HASH, 4, 1, MAX_KEYS, 0).ljust(72, b"\0")
        self.map_fd = bpf.bpf(BPF_MAP_CREATE, attr)
        try:
            self.prog_fd = bpf.load_program(program(self.map_fd), BPF_PROG_TYPE_SOCKET_FILTER, 0, b"ramfw_dns")
        except OSError:
            os.close(self.map_fd)
            raise
        self.keys: set[int] = set()

    def _elem(self, cmd: int, k: int) -> None:
        key_buf = ctypes.create_string_buffer(struct.pack("<I", k))
        value = ctypes.create_string_buffer(b"\1")
        value_ptr = ctypes.addressof(value) if cmd == BPF_MAP_UPDATE_ELEM else 0  # delete takes none
        bpf.bpf(cmd, struct.pack("<IIQQQ", self.map_fd, 0, ctypes.addressof(key_buf), value_ptr, 0).ljust(32, b"\0"))

    def update(self, patterns: Iterable[Pattern]) -> None:
        wanted = keys_for(patterns)
        if len(wanted) > MAX_KEYS:
            raise OSError(28, f"more than {MAX_KEYS} prefilter keys")
        for k in wanted - self.keys:
            self._elem(BPF_MAP_UPDATE_ELEM, k)
        for k in self.keys - wanted:
            self._elem(BPF_MAP_DELETE_ELEM, k)
        self.keys = wanted

    def close(self) -> None:
        for fd in (self.prog_fd, self.map_fd):
            try:
                os.close(fd)
            except OSError:
                pass


def test_run(prog_fd: int, packet: bytes) -> int:
    """Run the program on an IP packet (BPF_PROG_TEST_RUN); return its verdict (for tests)."""
    frame = b"\0" * 12 + (b"\x86\xdd" if packet[:1] and packet[0] >> 4 == 6 else b"\x08\x00") + packet
    data = ctypes.create_string_buffer(frame, len(frame))
    attr = ctypes.create_string_buffer(struct.pack("<IIIIQQII", prog_fd, 0, len(frame), 0,
                                                   ctypes.addressof(data), 0, 1, 0).ljust(80, b"\0"), 80)
    number = bpf._SYS_BPF[os.uname().machine]
    if bpf._libc.syscall(number, 10, attr, 80) < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return struct.unpack_from("<I", attr.raw, 4)[0]
