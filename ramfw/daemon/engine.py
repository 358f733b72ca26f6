"""Engine scope in the daemon: find every cgroup the engine runs in, mark each, ask the kernel
whether it is marked, and say why not when it cannot be (``kernel.engine`` owns the program,
its attachments and the discovery).

Fail closed: whenever engine scope cannot be trusted (no cgroup eBPF, no cgroup v2, an engine
in the root cgroup or behind a cgroup namespace, a cgroup the kernel does not list the program
on), ``widened`` says why, and the daemon puts host scope on the registry ports in force until
the engine is marked again. No engine running at all is not a gap: nothing pulls then, and a
new one is marked within a second (at once when systemd makes its cgroup again).
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from ..config import Config
from ..kernel import bpf, engine, nft
from ..kernel.probes import Report
from . import logs

log = logging.getLogger("ramfw")


class EngineScope:
    def __init__(self, config: Config, report: Report):
        self.config, self.report = config, report
        self.loader = "bcc" if report.has("bcc") else "hand-assembled (no compiler needed)"
        self.mark: engine.EngineMark | None = None
        self.watch: engine.CgroupWatch | None = None
        self.mount: str | None = None
        self.private_mount: Path | None = None
        self.widened = ""  # why engine scope cannot be trusted now; empty when it can
        self._refused: tuple[str, str] = ("", "")  # the own-traffic rules the kernel refused, not retried
        self._written: tuple[list[bytes], str] | None = None  # the own-traffic rules last swapped in
        self.state: dict = {"attached": False, "loader": self.loader}

    @property
    def wanted(self) -> bool:
        return "engine" in self.config.enforcement.scope

    def start(self) -> None:
        """Load the marking program (it takes the place of the pinned one, on every cgroup
        that one marks), then find and mark the engine."""
        if not self.wanted:
            return
        try:
            self._start()
        except Exception as err:  # noqa: BLE001 - the ruleset must still be applied, fail closed
            self._cannot(f"starting engine scope failed: {err!r}")

    def _start(self) -> None:
        if not self.report.has("cgroup_bpf"):
            return self._cannot("cgroup eBPF is missing on this kernel")
        self.mount = bpf.cgroup2_mount() or self._mount_private()
        if self.mount is None:
            return self._cannot("no cgroup v2 hierarchy is mounted and ramfw could not mount one")
        e = self.config.enforcement
        self.mark = engine.EngineMark(e.mark, Path(e.bpffs), Path(self.config.daemon.run_dir) / "engine_mark.cgroup",
                                      use_bcc=self.report.has("bcc"))
        try:
            self.watch = engine.CgroupWatch()
        except OSError:
            self.watch = None  # without inotify, a re-made cgroup is marked at the next check
        self.check()

    def _mount_private(self) -> str | None:
        """Where no cgroup v2 is visible (a namespace that remounted /sys), mount one of our own."""
        where = Path(self.config.daemon.run_dir) / "cgroup2"
        try:
            bpf.mount_cgroup2(where)
        except OSError as err:
            log.warning("no cgroup v2 hierarchy is mounted, and mounting one at %s failed: %s", where, err)
            return None
        self.private_mount = where
        return str(where)

    def _cannot(self, why: str) -> None:
        self.widened = why
        self.state = {"attached": False, "loader": self.loader, "cgroups": [], "widened": why}

    def configured(self) -> list[str]:
        """The configured engine cgroups, as absolute directories."""
        return [engine.under(self.mount, path) for path in self.config.enforcement.configured_cgroups]

    def _targets(self, found: engine.Discovery, problems: list[str]) -> dict[str, tuple[str, bool]]:
        """cgroup -> (why it is marked, whether engine scope depends on it)."""
        e, mount = self.config.enforcement, self.mount
        targets: dict[str, tuple[str, bool]] = {path: ("configured", True) for path in self.configured()}
        cgroups = dict(found.cgroups)
        in_root = cgroups.pop(mount, None)
        if in_root and e.dedicated_cgroup:
            cgroups[engine.dedicate(mount, in_root)] = in_root
        elif in_root:
            problems.append("the engine runs in the root cgroup, shared with every process: marking it would put "
                            "the whole VM in engine scope; set enforcement.dedicated_cgroup = true to move it into "
                            "a cgroup of its own")
        for path, members in cgroups.items():
            targets[path] = (", ".join(f"{os.path.basename(p.executable)} pid {p.pid}" for p in members), True)
        for path in self.mark.cgroups():  # a cgroup marked before and made again (an engine restart)
            if path not in targets and os.path.isdir(path):
                targets[path] = ("held the engine before: kept marked for its restart", False)
        return targets

    def check(self) -> bool:
        """Find the engine, mark every cgroup it is in, and ask the kernel which are marked.
        True if ``widened`` changed. Whatever fails on the way fails closed."""
        if self.mark is None:
            return False
        before = self.widened
        try:
            self._check()
        except Exception as err:  # noqa: BLE001 - engine scope that cannot be checked is not trusted
            self._cannot(f"checking engine scope failed: {err!r}")
        return self.widened != before

    def _check(self) -> None:
        e = self.config.enforcement
        found = engine.discover(self.mount, e.engine_processes, e.engine_executables,
                                configured_cgroups=frozenset(self.configured()))
        problems = list(found.problems)
        rows = []
        targets = self._targets(found, problems)
        if targets and self.mark.fd is None:  # loaded when first needed: nothing is pinned for no engine
            try:
                self.mark.load()
            except OSError as err:
                targets = {}
                problems.append(f"cannot load the engine-scope program: {err}")
        for path, (why, needed) in targets.items():
            refused = ""
            try:
                if self.mark.attach(path):
                    log.info("engine scope: marking the sockets of cgroup %s (%s; %s)", path, why, self.loader)
            except OSError as err:
                refused = f"cannot mark cgroup {path}: {err.strerror or err}"
            marked = self.mark.attached(path)
            if needed and not marked:
                problems.append(refused or f"cgroup {path} is not marked: the kernel does not list ramfw's program")
            rows.append({"path": path, "marked": marked, "why": why})
            if self.watch is not None:
                self.watch.watch(os.path.dirname(path))
        self.widened = "; ".join(problems)
        self.state = {
            "attached": not problems and any(r["marked"] for r in rows), "loader": self.loader,
            "cgroups": rows, "widened": self.widened, "ignored": found.ignored,
            "note": "" if found.processes or e.configured_cgroups else
            f"no engine process ({', '.join(e.engine_processes)}) runs in this network namespace yet; "
            "looking every second",
        }

    @property
    def scope_in_force(self) -> tuple[str, ...]:
        """The configured scope, widened to host scope (on the registry ports) while engine
        scope cannot be trusted."""
        scope = self.config.enforcement.scope
        return scope + ("host",) if self.widened and "host" not in scope else scope

    def say_scope(self) -> None:
        if self.widened:
            log.warning("engine scope cannot be trusted (%s): host scope is in force on the registry ports "
                        "until it can (fail closed)", self.widened, extra=logs.event("scope_widened", why=self.widened))
        elif self.wanted:
            log.info("engine scope is in force on: %s", ", ".join(r["path"] for r in self.state.get("cgroups", []))
                     or "(no engine running yet)")

    def own_traffic(self) -> tuple[list[bytes], str]:
        """Host scope covers every local process: ramfw's own connections (policy polls, `ramfw
        check`'s probes) pass by its cgroup while no other process is in it. The rules (none: no
        exemption) and what they do."""
        if "host" not in self.scope_in_force:
            return [], "not in host scope"
        where = self.mount or bpf.cgroup2_mount()
        try:
            own = engine.own_cgroup(where) if where else "no cgroup v2 hierarchy is mounted"
        except OSError as err:  # its cgroup went away meanwhile: no exemption (fail closed)
            own = f"its cgroup cannot be read: {err}"
        if isinstance(own, str):
            return [], f"not exempt from host scope: {own}"
        return nft.own_traffic_rules(*own), "exempt from host scope by its cgroup"

    def exempt_own_traffic(self, table, current: str, url_source, force: bool = False) -> str:
        """Swap the own-traffic rules if they are not what was last swapped in (checked every
        second: a process that joins ramfw's cgroup ends the exemption), or ``force`` (the table
        was just applied); what is in force."""
        rules, what = self.own_traffic()
        if not force and ((rules, what) == self._written or (what, current) == self._refused):
            return current
        self._written = (rules, what)
        try:
            table.set_own_traffic(rules)
        except OSError as err:
            with contextlib.suppress(OSError):
                table.set_own_traffic([])
            refused = f"not exempt from host scope: the kernel refused the socket cgroupv2 match ({err})"
            self._refused, what = (what, refused), refused
        if what.startswith("not exempt") and url_source is not None:
            log.warning("ramfw's own connections are %s; its policy source %s must be allowlisted or its polls "
                        "are blocked", what, url_source.url)
        return what

    def close(self) -> None:
        if self.watch is not None:
            self.watch.close()
        if self.mark is not None:
            self.mark.close()
        if self.private_mount is not None:
            bpf.unmount(self.private_mount)
