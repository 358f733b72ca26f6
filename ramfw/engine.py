"""Finding the container engine's cgroup: where the engine-scope eBPF program is attached.

The engine is dockerd, containerd, buildkitd and whatever else the configuration names. Under
systemd they live in their service's cgroup; elsewhere in whatever cgroup they were started
in. If that is the root cgroup, shared with every other process, marking it would put the
whole VM in scope: ramfw says so instead, and can move the engine into a dedicated cgroup.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEDICATED = "ramfw-engine"


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
