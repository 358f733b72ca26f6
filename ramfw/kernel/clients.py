"""Who opened a connection, recorded by the kernel at connect time (the client recorder).

A ``sock_ops`` program attached to the root of the cgroup v2 hierarchy runs in the connecting
task's context right before a TCP socket sends its SYN (``BPF_SOCK_OPS_TCP_CONNECT_CB``): its
ports and addresses are then bound. It records, per connection, what only the kernel knows for
certain at that moment: the process (tgid) and thread, its user and group, its cgroup (by id) and
its name (``comm``), and when (boot clock). The daemon reads the record of a blocked packet by its
addresses and ports; a blocked packet with no record came from no ``connect()`` of this VM's
(a raw socket's forged SYN, or UDP, which this program does not see).

The program is assembled by hand (``bpf``), so it loads where no compiler or headers are. It is
attached through a BPF link the daemon's process holds: when the daemon exits, however it exits,
the kernel detaches it (recording is for messages, not enforcement; nothing fails open).
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import struct
from dataclasses import dataclass

from . import bpf, btf

BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS, BPF_LINK_CREATE = 13, 3, 28
TCP_CONNECT_CB = 3  # BPF_SOCK_OPS_TCP_CONNECT_CB
FUNC_PID_TGID, FUNC_UID_GID, FUNC_COMM, FUNC_CGROUP_ID, FUNC_BOOT_NS = 14, 15, 16, 80, 125
FUNC_CURRENT_TASK, FUNC_PROBE_READ_KERNEL = 35, 113
MAX_ENTRIES = 16384  # connections remembered (LRU): a block is read within milliseconds of its SYN
MAX_DESTINATIONS = 8192  # addresses whose connections are counted between two reads (LRU)
TAKE_AT_ONCE = 512  # addresses whose counts one read takes (three system calls each)
AF_INET, AF_INET6 = 2, 10
# struct bpf_sock_ops: op, args[4], family, remote_ip4, local_ip4, remote_ip6[4], local_ip6[4],
# remote_port (network order, in the upper 16 bits on little-endian), local_port (host order)
_OP, _FAMILY, _REMOTE4, _LOCAL4, _REMOTE6, _LOCAL6, _RPORT, _LPORT = 0, 20, 24, 28, 32, 48, 64, 68
# The key: family and 4 bytes of padding, remote address (16), local address (16; IPv4 in the first
# 4 bytes), remote port, local port (each as the kernel's 32-bit word). Its first 24 bytes (family,
# remote address) are the key of the connection counts. The value: pid_tgid, uid_gid, cgroup id,
# boot time (ns), comm (16).
KEY, DESTINATION, VALUE = 48, 24, 48
_K, _V = -KEY, -KEY - VALUE  # their stack slots
_T = _V - 8  # a pointer being followed
_REMOTE, _LOCAL, _PORTS = _K + 8, _K + 24, _K + 40


@dataclass(frozen=True)
class Connect:
    """A connection as the kernel recorded it."""

    pid: int  # the process (tgid)
    thread: int
    uid: int
    gid: int
    cgroup_id: int
    boot_ns: int  # when, on CLOCK_BOOTTIME
    comm: str


def _copy(asm: bpf.Assembler, src: int, dst: int, words: int) -> None:
    for word in range(words):
        asm(bpf.LDX_W, bpf.R2, bpf.R6, off=src + 4 * word)
        asm(bpf.STX_W, bpf.R10, bpf.R2, off=dst + 4 * word)


@dataclass(frozen=True)
class TaskOffsets:
    """Where the recorder reads the connecting task's fields, from the kernel's BTF: for kernels
    whose sock_ops programs have no helpers for them (before about 6.16)."""

    tgid: int
    pid: int
    comm: int
    cred: int
    uid: int
    gid: int
    cgroups: int
    dfl_cgrp: int
    kn: int
    kn_id: int

    @classmethod
    def from_btf(cls, types) -> "TaskOffsets":
        o = types.offset
        return cls(o("task_struct", "tgid"), o("task_struct", "pid"), o("task_struct", "comm"),
                   o("task_struct", "cred"), o("cred", "uid"), o("cred", "gid"), o("task_struct", "cgroups"),
                   o("css_set", "dfl_cgrp"), o("cgroup", "kn"), o("kernfs_node", "id"))


def _who_by_helpers(a: bpf.Assembler) -> None:
    """The value from the helpers that give it (sock_ops has them since about 6.16)."""
    for helper, slot in ((FUNC_PID_TGID, 0), (FUNC_UID_GID, 8), (FUNC_CGROUP_ID, 16), (FUNC_BOOT_NS, 24)):
        a(bpf.CALL, imm=helper)
        a(bpf.STX_DW, bpf.R10, bpf.R0, off=_V + slot)
    a(bpf.MOV_X, bpf.R1, bpf.R10)
    a(bpf.ADD_K, bpf.R1, imm=_V + 32)
    a(bpf.MOV_K, bpf.R2, imm=16)
    a(bpf.CALL, imm=FUNC_COMM)


def _read(a: bpf.Assembler, slot: int, size: int, base: int, offset: int) -> None:
    """stack[slot:slot+size] = kernel memory at base + offset (zeroes where it cannot be read)."""
    a(bpf.MOV_X, bpf.R3, base)
    a(bpf.ADD_K, bpf.R3, imm=offset)
    a(bpf.MOV_X, bpf.R1, bpf.R10)
    a(bpf.ADD_K, bpf.R1, imm=slot)
    a(bpf.MOV_K, bpf.R2, imm=size)
    a(bpf.CALL, imm=FUNC_PROBE_READ_KERNEL)


def _follow(a: bpf.Assembler, base: int, offset: int) -> None:
    """r8 = the pointer at base + offset."""
    _read(a, _T, 8, base, offset)
    a(bpf.LDX_DW, bpf.R8, bpf.R10, off=_T)


def _who_by_task(a: bpf.Assembler, t: TaskOffsets) -> None:
    """The same value read from the current task (CAP_PERFMON's helpers, Linux 5.8 and later):
    pid and tgid, comm, cred's uid and gid, and the id of its cgroup v2 (cgroups -> dfl_cgrp -> kn)."""
    a(bpf.CALL, imm=FUNC_CURRENT_TASK)
    a(bpf.MOV_X, bpf.R7, bpf.R0)
    _read(a, _V, 4, bpf.R7, t.pid)  # pid_tgid: the thread in the low half,
    _read(a, _V + 4, 4, bpf.R7, t.tgid)  # the process in the high half
    _read(a, _V + 32, 16, bpf.R7, t.comm)
    _follow(a, bpf.R7, t.cred)
    _read(a, _V + 8, 4, bpf.R8, t.uid)
    _read(a, _V + 12, 4, bpf.R8, t.gid)
    _follow(a, bpf.R7, t.cgroups)
    _follow(a, bpf.R8, t.dfl_cgrp)
    _follow(a, bpf.R8, t.kn)
    _read(a, _V + 16, 8, bpf.R8, t.kn_id)
    a(bpf.CALL, imm=FUNC_BOOT_NS)
    a(bpf.STX_DW, bpf.R10, bpf.R0, off=_V + 24)


def recorder_program(map_fd: int, counts_fd: int, task: TaskOffsets | None = None,
                     count_ports: tuple[int, ...] | None = None) -> bytes:
    """sock_ops: on TCP_CONNECT_CB, connections[addresses, ports] = who, when (from the helpers,
    or with ``task`` read from the task); and counts[remote address] += 1 where the remote port
    is one of ``count_ports`` (any, if None)."""
    a = bpf.Assembler()
    a(bpf.MOV_X, bpf.R6, bpf.R1)
    a(bpf.LDX_W, bpf.R2, bpf.R6, off=_OP)
    a(bpf.JNE_K, bpf.R2, off="out", imm=TCP_CONNECT_CB)
    for slot in range(_T, 0, 8):
        a(bpf.ST_DW, bpf.R10, off=slot, imm=0)
    _copy(a, _FAMILY, _K, 1)  # r2 keeps the family
    a(bpf.JEQ_K, bpf.R2, off="v6", imm=AF_INET6)
    a(bpf.JNE_K, bpf.R2, off="out", imm=AF_INET)
    _copy(a, _REMOTE4, _REMOTE, 1)
    _copy(a, _LOCAL4, _LOCAL, 1)
    a(bpf.JA, off="ports")
    a.label("v6")
    _copy(a, _REMOTE6, _REMOTE, 4)
    _copy(a, _LOCAL6, _LOCAL, 4)
    a.label("ports")
    _copy(a, _RPORT, _PORTS, 2)  # remote_port, local_port: adjacent in the context and in the key
    if task is None:
        _who_by_helpers(a)
    else:
        _who_by_task(a, task)
    a.map_call(bpf.FUNC_MAP_UPDATE_ELEM, map_fd, _K, _V)
    if count_ports is not None:
        a(bpf.LDX_W, bpf.R2, bpf.R10, off=_PORTS)
        for port in count_ports:
            a(bpf.JEQ32_K, bpf.R2, off="count", imm=bpf.s32(remote_port_word(port)))
        a(bpf.JA, off="out")
    a.label("count")
    a.map_call(bpf.FUNC_MAP_LOOKUP_ELEM, counts_fd, _K)  # family and remote address: the key's first 24 bytes
    a(bpf.JEQ_K, bpf.R0, off="first", imm=0)
    a(bpf.MOV_K, bpf.R1, imm=1)
    a(bpf.XADD_DW, bpf.R0, bpf.R1, off=0)
    a(bpf.JA, off="out")
    a.label("first")
    a(bpf.ST_DW, bpf.R10, off=_V, imm=1)
    a.map_call(bpf.FUNC_MAP_UPDATE_ELEM, counts_fd, _K, _V)
    a.label("out")
    a(bpf.MOV_K, bpf.R0, imm=1)
    a(bpf.EXIT)
    return a.assemble()


def key(local: str, local_port: int, remote: str, remote_port: int) -> bytes:
    """The map key of a connection, as the program writes it (ports in host order: the program
    stores the kernel's words as they are, which the little-endian loads read this way)."""
    return destination_key(remote) + _packed(local) + struct.pack("<II", remote_port_word(remote_port), local_port)


def _packed(address: str) -> bytes:
    return ipaddress.ip_address(address).packed.ljust(16, b"\0")


def destination_key(address: str) -> bytes:
    """The key of the connection counts: the family, padding, the address."""
    family = AF_INET6 if ipaddress.ip_address(address).version == 6 else AF_INET
    return struct.pack("<II", family, 0) + _packed(address)


def remote_port_word(port: int) -> int:
    """``bpf_sock_ops.remote_port`` as a little-endian load reads it: network order, shifted up."""
    return int.from_bytes(struct.pack(">H", port), "little") << 16


def parse(value: bytes) -> Connect:
    pid_tgid, uid_gid, cgroup_id, boot_ns = struct.unpack_from("<QQQQ", value)
    comm = value[32:48].split(b"\0", 1)[0].decode(errors="replace")
    return Connect(pid=pid_tgid >> 32, thread=pid_tgid & 0xFFFFFFFF, uid=uid_gid & 0xFFFFFFFF, gid=uid_gid >> 32,
                   cgroup_id=cgroup_id, boot_ns=boot_ns, comm=comm)


def _mapped(address: str) -> str | None:
    """An IPv4 address as a dual-stack socket's IPv6 side has it (``::ffff:a.b.c.d``)."""
    parsed = ipaddress.ip_address(address)
    return f"::ffff:{parsed}" if parsed.version == 4 else None


HOW = {"helpers": "with the kernel's helpers", "task": "reading the task's fields at the kernel's BTF offsets"}


def load_recorder(map_fd: int, counts_fd: int, count_ports: tuple[int, ...] | None = None,
                  only: str | None = None) -> tuple[int, str]:
    """Load the recorder the way this kernel takes it: with the helpers where sock_ops has them,
    else reading the task (BTF); return its fd and which (a ``HOW`` key). ``only`` tries one.
    OSError says why each was refused."""
    refused = []
    for how in ("helpers", "task") if only is None else (only,):
        try:
            task = None if how == "helpers" else TaskOffsets.from_btf(btf.load())
            code = recorder_program(map_fd, counts_fd, task, count_ports)
            return bpf.load_program(code, BPF_PROG_TYPE_SOCK_OPS, BPF_CGROUP_SOCK_OPS, b"ramfw_clients"), how
        except (OSError, btf.BtfError) as err:
            refused.append(f"{how}: {err.strerror if isinstance(err, OSError) else err}")
    raise OSError(22, "; ".join(refused))


class ClientRecorder:
    """The recorder's map, program and link: loaded, attached at ``cgroup_root``, closed.
    ``how``: which program this kernel took (``HOW``)."""

    def __init__(self, cgroup_root: str, count_ports: tuple[int, ...] | None = None, only: str | None = None):
        self.map_fd = self.counts_fd = self.prog_fd = self.link_fd = -1
        try:
            self.map_fd = bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, KEY, VALUE, MAX_ENTRIES)
            self.counts_fd = bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, DESTINATION, 8, MAX_DESTINATIONS)
            self.prog_fd, self.how = load_recorder(self.map_fd, self.counts_fd, count_ports, only)
            self.link_fd = link_cgroup(cgroup_root, self.prog_fd, BPF_CGROUP_SOCK_OPS)
        except OSError:
            self.close()
            raise

    def lookup(self, local: str, local_port: int, remote: str, remote_port: int) -> Connect | None:
        """Who opened the connection from ``local`` to ``remote``, if the kernel recorded it."""
        candidates = [(local, remote)]
        if _mapped(local) and _mapped(remote):
            candidates.append((_mapped(local), _mapped(remote)))
        for here, there in candidates:
            value = bpf.map_lookup(self.map_fd, key(here, local_port, there, remote_port), VALUE)
            if value is not None:
                return parse(value)
        return None

    def connections(self, limit: int = TAKE_AT_ONCE) -> dict[str, int]:
        """The TCP connections opened to each address since the last call (taken from the map),
        for ``limit`` addresses at most: a flood of connects to many addresses costs the caller
        a bounded time (the rest wait for the next call, or the LRU drops them). A connect counted
        between the read and the delete of its address is lost."""
        taken = {}
        for packed in bpf.map_keys(self.counts_fd, DESTINATION, limit):
            value = bpf.map_lookup(self.counts_fd, packed, 8)
            with contextlib.suppress(OSError):
                bpf.map_delete(self.counts_fd, packed)
            if value is not None:
                address = ipaddress.ip_address(packed[8:12] if packed[0] == AF_INET else packed[8:])
                name = str(getattr(address, "ipv4_mapped", None) or address)  # a dual-stack socket's
                taken[name] = taken.get(name, 0) + struct.unpack("<Q", value)[0]
        return taken

    def close(self) -> None:
        for fd in (self.link_fd, self.prog_fd, self.map_fd, self.counts_fd):
            if fd >= 0:
                os.close(fd)
        self.map_fd = self.counts_fd = self.prog_fd = self.link_fd = -1


def link_cgroup(cgroup: str, prog_fd: int, attach_type: int) -> int:
    """BPF_LINK_CREATE on a cgroup directory: the attachment lives as long as the link's fd."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bpf.bpf(BPF_LINK_CREATE, struct.pack("<IIII", prog_fd, fd, attach_type, 0).ljust(64, b"\0"))
    finally:
        os.close(fd)


def probe() -> tuple[bool, str]:
    """Does the verifier take a recorder, and which? Loaded, not attached."""
    map_fd = counts_fd = prog_fd = -1
    try:
        map_fd = bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, KEY, VALUE, 16)
        counts_fd = bpf.map_create(bpf.BPF_MAP_TYPE_LRU_HASH, DESTINATION, 8, 16)
        prog_fd, how = load_recorder(map_fd, counts_fd)
        return True, (f"the kernel records who connects (sock_ops at connect time, {HOW[how]}): block events name "
                      "their clients")
    except OSError as err:
        return False, f"the client recorder does not load ({err.strerror})"
    finally:
        for fd in (prog_fd, map_fd, counts_fd):
            if fd >= 0:
                os.close(fd)
