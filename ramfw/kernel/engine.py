"""Engine scope: the eBPF program that marks the container engine's sockets, the cgroups it is
attached to, and how the engine's processes are found.

The engine is dockerd, containerd, buildkitd and whatever else the configuration names. On a
stock systemd install dockerd and containerd are two services, so two cgroups: every cgroup
that holds an engine process is marked. A process is an engine process when the file it runs
is one of the trusted engine executables (root-owned, not writable by others, at a system path
or a configured one), compared by device and inode, never by name: a process in a container
that calls itself ``dockerd`` runs a file of the container's and is ignored. Only processes in
ramfw's own network namespace count: the table sees no other's traffic.
"""

from __future__ import annotations

import ctypes
import json
import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from . import bpf

DEDICATED = "ramfw-engine"
SYSTEM_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")
_MARK_OFFSET = 16  # offsetof(struct bpf_sock, mark): bound_dev_if, family, type, protocol, mark
_DELETED = " (deleted)"


@dataclass(frozen=True)
class EngineProcess:
    pid: int
    executable: str
    cgroup: str  # absolute directory in the cgroup v2 hierarchy


@dataclass
class Discovery:
    """What a scan of /proc found: the cgroups to mark, and why some engine could not be."""

    cgroups: dict[str, list[EngineProcess]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # an engine that cannot be marked: fail closed
    ignored: list[str] = field(default_factory=list)  # processes named like an engine, not one

    @property
    def processes(self) -> list[EngineProcess]:
        return [p for members in self.cgroups.values() for p in members]


def under(mount: str, path: str) -> str:
    """A cgroup path as configured (relative to the hierarchy, or already under ``mount``) made absolute."""
    return path if path.startswith(mount + "/") else os.path.join(mount, path.lstrip("/"))


def v2_path(proc_cgroup: str) -> str | None:
    """The cgroup v2 path from the text of /proc/<pid>/cgroup (the ``0::`` line), or None."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


def trusted_executables(names: tuple[str, ...], configured: tuple[str, ...] = ()) -> dict[tuple[int, int], str]:
    """(device, inode) -> path of every file an engine process may run: ``names`` in the system
    directories and the configured paths, each root-owned and writable by root only."""
    found = {}
    for path in [os.path.join(d, n) for n in names for d in SYSTEM_DIRS] + list(configured):
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022:
            found.setdefault((st.st_dev, st.st_ino), os.path.realpath(path))
    return found


def _namespace(proc: Path, pid: str, kind: str) -> str:
    try:
        return os.readlink(proc / pid / "ns" / kind)
    except OSError:
        return ""


def _executable(proc: Path, pid: str, trusted: dict[tuple[int, int], str]) -> str | None:
    """The trusted executable the process runs, or None. A process still running a file an
    upgrade replaced is trusted if that path is one of ours and it shares our mount namespace
    (the deleted file was then ours, not a container's)."""
    exe = proc / pid / "exe"
    try:
        target = os.readlink(exe)
    except OSError:
        return None
    try:
        st = os.stat(exe)
    except OSError:
        st = None
    if st is not None and (st.st_dev, st.st_ino) in trusted:
        return trusted[(st.st_dev, st.st_ino)]
    if target.endswith(_DELETED) and target[:-len(_DELETED)] in trusted.values() \
            and _namespace(proc, pid, "mnt") == _namespace(proc, "self", "mnt"):
        return target[:-len(_DELETED)]
    return None


def _members(cgroup: str) -> list[str]:
    try:
        return (Path(cgroup) / "cgroup.procs").read_text().split()
    except OSError:
        return []


def _read(path: Path) -> str | None:
    """A /proc file as text, whatever bytes it holds (a process names itself as it likes:
    ``prctl(PR_SET_NAME)`` takes any bytes, and needs no privilege); None if it is gone."""
    try:
        return path.read_bytes().decode(errors="surrogateescape")
    except OSError:
        return None


def _effective_uid(status: str) -> int | None:
    for line in status.splitlines():
        if line.startswith("Uid:") and len(line.split()) > 2:
            return int(line.split()[2])
    return None


def discover(mount: str, names: tuple[str, ...], configured_executables: tuple[str, ...] = (),
             proc: Path = Path("/proc"), trusted: dict[tuple[int, int], str] | None = None,
             configured_cgroups: frozenset[str] = frozenset()) -> Discovery:
    """Every cgroup holding a verified engine process of this network namespace.

    A verified engine process runs as root a trusted executable. A root process of this
    namespace with an engine's name that runs another file is a problem, not ignored: it may be
    the engine installed where ramfw does not look (snap, k3s, /opt, a LinuxKit service's own
    root filesystem), and engine scope fails closed until it is named in engine_executables or
    its cgroup in engine_cgroups. Other processes with an engine's name (not root, or in
    another network namespace: Docker-in-Docker) are only listed. A process in one of the
    ``configured_cgroups`` (absolute) is marked by configuration, whatever file it runs.
    """
    found = Discovery()
    if trusted is None:
        trusted = trusted_executables(names, configured_executables)
    own_net = _namespace(proc, "self", "net")
    for entry in sorted(proc.iterdir(), key=lambda e: int(e.name) if e.name.isdigit() else -1):
        pid = entry.name
        if not pid.isdigit():
            continue
        comm = (_read(entry / "comm") or "").strip()
        if comm not in names or _namespace(proc, pid, "net") != own_net:
            continue
        status, cgroup = _read(entry / "status"), _read(entry / "cgroup")
        if status is None or cgroup is None:
            continue  # gone meanwhile
        uid = _effective_uid(status)
        if uid != 0:
            found.ignored.append(f"pid {pid} ({comm}) runs as uid {uid}, not root: not the engine")
            continue
        relative = v2_path(cgroup)
        if relative is None:
            found.problems.append(f"pid {pid} ({comm}) is in no cgroup v2")
            continue
        path = os.path.join(mount, relative.lstrip("/")) if relative != "/" else mount
        executable = _executable(proc, pid, trusted)
        if executable is None and path in configured_cgroups:
            continue
        if executable is None:
            found.problems.append(
                f"pid {pid} ({comm}) runs as root in this network namespace a file that is not a trusted engine "
                "executable (if it is your engine, name its file in enforcement.engine_executables or its cgroup "
                "in enforcement.engine_cgroups)")
            continue
        if pid not in _members(path):
            found.problems.append(
                f"pid {pid} ({comm}) is in cgroup {relative} as this process sees it, but {path} does not hold "
                "it: ramfw runs in a cgroup namespace that hides the host's cgroup paths (docs/linuxkit.md)")
            continue
        found.cgroups.setdefault(path, []).append(EngineProcess(int(pid), executable, path))
    return found


def _own_path(mount: str, proc: Path) -> tuple[str, str] | str:
    """(relative, absolute) path of this process's cgroup, checked against the hierarchy: in a
    cgroup namespace /proc shows paths relative to it, and the mounted hierarchy's directory
    of that name does not hold this process."""
    try:
        relative = v2_path((proc / "self" / "cgroup").read_bytes().decode(errors="surrogateescape"))
    except OSError as err:
        return f"cannot read its cgroup: {err}"
    if relative is None:
        return "it is in no cgroup v2"
    path = os.path.join(mount, relative.lstrip("/")) if relative != "/" else mount
    if str(os.getpid()) not in _members(path):
        return (f"its cgroup shows as {relative} but {path} does not hold it: ramfw runs in a cgroup namespace "
                "that hides the host's cgroup paths")
    return relative, path


def cgroup_namespace_problem(mount: str, proc: Path = Path("/proc")) -> str | None:
    found = _own_path(mount, proc)
    return found if isinstance(found, str) else None


def own_cgroup(mount: str, proc: Path = Path("/proc")) -> tuple[int, int] | str:
    """(cgroup id, level) of this process's cgroup if no other process is in it; otherwise why
    it cannot name this process alone."""
    found = _own_path(mount, proc)
    if isinstance(found, str):
        return found
    relative, path = found
    if relative == "/":
        return "ramfw runs in the root cgroup, shared with every process (run it as a service, in a cgroup of its own)"
    if _members(path) != [str(os.getpid())]:
        return f"ramfw's cgroup {relative} holds other processes too"
    if any(child.is_dir() for child in Path(path).iterdir()):
        return f"ramfw's cgroup {relative} has child cgroups (the exemption would cover them)"
    return os.stat(path).st_ino, relative.strip("/").count("/") + 1


def dedicate(mount: str, processes: list[EngineProcess]) -> str:
    """Move engine processes found in the root cgroup into ramfw's dedicated cgroup."""
    dedicated = Path(mount) / DEDICATED
    dedicated.mkdir(exist_ok=True)
    for process in processes:
        try:
            (dedicated / "cgroup.procs").write_text(str(process.pid))
        except OSError:
            pass
    return str(dedicated)


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
    """The sock_create program that marks the engine's sockets, and the cgroups it is attached to.

    Pinned under bpffs, so it stays attached when the daemon exits (fail closed); the cgroups it
    is attached to are listed in ``state_file``. A restarted daemon attaches its new program
    to every one of them before detaching the old one: the engine's new sockets are never
    created unmarked. Whether a cgroup is marked is asked of the kernel (BPF_PROG_QUERY), never
    assumed: a cgroup that systemd removed and made again has lost its programs.
    """

    def __init__(self, mark: int, bpffs: Path = bpf.BPF_FS,
                 state_file: Path = Path("/run/ramfw/engine_mark.cgroup"), use_bcc: bool = False):
        self.mark, self.bpffs, self.use_bcc = mark, Path(bpffs), use_bcc
        self.pin_dir = self.bpffs / "ramfw"
        self.pin_path = self.pin_dir / "engine_mark"
        self.state_file = state_file
        self.fd: int | None = None
        self.program_id = 0

    def cgroups(self) -> list[str]:
        """The cgroups the pinned program was attached to (some may be gone since)."""
        try:
            text = self.state_file.read_text()
        except OSError:
            return []
        if not text.startswith("["):
            return [text] if text.startswith("/") else []  # a single path: older versions
        try:
            return [c for c in json.loads(text) if isinstance(c, str)]
        except ValueError:
            return []  # torn: the daemon marks what it finds again

    def _save(self, cgroups: list[str]) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        partial = self.state_file.with_name(self.state_file.name + ".new")
        partial.write_text(json.dumps(sorted(set(cgroups))))
        partial.replace(self.state_file)

    def load(self) -> None:
        """Load a new program and put it in the pinned one's place, on every cgroup that one
        marks."""
        bpf.ensure_bpffs(self.bpffs)
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        fd = load_mark_with_bcc(self.mark) if self.use_bcc else bpf.load_program(
            mark_program(self.mark), bpf.BPF_PROG_TYPE_CGROUP_SOCK, bpf.BPF_CGROUP_INET_SOCK_CREATE, b"ramfw_mark")
        previous = self.cgroups()
        kept = []
        for cgroup in previous:
            try:
                bpf.attach(cgroup, fd)
                kept.append(cgroup)
            except OSError:
                pass  # gone: its attachments went with it
        old = self._take_pin()
        bpf.pin(fd, self.pin_path)
        _detach(old, previous)
        self._save(kept)
        self.close()
        self.fd, self.program_id = fd, bpf.program_id(fd)

    def attached(self, cgroup: str) -> bool:
        """The kernel says this program is attached to the cgroup."""
        try:
            return self.program_id in bpf.attached_ids(cgroup)
        except OSError:
            return False

    def attach(self, cgroup: str) -> bool:
        """Attach to ``cgroup`` unless the kernel says it already is; True if attached now.
        OSError when the kernel refuses."""
        if self.fd is None:
            raise OSError(9, "the engine-mark program is not loaded")
        if self.attached(cgroup):
            return False
        bpf.attach(cgroup, self.fd)
        self._save(self.cgroups() + [cgroup])
        return True

    def _take_pin(self) -> int | None:
        try:
            fd = bpf.pinned(self.pin_path)
        except OSError:
            return None
        self.pin_path.unlink()
        return fd

    def remove(self) -> None:
        """Detach from every cgroup and unpin; safe to repeat."""
        _detach(self._take_pin(), self.cgroups())
        self.state_file.unlink(missing_ok=True)
        if self.pin_dir.exists() and not any(self.pin_dir.iterdir()):
            self.pin_dir.rmdir()
        self.close()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _detach(fd: int | None, cgroups: list[str]) -> None:
    """Detach a program taken from its pin from the cgroups it marks, and close it; a cgroup
    already gone took its attachment with it."""
    if fd is None:
        return
    for cgroup in cgroups:
        try:
            bpf.detach(cgroup, fd)
        except OSError:
            pass
    os.close(fd)


class CgroupWatch:
    """inotify on the directories that hold the engine's cgroups: systemd making a service's
    cgroup again (an engine restart) wakes the daemon at once, before the engine runs in it. A
    watch the kernel drops (its directory removed: IN_IGNORED) is forgotten, so the directory
    is watched again when it is back."""

    IN_CREATE, IN_DELETE, IN_IGNORED, IN_NONBLOCK, IN_CLOEXEC = 0x100, 0x200, 0x8000, 0o4000, 0o2000000
    _EVENT = struct.Struct("=iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)

    def __init__(self):
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(self.IN_NONBLOCK | self.IN_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        self.watched: dict[str, int] = {}  # directory -> watch descriptor

    def watch(self, directory: str) -> None:
        if directory in self.watched:
            return
        wd = self._libc.inotify_add_watch(self.fd, directory.encode(), self.IN_CREATE | self.IN_DELETE)
        if wd >= 0:
            self.watched[directory] = wd

    def drain(self) -> bool:
        """Read the waiting events; True if there were any."""
        seen = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen = True
            offset = 0
            while offset + self._EVENT.size <= len(data):
                wd, mask, _, length = self._EVENT.unpack_from(data, offset)
                offset += self._EVENT.size + length
                if mask & self.IN_IGNORED:
                    self.watched = {d: w for d, w in self.watched.items() if w != wd}

    def close(self) -> None:
        os.close(self.fd)
