"""Engine scope: the eBPF program that marks the container engine's sockets, and the engine's
cgroup it is attached to.

The engine is dockerd, containerd, buildkitd and whatever else the configuration names. Under
systemd they live in their service's cgroup; elsewhere in whatever cgroup they were started
in. If that is the root cgroup, shared with every other process, marking it would put the
whole VM in scope: ramfw says so instead, and can move the engine into a dedicated cgroup.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

from . import bpf

DEDICATED = "ramfw-engine"
_MARK_OFFSET = 16  # offsetof(struct bpf_sock, mark): bound_dev_if, family, type, protocol, mark


@dataclass(frozen=True)
class EngineCgroup:
    path: str  # absolute directory in the cgroup v2 hierarchy
    pids: tuple[int, ...]
    note: str = ""


def v2_path(proc_cgroup: str) -> str | None:
    """The cgroup v2 path from the text of /proc/<pid>/cgroup (the ``0::`` line), or None."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def engine_pids(names: tuple[str, ...], proc: Path = Path("/proc")) -> list[int]:
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if comm in names:
            found.append(int(entry.name))
    return sorted(found)


def locate(mount: str, configured: str, names: tuple[str, ...], dedicate: bool,
           proc: Path = Path("/proc")) -> EngineCgroup | None:
    """The engine's cgroup: the configured one, else the one its processes are in."""
    if configured:
        path = configured if configured.startswith(mount) else os.path.join(mount, configured.lstrip("/"))
        return EngineCgroup(path, ())
    pids = engine_pids(names, proc)
    paths = {}
    for pid in pids:
        try:
            relative = v2_path((proc / str(pid) / "cgroup").read_text())
        except OSError:
            continue
        if relative is not None:
            paths.setdefault(relative, []).append(pid)
    if not paths:
        return None
    relative, members = max(paths.items(), key=lambda item: len(item[1]))
    if relative != "/":
        return EngineCgroup(os.path.join(mount, relative.lstrip("/")), tuple(members))
    if not dedicate:
        return EngineCgroup(mount, tuple(members),
                            "the engine shares the root cgroup with every process: engine scope would "
                            "cover the whole VM, so it is not attached; set enforcement.dedicated_cgroup = true")
    dedicated = Path(mount) / DEDICATED
    dedicated.mkdir(exist_ok=True)
    for pid in members:
        try:
            (dedicated / "cgroup.procs").write_text(str(pid))
        except OSError:
            pass
    return EngineCgroup(str(dedicated), tuple(members), f"moved the engine ({len(members)} processes) "
                                                        f"into the dedicated cgroup {dedicated}")


def mark_program(mark: int) -> bytes:
    """cgroup/sock_create: mark every socket the cgroup's processes create (bpf/mark.bpf.c)."""
    return b"".join([
        bpf.insn(bpf.MOV32_K, dst=bpf.R2, imm=bpf.s32(mark)),  # r2 = mark (32-bit move, zero-extended)
        bpf.insn(bpf.STX_W, dst=bpf.R1, src=bpf.R2, off=_MARK_OFFSET),  # r1 = struct bpf_sock *; sk->mark = r2
        bpf.insn(bpf.MOV_K, dst=bpf.R0, imm=1),  # r0 = 1: allow the socket
        bpf.insn(bpf.EXIT),
    ])


def load_mark_with_bcc(mark: int) -> int:
    """Compile bpf/mark.bpf.c with bcc, set the mark in its map; return a duplicate program fd."""
    from bcc import BPF

    program = BPF(src_file=str(bpf.SOURCE_DIR / "mark.bpf.c"))
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

    def __init__(self, cgroup: str, mark: int, bpffs: Path = bpf.BPF_FS,
                 state_file: Path = Path("/run/ramfw/engine_mark.cgroup"), use_bcc: bool = False):
        self.cgroup, self.mark, self.bpffs, self.use_bcc = cgroup, mark, Path(bpffs), use_bcc
        self.pin_dir = self.bpffs / "ramfw"
        self.pin_path = self.pin_dir / "engine_mark"
        self.state_file = state_file  # which cgroup the pinned program is attached to

    def apply(self) -> None:
        bpf.ensure_bpffs(self.bpffs)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        fd = load_mark_with_bcc(self.mark) if self.use_bcc else bpf.load_program(
            mark_program(self.mark), bpf.BPF_PROG_TYPE_CGROUP_SOCK, bpf.BPF_CGROUP_INET_SOCK_CREATE, b"ramfw_mark")
        try:
            bpf.attach(self.cgroup, fd)
            old = self._take_pin()
            bpf.pin(fd, self.pin_path)
            _detach(old)
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(self.cgroup)
        finally:
            os.close(fd)

    def _take_pin(self) -> tuple[int, str] | None:
        try:
            fd = bpf.pinned(self.pin_path)
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
        _detach(self._take_pin())
        self.state_file.unlink(missing_ok=True)
        if self.pin_dir.exists() and not any(self.pin_dir.iterdir()):
            self.pin_dir.rmdir()


def _detach(pinned: tuple[int, str] | None) -> None:
    """Detach a program taken from its pin (fd, cgroup) and close it; a cgroup already gone
    took its attachment with it."""
    if pinned is None:
        return
    fd, cgroup = pinned
    try:
        bpf.detach(cgroup, fd)
    except OSError:
        pass
    os.close(fd)
