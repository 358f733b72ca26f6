"""eBPF through the bpf() system call, with no compiler at run time.

The programs ramfw needs are small enough to assemble by hand (as systemd's bpf-firewall.c
does), so they load on kernels without headers (Docker Desktop's LinuxKit, WSL2 5.15). Each
instruction below says what its registers hold.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct
from pathlib import Path

_SYS_BPF = {"x86_64": 321, "aarch64": 280}
SOURCE_DIR = Path(__file__).resolve().parent.parent / "bpf"  # the C sources, for bcc
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_CGROUP_SOCK = 9
BPF_CGROUP_INET_SOCK_CREATE = 2

# Opcodes (include/uapi/linux/bpf.h, bpf_common.h)
_MOV64_IMM = 0x07 | 0xB0  # BPF_ALU64 | BPF_MOV | BPF_K
_MOV32_IMM = 0x04 | 0xB0  # BPF_ALU | BPF_MOV | BPF_K (zero-extends: any 32-bit value)
_STX_W = 0x03 | 0x60  # BPF_STX | BPF_MEM | BPF_W
_EXIT = 0x05 | 0x90  # BPF_JMP | BPF_EXIT

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def return_one_program() -> bytes:
    """r0 = 1 (allow); exit."""
    return insn(_MOV64_IMM, dst=0, imm=1) + insn(_EXIT)


def bpf(cmd: int, attr: bytes) -> int:
    number = _SYS_BPF.get(platform.machine())
    if number is None:
        raise OSError(38, f"bpf() syscall number unknown on {platform.machine()}")
    buf = ctypes.create_string_buffer(attr, len(attr))
    result = _libc.syscall(number, cmd, buf, len(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


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
            lines = log.value.decode(errors="replace").strip().splitlines()
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


BPF_OBJ_PIN, BPF_OBJ_GET, BPF_PROG_ATTACH, BPF_PROG_DETACH = 6, 7, 8, 9
BPF_F_ALLOW_MULTI = 2
BPF_FS = Path("/sys/fs/bpf")
_MARK_OFFSET = 16  # offsetof(struct bpf_sock, mark): bound_dev_if, family, type, protocol, mark


def mark_program(mark: int) -> bytes:
    """cgroup/sock_create: mark every socket the cgroup's processes create (bpf/mark.bpf.c)."""
    return b"".join([
        insn(_MOV32_IMM, dst=2, imm=_s32(mark)),  # r2 = mark (32-bit move, zero-extended)
        insn(_STX_W, dst=1, src=2, off=_MARK_OFFSET),  # r1 = struct bpf_sock *; sk->mark = r2
        insn(_MOV64_IMM, dst=0, imm=1),  # r0 = 1: allow the socket
        insn(_EXIT),
    ])


def _s32(value: int) -> int:
    return value - (1 << 32) if value & 0x80000000 else value


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


def load_mark_with_bcc(mark: int) -> int:
    """Compile bpf/mark.bpf.c with bcc, set the mark in its map; return a duplicate program fd."""
    from bcc import BPF

    program = BPF(src_file=str(SOURCE_DIR / "mark.bpf.c"))
    program["ramfw_config"][ctypes.c_int(0)] = ctypes.c_uint32(mark)
    fd = os.dup(program.load_func("ramfw_mark", BPF.CGROUP_SOCK).fd)
    program.cleanup()
    return fd


class EngineMark:
    """The sock_create program that marks the engine's sockets, attached to its cgroup.

    Pinned under bpffs, so it stays attached when the daemon exits (fail closed) and a
    restarted daemon attaches its new program before detaching the old one: the engine's new
    sockets are never created unmarked. ``remove`` detaches and unpins.
    """

    def __init__(self, cgroup: str, mark: int, bpffs: Path = BPF_FS,
                 state_file: Path = Path("/run/ramfw/engine_mark.cgroup"), use_bcc: bool = False):
        self.cgroup, self.mark, self.bpffs, self.use_bcc = cgroup, mark, Path(bpffs), use_bcc
        self.pin_dir = self.bpffs / "ramfw"
        self.pin_path = self.pin_dir / "engine_mark"
        self.state_file = state_file  # which cgroup the pinned program is attached to

    def apply(self) -> None:
        ensure_bpffs(self.bpffs)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        fd = load_mark_with_bcc(self.mark) if self.use_bcc else load_program(
            mark_program(self.mark), BPF_PROG_TYPE_CGROUP_SOCK, BPF_CGROUP_INET_SOCK_CREATE, b"ramfw_mark")
        try:
            attach(self.cgroup, fd)
            old = self._take_pin()
            pin(fd, self.pin_path)
            if old is not None:
                old_fd, old_cgroup = old
                try:
                    detach(old_cgroup, old_fd)
                except OSError:
                    pass
                os.close(old_fd)
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(self.cgroup)
        finally:
            os.close(fd)

    def _take_pin(self) -> tuple[int, str] | None:
        try:
            fd = pinned(self.pin_path)
        except OSError:
            return None
        self.pin_path.unlink()
        try:
            cgroup = self.state_file.read_text()
        except OSError:
            cgroup = self.cgroup
        return fd, cgroup

    def remove(self) -> None:
        """Detach and unpin; safe to repeat."""
        old = self._take_pin()
        if old is not None:
            fd, cgroup = old
            try:
                detach(cgroup, fd)
            except OSError:
                pass
            os.close(fd)
        self.state_file.unlink(missing_ok=True)
        if self.pin_dir.exists() and not any(self.pin_dir.iterdir()):
            self.pin_dir.rmdir()
