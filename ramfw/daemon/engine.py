"""Engine scope in the daemon: find the engine's cgroup, attach the marking program, and say
what is marked (``kernel.engine`` owns the program and its attachment)."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import Config
from ..kernel import bpf, engine
from ..kernel.probes import Report

log = logging.getLogger("ramfw")


class EngineScope:
    def __init__(self, config: Config, report: Report):
        self.config, self.report = config, report
        self.state: dict = {}

    @property
    def wanted(self) -> bool:
        return "engine" in self.config.enforcement.scope

    @property
    def attached(self) -> bool:
        return bool(self.state.get("attached"))

    def mark(self, cgroup: str) -> engine.EngineMark:
        e = self.config.enforcement
        return engine.EngineMark(cgroup, e.mark, Path(e.bpffs), Path(self.config.daemon.run_dir) / "engine_mark.cgroup",
                                 use_bcc=self.report.has("bcc"))

    def attach(self) -> str | None:
        """Mark the engine's sockets if not done yet; return an error worth reporting, if any."""
        e = self.config.enforcement
        if not self.wanted or self.attached:
            return None
        loader = "bcc" if self.report.has("bcc") else "hand-assembled (no compiler needed)"
        if not self.report.has("cgroup_bpf"):
            self.state = {"attached": False, "loader": loader,
                          "note": "engine scope is unavailable on this kernel: cgroup eBPF is missing; use scope host"}
            return None
        found = engine.locate(bpf.cgroup2_mount(), e.engine_cgroup, e.engine_processes, e.dedicated_cgroup)
        if found is None:
            self.state = {"attached": False, "loader": loader,
                          "note": f"no engine process ({', '.join(e.engine_processes)}) found yet; "
                                  "looking again every few seconds"}
            return None
        if found.note and found.path == bpf.cgroup2_mount():
            self.state = {"attached": False, "loader": loader, "cgroup": found.path, "note": found.note}
            return None
        try:
            self.mark(found.path).apply()
        except OSError as err:
            self.state = {"attached": False, "loader": loader, "cgroup": found.path,
                          "note": f"cannot attach the engine-scope program: {err}"}
            return self.state["note"]
        self.state = {"attached": True, "loader": loader, "cgroup": found.path, "note": found.note}
        log.info("engine scope: marking sockets of cgroup %s (%s)", found.path, loader)
        return None
