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
    """Load a program; return its file descriptor."""
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(4096)
    attr = struct.pack(
        "<IIQQIIQII16sII", prog_type, len(code) // 8, ctypes.addressof(insns),
        ctypes.addressof(license_), 1, len(log), ctypes.addressof(log), 0, 0, name[:15], 0,
        expected_attach_type,
    ).ljust(128, b"\0")
    try:
        return bpf(BPF_PROG_LOAD, attr)
    except OSError as err:
        detail = log.value.decode(errors="replace").strip().splitlines()
        if detail:
            raise OSError(err.errno, f"{err.strerror}: {detail[-1]}") from None
        raise


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
