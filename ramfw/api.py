"""The library API the CLI (and anyone else) calls: up, down, status, reload, doctor, lint.

This module wires the pure core (policy, ruleset rendering) to the kernel objects; it keeps
no state of its own beyond a small JSON record of what ``up`` applied, in the run directory,
which ``status`` reads back beside the kernel's own state.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Iterable

from . import policy as policy_mod
from . import policysource, probes, resolvers, ruleset
from .config import Config
from .errors import KernelError, PolicyError, RamfwError
from .policy import Policy

REQUIRED = ("nf_tables", "element_timeout")


class NotRoot(RamfwError):
    exit_code = 6


def require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise NotRoot(f"{what} needs root (CAP_NET_ADMIN)")


def load_policy(config: Config, path: str | None = None, fallback: bool = False) -> tuple[Policy, str]:
    """The policy to enforce and where it came from.

    An explicit path must load. The configured source (a file, or a URL whose poller keeps
    the cache current) is cached whenever it loads; when it is missing — or, with
    ``fallback`` (starting up), invalid — the last good cached copy is enforced, then the
    restrictive default (Docker Hub only): never open because a policy is missing or bad.
    A reload passes no ``fallback``, so a bad file is refused and the policy in force stays.
    """
    limit = config.policy.max_registries
    if path is not None:
        return policy_mod.from_file(path, limit), path
    source, cache = config.policy.source, Path(config.policy.cache)
    problem = f"{source} has not been read"
    if not policysource.is_url(source) and Path(source).exists():
        try:
            policy = policy_mod.from_file(source, limit)
        except PolicyError as err:
            if not fallback:
                raise
            problem = f"{source} is invalid: {err}"
        else:
            _cache(Path(source), cache)
            return policy, source
    if cache.exists():
        return policy_mod.from_file(cache, limit), f"{cache}, the last good copy ({problem})"
    return policy_mod.default(), f"built-in default, Docker Hub only ({problem})"


def _cache(source: Path, cache: Path) -> None:
    try:
        text = source.read_text(encoding="utf-8")
        if not cache.exists() or cache.read_text(encoding="utf-8") != text:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(cache)
    except OSError:
        pass  # a cache that cannot be written costs only the fallback


def url_source(config: Config) -> "policysource.UrlSource | None":
    if not policysource.is_url(config.policy.source):
        return None
    p = config.policy
    return policysource.UrlSource(p.source, p.cache, p.ca_file, p.max_registries)


def check_capabilities(report: probes.Report) -> None:
    for name in REQUIRED:
        if not report.has(name):
            cap = next((c for c in report.capabilities if c.name == name), None)
            detail = cap.detail if cap else "not probed"
            raise KernelError(f"cannot enforce on this kernel: {name}: {detail}")


def render(config: Config, trusted: Iterable[str]) -> dict:
    return ruleset.build_ruleset(config.enforcement, trusted, config.dns.max_addresses)


def up(config: Config, policy_path: str | None = None, report: probes.Report | None = None) -> dict:
    """Validate everything, then apply the ruleset in one transaction; return the record."""
    require_root("ramfw up")
    source_url = url_source(config) if policy_path is None else None
    if source_url is not None:
        source_url.refresh()
    policy, source = load_policy(config, policy_path, fallback=True)
    report = report or probes.run()
    check_capabilities(report)
    table = ruleset.Table(config.enforcement.table)
    trusted = resolvers.trusted(config.dns.trusted_resolvers)
    if policy.enabled:
        table.apply(render(config, trusted))
    else:
        table.remove()
    record = {
        "applied_at": time.time(),
        "config": config.path,
        "policy_source": source,
        "policy": policy.summary(),
        "notes": list(policy.notes),
        "mode": config.enforcement.mode,
        "scope": list(config.enforcement.scope),
        "table": config.enforcement.table,
        "trusted_resolvers": trusted,
        "capabilities": report.to_dict(),
    }
    write_record(config, record)
    return record


def write_record(config: Config, record: dict) -> None:
    run_dir = Path(config.daemon.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(config.daemon.state_file)


def read_record(config: Config) -> dict | None:
    try:
        return json.loads(Path(config.daemon.state_file).read_text())
    except (OSError, ValueError):
        return None


def down(config: Config) -> None:
    """Remove everything ramfw added; safe to repeat, after a crash too."""
    require_root("ramfw down")
    from . import daemon
    from .errors import DaemonError

    try:  # a running daemon would otherwise keep programming a table that is gone
        daemon.request(config, "stop", timeout=5)
        deadline = time.monotonic() + 5
        while daemon.answers(config) and time.monotonic() < deadline:
            time.sleep(0.02)
    except DaemonError:
        pass
    ruleset.Table(config.enforcement.table).remove()
    from . import bpf

    bpf.EngineMark("", config.enforcement.mark, Path(config.enforcement.bpffs),
                   Path(config.daemon.run_dir) / "engine_mark.cgroup").remove()
    try:
        os.unlink(config.daemon.state_file)
    except FileNotFoundError:
        pass


def status(config: Config) -> dict:
    """The daemon's status; when it is down, the kernel's state and the record ``up`` left."""
    from . import daemon
    from .errors import DaemonError

    try:
        answer = daemon.request(config, "status")
    except DaemonError:
        answer = None
    if answer and answer.get("ok"):
        result = answer["status"]
        if not result["policy"]["enabled"]:
            result["message"] = (f"registry access is not restricted: organization "
                                 f"{result['policy']['organization']} has registryAccess.enabled false")
        elif result["enforcing"]:
            result["message"] = f"ramfw is enforcing in {result['mode']} mode"
        else:
            result["message"] = "ramfw is not enforcing: its table is missing (run `ramfw down`, then start again)"
        return result
    result = kernel_status(config)
    result["daemon"] = {"running": False}
    result["message"] += "; the daemon is not running, so nothing new is learned"
    return result


def reload(config: Config) -> str:
    from . import daemon

    answer = daemon.request(config, "reload", timeout=30)
    if not answer.get("ok"):
        raise PolicyError(answer.get("message") or answer.get("error", "reload failed"))
    return answer["message"]


def kernel_status(config: Config) -> dict:
    """What is enforced, read from the kernel and from the record ``up`` left."""
    record = read_record(config)
    state = ruleset.Table(config.enforcement.table).state() if os.geteuid() == 0 else None
    result: dict = {"enforcing": bool(state and state.exists), "record": record}
    if record and not record["policy"]["enabled"]:
        result["message"] = (f"registry access is not restricted: organization "
                             f"{record['policy']['organization']} has registryAccess.enabled false")
    elif state is None:
        result["message"] = "run as root to read the kernel's state"
    elif not state.exists:
        result["message"] = "ramfw is not enforcing: no ramfw table in this network namespace"
    else:
        result["message"] = f"ramfw is enforcing in {state.mode} mode"
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


def doctor() -> probes.Report:
    require_root("ramfw doctor")
    return probes.run()


def lint(path: str, config: Config) -> tuple[Policy, list[str]]:
    policy = policy_mod.from_file(path, config.policy.max_registries)
    return policy, policy_mod.lint(policy)


__all__ = ["up", "down", "status", "reload", "doctor", "lint", "load_policy"]
