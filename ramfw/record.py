"""The record of what was applied (``state.json`` in the run directory): written by ``ramfw up``
and by the daemon, read back by ``ramfw status`` beside the kernel's own state when no daemon
answers."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .config import Config
from .policy import Policy


def proxy_notes(config: Config) -> list[str]:
    """What an explicit proxy changes: ramfw sees the proxy, not the registries behind it."""
    if config.enforcement.tls_check:
        return [f"the engine's proxy {proxy} is reachable in scope: while a daemon runs, the host of each CONNECT "
                "request to it (and the server name of the TLS tunnelled through it) must be allowed, and any other "
                "request is refused; without one, filtering behind it depends on the proxy"
                for proxy in config.enforcement.proxies]
    return [f"the engine's proxy {proxy} is reachable in scope: registry filtering behind it depends on the "
            "proxy, which must enforce the allowlist itself (ramfw sees the proxy's address, not the registries "
            "the engine asks it for)" for proxy in config.enforcement.proxies]


def build(config: Config, policy: Policy, source: str, trusted: list[str], capabilities: dict, **extra) -> dict:
    return {"applied_at": time.time(), "config": config.path, "policy_source": source,
            "policy": policy.summary(), "notes": list(policy.notes) + proxy_notes(config),
            "mode": config.enforcement.mode, "scope": list(config.enforcement.scope),
            "table": config.enforcement.table, "trusted_resolvers": trusted,
            "capabilities": capabilities, **extra}


def write(config: Config, record: dict) -> None:
    run_dir = Path(config.daemon.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "state.json.tmp"
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(config.daemon.state_file)


def read(config: Config) -> dict | None:
    try:
        return json.loads(Path(config.daemon.state_file).read_text())
    except (OSError, ValueError):
        return None
