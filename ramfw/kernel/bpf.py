"""eBPF through the bpf() system call, with no compiler at run time: the primitives.

The programs ramfw needs are small enough to assemble by hand (as systemd's bpf-firewall.c
does), so they load on kernels without headers (Docker Desktop's LinuxKit, WSL2 5.15). This
module has the system call, the opcodes and an assembler; the programs live with the object
they serve (``engine`` for the engine mark, ``prefilter`` for the DNS prefilter).
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
# The C sources, for bcc: the checkout's, or where the Debian package puts them
SOURCE_DIR = next((d for d in (Path(__file__).resolve().parent.parent.parent / "bpf", Path("/usr/share/ramfw/bpf"))
                   if d.is_dir()), Path("/usr/share/ramfw/bpf"))
# Commands, program types, attach points (include/uapi/linux/bpf.h)
BPF_MAP_CREATE, BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM = 0, 2, 3
BPF_PROG_LOAD, BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_ATTACH, BPF_PROG_DETACH, BPF_PROG_TEST_RUN = 5, 6, 7, 8, 9, 10
BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_QUERY = 15, 16
ATTR_SIZE = 160  # room for every field of union bpf_attr a newer kernel may write back (query.revision, ...)
BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_LRU_HASH = 1, 2, 9
BPF_MAP_LOOKUP_ELEM, BPF_MAP_GET_NEXT_KEY = 1, 4
BPF_PROG_TYPE_SOCKET_FILTER, BPF_PROG_TYPE_CGROUP_SOCK = 1, 9
BPF_CGROUP_INET_SOCK_CREATE = 2
BPF_F_ALLOW_MULTI = 2
BPF_PSEUDO_MAP_FD = 1
FUNC_MAP_LOOKUP_ELEM, FUNC_MAP_UPDATE_ELEM, FUNC_MAP_DELETE_ELEM, FUNC_KTIME_GET_NS = 1, 2, 3, 5

# Opcodes (include/uapi/linux/bpf.h, bpf_common.h): _K takes the immediate, _X a register.
LD_ABS_B, LD_IND_B = 0x30, 0x50  # the packet's byte at imm, or at src + imm (socket filters)
LD_ABS_H, LD_ABS_W, LD_IND_H = 0x28, 0x20, 0x48  # 16 and 32 bits, in host order
MOV_K, MOV_X, ADD_K, ADD_X, SUB_K, SUB_X, AND_K, OR_K, OR_X, LSH_K, RSH_K = (0xB7, 0xBF, 0x07, 0x0F, 0x17, 0x1F, 0x57,
                                                                           0x47, 0x4F, 0x67, 0x77)
MOV32_K, MUL32_K, ADD32_X = 0xB4, 0x24, 0x0C  # 32-bit ALU: the result is zero-extended
ST_W, ST_DW, STX_W, STX_DW, LDX_W, LDX_DW, XADD_DW = 0x62, 0x7A, 0x63, 0x7B, 0x61, 0x79, 0xDB
JA, JEQ_K, JNE_K, JGT_K, JGT_X, JGE_X = 0x05, 0x15, 0x55, 0x25, 0x2D, 0x3D
JEQ32_K = 0x16  # compares the low 32 bits (the immediate is not sign-extended to 64)
CALL, EXIT, LD_IMM64 = 0x85, 0x95, 0x18
R0, R1, R2, R3, R4, R6, R7, R8, R9, R10 = 0, 1, 2, 3, 4, 6, 7, 8, 9, 10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def s32(value: int) -> int:
    """A 32-bit value as the signed immediate an instruction carries."""
    return value - (1 << 32) if value & 0x80000000 else value


class Assembler:
    """Just enough of an eBPF assembler: instructions, labels, forward and backward jumps."""

    def __init__(self):
        self.code: list[list] = []
        self.labels: dict[str, int] = {}

    def __call__(self, op: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0) -> None:
        self.code.append([op, dst, src, off, imm])

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def map_call(self, helper: int, map_fd: int, key_slot: int, value: int | None = None) -> None:
        """A map helper on the key at ``key_slot`` (and, for an update, the value at ``value``)."""
        self(LD_IMM64, R1, BPF_PSEUDO_MAP_FD, imm=map_fd)
        self(0, imm=0)
        self(MOV_X, R2, R10)
        self(ADD_K, R2, imm=key_slot)
        if value is not None:
            self(MOV_X, R3, R10)
            self(ADD_K, R3, imm=value)
            self(MOV_K, R4, imm=0)           # BPF_ANY: a query asked again is asked anew
        self(CALL, imm=helper)

    def count(self, counters_fd: int, index: int, index_slot: int) -> None:
        """counters[index] += 1, atomically (the index is put in ``index_slot`` of the stack)."""
        self(ST_W, R10, off=index_slot, imm=index)
        self.map_call(FUNC_MAP_LOOKUP_ELEM, counters_fd, index_slot)
        self(JEQ_K, R0, off=f"counted{index}", imm=0)
        self(MOV_K, R1, imm=1)
        self(XADD_DW, R0, R1, off=0)
        self.label(f"counted{index}")

    def assemble(self) -> bytes:
        out = []
        for index, (op, dst, src, off, imm) in enumerate(self.code):
            if isinstance(off, str):
                off = self.labels[off] - index - 1
            out.append(insn(op, dst, src, off, imm))
        return b"".join(out)


def return_one_program() -> bytes:
    """r0 = 1 (allow); exit."""
    return insn(MOV_K, dst=R0, imm=1) + insn(EXIT)


def bpf(cmd: int, attr: bytes | ctypes.Array) -> int:
    """The bpf() system call; ``attr`` is copied unless it is a ctypes buffer (then the kernel's
    answers, as BPF_PROG_TEST_RUN's, can be read back from it)."""
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(38, f"bpf() syscall number unknown on {platform.machine()}")
    buf = attr if isinstance(attr, ctypes.Array) else ctypes.create_string_buffer(attr, len(attr))
    result = _libc.syscall(number, cmd, buf, len(buf))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def map_create(map_type: int, key_size: int, value_size: int, max_entries: int) -> int:
    return bpf(BPF_MAP_CREATE, struct.pack("<IIIII", map_type, key_size, value_size, max_entries, 0).ljust(72, b"\0"))


def _elem_attr(map_fd: int, key: ctypes.Array, value: ctypes.Array | None) -> bytes:
    return struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(key), ctypes.addressof(value) if value is not None else 0,
                       0).ljust(32, b"\0")


def map_update(map_fd: int, key: bytes, value: bytes) -> None:
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value, len(value))
    bpf(BPF_MAP_UPDATE_ELEM, _elem_attr(map_fd, k, v))


def map_delete(map_fd: int, key: bytes) -> None:
    k = ctypes.create_string_buffer(key, len(key))  # kept alive until the call returns
    bpf(BPF_MAP_DELETE_ELEM, _elem_attr(map_fd, k, None))


def map_keys(map_fd: int, key_size: int, limit: int = 1 << 20) -> list[bytes]:
    """Every key of a map (BPF_MAP_GET_NEXT_KEY from none), at most ``limit``."""
    keys: list[bytes] = []
    previous = None
    while len(keys) < limit:
        k = ctypes.create_string_buffer(previous, key_size) if previous is not None else None
        nxt = ctypes.create_string_buffer(key_size)
        try:
            bpf(BPF_MAP_GET_NEXT_KEY, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k) if k is not None else 0,
                                                  ctypes.addressof(nxt), 0).ljust(32, b"\0"))
        except OSError as err:
            if err.errno == 2:  # ENOENT: the last key
                break
            raise
        previous = nxt.raw
        keys.append(previous)
    return keys


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value at ``key``, or None where there is none (ENOENT)."""
    k, v = ctypes.create_string_buffer(key, len(key)), ctypes.create_string_buffer(value_size)
    try:
        bpf(BPF_MAP_LOOKUP_ELEM, _elem_attr(map_fd, k, v))
    except OSError as err:
        if err.errno == 2:
            return None
        raise
    return v.raw


def test_run(prog_fd: int, packet: bytes) -> int:
    """Run a socket filter on an IP packet (BPF_PROG_TEST_RUN); return its verdict."""
    frame = b"\0" * 12 + (b"\x86\xdd" if packet[:1] and packet[0] >> 4 == 6 else b"\x08\x00") + packet
    data = ctypes.create_string_buffer(frame, len(frame))
    attr = ctypes.create_string_buffer(struct.pack("<IIIIQQII", prog_fd, 0, len(frame), 0,
                                                   ctypes.addressof(data), 0, 1, 0).ljust(80, b"\0"), 80)
    bpf(BPF_PROG_TEST_RUN, attr)
    return struct.unpack_from("<I", attr.raw, 4)[0]


def load_program(code: bytes, prog_type: int, expected_attach_type: int, name: bytes = b"ramfw") -> int:
    """Load a program; return its file descriptor. On a refusal, load again with the
    verifier's log and put its last line in the error."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")

    def attempt(log_level: int, log) -> int:
        return bpf(BPF_PROG_LOAD, struct.pack(
            "<IIQQIIQII16sII", prog_type, len(code) // 8, ctypes.addressof(insns), ctypes.addressof(license_),
            log_level, len(log) if log is not None else 0, ctypes.addressof(log) if log is not None else 0,
            0, 0, name[:15], 0, expected_attach_type).ljust(128, b"\0"))

    try:
        return attempt(0, None)
    except OSError as err:
        log = ctypes.create_string_buffer(1 << 20)
        try:
            return attempt(1, log)
        except OSError:
            lines = [line for line in log.value.decode(errors="replace").strip().splitlines()  # the reason, not
                     if not line.startswith(("processed ", "verification time", "stack depth"))]  # the tally
            raise OSError(err.errno, f"{err.strerror}: {lines[-1] if lines else 'no verifier log'}") from None


def cgroup2_mount() -> str | None:
    """Where the cgroup v2 hierarchy is mounted (unified or hybrid layout), or None."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return None
    for line in mounts:
        parts = line.split()
        if len(parts) > 2 and parts[2] == "cgroup2":
            return parts[1]
    return None


def mount_cgroup2(where: Path) -> None:
    """Mount a cgroup v2 hierarchy at ``where`` (the same hierarchy as everyone's: there is one)."""
    where.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"cgroup2", str(where).encode(), b"cgroup2", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount cgroup2 at {where}: {os.strerror(err)}")


def unmount(where: Path) -> None:
    _libc.umount2(str(where).encode(), 2)  # MNT_DETACH; nothing to do if it is already gone


BPF_FS = Path("/sys/fs/bpf")


def attach(cgroup: str, prog_fd: int) -> None:
    """Attach to a cgroup v2 directory as sock_create, beside any other programs there."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpf(BPF_PROG_ATTACH, struct.pack("<IIII", fd, prog_fd, BPF_CGROUP_INET_SOCK_CREATE,
                                         BPF_F_ALLOW_MULTI).ljust(32, b"\0"))
    finally:
        os.close(fd)


def detach(cgroup: str, prog_fd: int) -> None:
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpf(BPF_PROG_DETACH, struct.pack("<IIII", fd, prog_fd, BPF_CGROUP_INET_SOCK_CREATE, 0).ljust(32, b"\0"))
    finally:
        os.close(fd)


def attached_ids(cgroup: str) -> list[int]:
    """The ids of the sock_create programs attached to a cgroup directory itself (not
    inherited), as the kernel reports them (BPF_PROG_QUERY); OSError if it is gone."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ids = (ctypes.c_uint32 * 64)()
        attr = ctypes.create_string_buffer(struct.pack("<IIIIQI", fd, BPF_CGROUP_INET_SOCK_CREATE, 0, 0,
                                                       ctypes.addressof(ids), len(ids)).ljust(ATTR_SIZE, b"\0"))
        bpf(BPF_PROG_QUERY, attr)
        count = struct.unpack_from("<I", attr, 24)[0]
        return list(ids[:min(count, len(ids))])
    finally:
        os.close(fd)


def program_id(prog_fd: int) -> int:
    """The kernel's id of a loaded program (BPF_OBJ_GET_INFO_BY_FD: bpf_prog_info.id)."""
    info = ctypes.create_string_buffer(8)  # type, id: the kernel fills what fits
    bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", prog_fd, len(info), ctypes.addressof(info)).ljust(16, b"\0"))
    return struct.unpack_from("<I", info, 4)[0]


def pin(prog_fd: int, path: Path) -> None:
    name = ctypes.create_string_buffer(str(path).encode())
    bpf(BPF_OBJ_PIN, struct.pack("<QII", ctypes.addressof(name), prog_fd, 0).ljust(32, b"\0"))


def pinned(path: Path) -> int:
    """A file descriptor for the program pinned at ``path``; OSError if there is none."""
    name = ctypes.create_string_buffer(str(path).encode())
    return bpf(BPF_OBJ_GET, struct.pack("<QII", ctypes.addressof(name), 0, 0).ljust(32, b"\0"))


def ensure_bpffs(root: Path = BPF_FS) -> None:
    """bpffs holds the pins that let the attachment outlive the daemon; mount it if needed."""
    if any(line.split()[2:3] == ["bpf"] and line.split()[1] == str(root)
           for line in Path("/proc/self/mounts").read_text().splitlines()):
        return
    root.mkdir(parents=True, exist_ok=True)
    if _libc.mount(b"bpf", str(root).encode(), b"bpf", 0, None) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"cannot mount bpffs at {root}: {os.strerror(err)}")


