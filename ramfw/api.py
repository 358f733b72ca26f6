"""The library API the CLI (and anyone else) calls: up, down, status, reload, doctor, lint, check.

This module wires the pure core (policy, ruleset rendering) to the kernel objects; it keeps
no state of its own beyond a small JSON record of what ``up`` applied, in the run directory,
which ``status`` reads back beside the kernel's own state.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import replace
from pathlib import Path

from . import __version__
from . import policy as policy_mod
from . import record as record_mod
from .config import Config
from .check import credentials, probe, reference, verdict
from .daemon import control
from .daemon import seen as seen_mod
from .errors import DaemonError, InvalidReference, NftablesError, PolicyError, require_root
from .daemon.engine import EngineScope
from .kernel import bpf, ctmarks, engine, links, probes, ruleset
from .kernel.table import Table
from .policy import Policy
from .policy import source as policy_source
from .snoop import resolvers


def up(config: Config, policy_path: str | None = None, report: probes.Report | None = None) -> dict:
    """Validate everything, then apply the ruleset in one transaction; return the record."""
    require_root("ramfw up")
    if control.daemon_present(config):  # it owns the table's DNS chains: up would take them away
        raise DaemonError("the ramfw daemon is running: it applied the ruleset and keeps it; use `ramfw reload` "
                          "to make it read the policy again, or `ramfw down` to remove everything")
    source_url = policy_source.url_source(config) if policy_path is None else None
    if source_url is not None:
        source_url.refresh()
    policy, source = policy_source.load(config, policy_path, fallback=True)
    report = report or probes.run(Path(config.daemon.run_dir) / probes.CACHE)
    report.check_required()
    table = Table(config.enforcement.table, owned=report.owns_table(config.enforcement.table_owner))
    trusted = resolvers.trusted(config.dns.trusted_resolvers)
    scope = EngineScope(config, report)  # marks the engine as it runs now: no daemon follows it
    scope.start()
    scope.close()
    if policy.enabled:
        table.apply(ruleset.build_ruleset(replace(config.enforcement, scope=scope.scope_in_force), trusted,
                                          config.dns.max_addresses), dns_rules={})
        table.set_container_bridges(links.container_bridges(links.dump()))  # as they are now: no daemon follows
    else:
        table.remove()
    notes = [f"engine scope cannot be trusted ({scope.widened}): host scope is in force on the registry ports"] \
        if scope.widened else []
    record = record_mod.build(config, policy, source, trusted, report.to_dict(), scope_in_force=list(scope.scope_in_force))
    record["notes"] += notes
    record_mod.write(config, record)
    return record


def down(config: Config) -> None:
    """Remove everything ramfw added; safe to repeat, after a crash too."""
    require_root("ramfw down")
    try:  # a running daemon would otherwise keep programming a table that is gone
        control.request(config, "stop", timeout=5)
        deadline = time.monotonic() + 5
        while control.answers(config) and time.monotonic() < deadline:
            time.sleep(0.02)
    except DaemonError:
        pass
    table = Table(config.enforcement.table)
    deadline = time.monotonic() + 5
    while True:  # a daemon that stopped answering may still be closing its owner socket
        try:
            table.remove()
            break
        except NftablesError:
            if time.monotonic() > deadline or table.kernel_view().owner is None:
                raise
            time.sleep(0.05)
    table.close()
    engine.EngineMark(config.enforcement.mark, Path(config.enforcement.bpffs),
                      Path(config.daemon.run_dir) / "engine_mark.cgroup").remove()
    try:
        os.unlink(config.daemon.state_file)
    except FileNotFoundError:
        pass


STATUS_SCHEMA = 1  # the contract of status --json: docs/status.md; raised when a key goes or changes


def status(config: Config) -> dict:
    """The daemon's status; when it is down, the kernel's state and the record ``up`` left
    (docs/status.md: every key)."""
    try:
        answer = control.request(config, "status")
    except DaemonError:
        answer = None
    if answer and answer.get("ok"):
        result = {"schema": STATUS_SCHEMA, **answer["status"]}
        if not result["policy"]["enabled"]:
            result["message"] = (f"registry access is not restricted: organization "
                                 f"{result['policy']['organization']} has registryAccess.enabled false")
        elif result["enforcing"] and result["engine"].get("widened"):
            result["degraded"] = True
            widened = "host" in result["scope_in_force"]
            result["message"] = (f"ramfw is enforcing in {result['mode']} mode, but NOT as configured: engine scope "
                                 f"cannot be trusted ({result['engine']['widened']}), " +
                                 ("so host scope is in force on the registry ports (fail closed)" if widened else
                                  "and putting host scope in force failed: see the errors below"))
        elif result["enforcing"] and str((result.get("tls") or {}).get("state", "")).startswith("NOT"):
            result["degraded"] = True  # the check configured cannot run: the shared-address hole is open
            result["message"] = (f"ramfw is enforcing in {result['mode']} mode, but NOT as configured: TLS server "
                                 f"names {result['tls']['state']}")
        elif result["enforcing"]:
            result["message"] = f"ramfw is enforcing in {result['mode']} mode"
        else:
            result["message"] = "ramfw is not enforcing: its table is missing (run `ramfw down`, then start again)"
        return result
    result = kernel_status(config)
    result["daemon"], result["schema"] = {"running": False}, STATUS_SCHEMA
    result["version"] = __version__  # this command's: no daemon answered with its own
    result["message"] += "; the daemon is not running, so nothing new is learned"
    if config.enforcement.tls_check:
        result.setdefault("notes", []).append("TLS server names are NOT checked: no daemon reads first flights, so "
                                              "flows to learned addresses pass on their address alone (QUIC to the "
                                              "TLS ports is still refused)")
    return result


def reload(config: Config) -> str:
    answer = control.request(config, "reload", timeout=30)
    if not answer.get("ok"):
        raise PolicyError(answer.get("message") or answer.get("error", "reload failed"))
    return answer["message"]


def kernel_status(config: Config) -> dict:
    """What is enforced, read from the kernel and from the record ``up`` left."""
    record = record_mod.read(config)
    table = Table(config.enforcement.table)
    state = table.state() if os.geteuid() == 0 else None
    result: dict = {"enforcing": bool(state and state.exists), "record": record}
    if state and state.exists:
        result["table"] = probes.table_protection(table.kernel_view())
    if record and not record["policy"]["enabled"]:
        result["message"] = (f"registry access is not restricted: organization "
                             f"{record['policy']['organization']} has registryAccess.enabled false")
    elif state is None:
        result["message"] = "run as root to read the kernel's state"
    elif not state.exists:
        result["message"] = "ramfw is not enforcing: no ramfw table in this network namespace"
    else:
        unmarked = _unmarked_engine(config)
        result["message"] = f"ramfw is enforcing in {state.mode} mode"
        if unmarked:
            result["degraded"] = True
            result["message"] += (f", but NOT as configured: {unmarked}; no daemon runs to mark it "
                                  "(start `ramfw daemon`)")
        result["mode"] = state.mode
        result["counters"] = {k: v["packets"] for k, v in (state.counters or {}).items()}
        learned: dict[str, list] = {}
        for item in state.learned:
            learned.setdefault(item.name or "(unnamed)", []).append(
                {"address": item.address, "expires_in": item.expires})
        result["learned"] = learned
        result["trusted_resolvers"] = list(state.resolvers)
    if record:
        result.update(policy=record["policy"], scope=record["scope"], capabilities=record["capabilities"],
                      notes=record["notes"], dns_hold="none (no daemon)")
    return result


def _unmarked_engine(config: Config) -> str:
    """Without a daemon, what ``up`` (or a daemon before) marked may be gone: an engine
    restarted in a new cgroup. What the kernel says, or "" when engine scope holds."""
    record = record_mod.read(config) or {}
    if "engine" not in config.enforcement.scope or "host" in record.get("scope_in_force", []):
        return ""
    mount = bpf.cgroup2_mount()
    mark = engine.EngineMark(config.enforcement.mark, Path(config.enforcement.bpffs),
                             Path(config.daemon.run_dir) / "engine_mark.cgroup")
    try:
        fd = bpf.pinned(mark.pin_path)
    except OSError:
        return "the engine-scope program is not loaded"
    try:
        mark.program_id = bpf.program_id(fd)
    finally:
        os.close(fd)
    if mount is None:
        return "no cgroup v2 hierarchy is mounted here to check the engine's marks"
    configured = [engine.under(mount, path) for path in config.enforcement.configured_cgroups]
    found = engine.discover(mount, config.enforcement.engine_processes, config.enforcement.engine_executables,
                            configured_cgroups=frozenset(configured))
    missing = [path for path in sorted(set(found.cgroups) | set(configured)) if not mark.attached(path)]
    return "; ".join(found.problems + [f"engine cgroup {path} is not marked" for path in missing])


def doctor(config: Config) -> probes.Report:
    """Probe again (and refresh the answers the daemon and ``up`` use)."""
    require_root("ramfw doctor")
    return probes.run(Path(config.daemon.run_dir) / probes.CACHE, fresh=True)


def mark_writers(config: Config) -> list[ctmarks.MarkWriter]:
    """For ``doctor``: the rules of other tables here that may change the TLS check's conntrack
    mark bits (``kernel.ctmarks``)."""
    require_root("ramfw doctor")
    return ctmarks.find(config.enforcement)


def placed(config: Config) -> str | None:
    """Where the policy the daemon would enforce comes from, or None when none is placed (no
    file at the configured source, no cached copy): a daemon started then would enforce the
    restrictive default (Docker Hub only). The packaged unit starts only once this is not None,
    so installing the package changes nothing until an admin places a policy."""
    source, cache = config.policy.source, Path(config.policy.cache)
    if policy_source.is_url(source):
        return source
    if Path(source).exists():
        return source
    if cache.exists():
        return f"{cache} (the last policy accepted; {source} is missing)"
    return None


def report(config: Config, policy_path: str | None = None) -> dict:
    """What the daemon saw (saved every few seconds and when it stops): refusals per host, and
    lookups per entry of the policy in force (or ``policy_path``'s)."""
    path = seen_mod.seen_path(config)
    seen = seen_mod.Seen.load(path)
    policy = _policy_for_tools(config, policy_path)
    saved = os.path.getmtime(path) if os.path.exists(path) else None
    return {"file": path, "saved_at": saved, "refused": seen.refused, "looked_up": seen.looked_up,
            "usage": seen_mod.usage(seen.looked_up, policy), "organization": policy.organization}


def suggest(config: Config, policy_path: str | None = None) -> tuple[dict, list[str], list[str]]:
    """A policy that would allow what was refused: ``policy.suggest.suggest``."""
    from .policy.suggest import suggest as make
    return make(_policy_for_tools(config, policy_path), seen_mod.Seen.load(seen_mod.seen_path(config)).refused)


def _policy_for_tools(config: Config, policy_path: str | None) -> Policy:
    if policy_path is not None:
        return policy_mod.from_file(policy_path, config.policy.max_registries)
    return _in_force(config)[0]


def lint(path: str, config: Config) -> tuple[Policy, list[str]]:
    policy = policy_mod.from_file(path, config.policy.max_registries)
    return policy, policy_mod.lint(policy)


def check(config: Config, images: list[str], certs_dir: str = probe.CERTS_DIR) -> dict:
    """Probe each image's pull, then judge every host against the policy in force and the
    kernel's allowed sets, read after the probe's lookups (``check.verdict``). The daemon probes
    when one answers: its connections are its own, exempt from host scope by its cgroup; else
    this process does, filtered like any other in host scope."""
    require_root("ramfw check")
    if not images or len(images) > probe.MAX_IMAGES:
        raise InvalidReference(f"name 1 to {probe.MAX_IMAGES} images")
    logins = {}
    for image in images:
        login = credentials.read(reference.parse(image))  # every reference is checked before anything is sent
        logins[image] = {"basic": login.basic, "how": login.how}
    policy, nameservers, notes, daemon = _in_force(config)
    results = None
    if daemon:
        answer = control.request(config, "check", timeout=probe.BUDGET * len(images) + 15, arguments={
            "images": images, "logins": logins, "nameservers": nameservers, "certs_dir": certs_dir})
        if answer.get("ok"):
            results = answer["results"]
        else:
            notes.append(f"the daemon did not probe ({answer.get('error')}): this process did")
    if results is None:
        results = probe.probe_all(images, logins, nameservers, certs_dir)
    state = Table(config.enforcement.table).state()
    kernel = verdict.Kernel(state.exists, state.mode,
                            {str(ipaddress.ip_address(item.address)): item.name for item in state.learned})
    reports = [verdict.judge(result, policy, kernel) for result in results]
    add, todo = verdict.summary(reports)
    return {"images": reports, "add": add, "todo": todo, "exit": verdict.exit_code(reports), "notes": notes,
            "policy": policy.summary(), "kernel": {"enforcing": kernel.enforcing, "mode": kernel.mode,
                                                   "learned_addresses": len(kernel.learned)}}


def _in_force(config: Config) -> tuple[Policy, list[str], list[str], bool]:
    """(the policy in force, the resolvers the kernel learns from, notes, whether a daemon runs):
    the daemon's, else the record ``up`` left, else what a daemon would load."""
    try:
        answer = control.request(config, "status")
    except DaemonError:
        answer = {}
    if answer.get("ok"):
        found = answer["status"]
        notes = [f"probed by the ramfw daemon (pid {found['daemon']['pid']}), against its policy "
                 f"({found['policy']['organization']}, {found['policy']['entries']} entries from "
                 f"{found['policy'].get('source')})"]
        if "host" in found.get("scope_in_force", []):
            notes += [n for n in found.get("notes", []) if n.startswith("ramfw's own connections")]
        return policy_mod.from_summary(found["policy"]), list(found["trusted_resolvers"]), notes, True
    notes = ["no daemon answers: this process probes, and nothing new is learned, so the kernel allows only "
             "what it learned before"]
    record = record_mod.read(config)
    if record:
        if "host" in record.get("scope_in_force", []):
            notes.append("host scope is in force: this process's connections are filtered like any other's")
        return policy_mod.from_summary(record["policy"]), list(record["trusted_resolvers"]), notes, False
    policy, source = policy_source.load(config, None, fallback=True)
    notes.append(f"ramfw is not in force here: judged against the policy a daemon would load ({source})")
    return policy, resolvers.trusted(config.dns.trusted_resolvers), notes, False


__all__ = ["up", "down", "status", "reload", "doctor", "mark_writers", "placed", "report", "suggest", "lint", "check"]
