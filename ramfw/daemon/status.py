"""The daemon's status document (``ramfw status --json`` when the daemon answers)."""

from __future__ import annotations

import os
import time

from .. import __version__, record
from ..kernel import probes
from ..kernel.ruleset import Hold
from ..snoop import resolvers
from . import poller

PASSIVE_NOTE = ("DNS replies are copied, not held: the first connection to a new address can be lost; "
                "mitigation: a first SYN to an unknown address is dropped, not reset, so its retransmission "
                "(1 s later) passes once the reply has been read")


def answer(daemon, uid: int) -> dict:
    """Root gets what the kernel says now (the engine checked again); any other user, whom
    nothing limits to asking once, shares a document a second old at most, without the
    learned list (kept on the daemon as ``public_status``: when, document)."""
    if uid == 0:
        daemon._guarded(daemon._check_engine)
        if daemon.snoop is not None:  # the copies waiting (read with held replies, or each second): counted now
            daemon._guarded(lambda: daemon._on_snoop(burst=1 << 20))
        return document(daemon)
    when, shown = getattr(daemon, "public_status", (-1.0, {}))
    if time.monotonic() - when >= 1:
        daemon.public_status = when, shown = time.monotonic(), document(daemon, full=False)
    return shown


def pairing(daemon) -> str:
    if not daemon.config.dns.pair_queries:
        return "; UDP replies are not paired with queries (dns.pair_queries = false)"
    return "; UDP replies paired with their queries " + ("in the kernel" if daemon.snooper.kernel_pairs else "by the daemon")


def document(daemon, full: bool = True) -> dict:
    """``daemon`` is the running ``loop.Daemon``. Without ``full`` (any local user may ask) the
    learned addresses are left out: listing 100,000 of them costs the loop time."""
    now = time.time()
    snooper = daemon.snooper
    counters = daemon.table.counters()
    learned = {name: sorted(({"address": a, "expires_in": int(expiry - now)}
                             for a, expiry in addresses.items() if expiry > now),
                            key=lambda x: x["address"])
               for name, addresses in sorted(snooper.learned.items())} if full else {}
    notes = list(daemon.policy.notes) + record.proxy_notes(daemon.config)
    if not daemon.trusted:
        notes.append(f"no DNS resolver is trusted ({resolvers.RESOLV_CONF} names none, and dns.trusted_resolvers is "
                     "empty): nothing is learned, every registry connection in scope is refused")
    if daemon.hold is Hold.PASSIVE:
        notes.append(PASSIVE_NOTE)
    notes += [f"cap reached: {cap}" for cap in snooper.caps_hit]
    if daemon.engine.state.get("note"):
        notes.append(f"engine scope: {daemon.engine.state['note']}")
    notes += [f"engine scope ignores {item}" for item in daemon.engine.state.get("ignored", [])]
    if daemon.guard.repairs:
        last = daemon.guard.repairs[-1]
        notes.append(f"ramfw's table was changed by someone else and put back {len(daemon.guard.repairs)} "
                     f"time(s); last by {last['by']}, {int(now - last['at'])} s ago")
    table = probes.table_protection(daemon.table.kernel_view(), daemon.table.portid, daemon.table.owned)
    if table.get("warning"):
        notes.append(f"WARNING: {table['warning']}")
    clients = daemon.blocks_log.clients
    if clients is not None and clients.problem:
        notes.append(f"block events cannot name their clients: {clients.problem}")
    if daemon.tls.state != "active":
        notes.append(f"TLS server names: {daemon.tls.state}")
    if "host" in daemon.scope:
        notes.append(f"ramfw's own connections (policy polls, `ramfw check`'s probes) are {daemon.own_traffic}")
    url = daemon.url_source
    freshness = poller.status_fields(daemon, now)
    if freshness["stale"]:
        notes.insert(0, f"policy out of date: {freshness['stale']}")
    return {
        "daemon": {"running": True, "pid": os.getpid(), "since": daemon.started, "version": __version__},
        "version": __version__,
        "enforcing": bool(counters),
        "mode": daemon.config.enforcement.mode,
        "scope": list(daemon.config.enforcement.scope),
        "scope_in_force": list(daemon.scope),
        "dns_hold": daemon.hold.value + (" + eBPF prefilter: only replies that may be for allowlisted names "
                                         "are held, the rest are copied" if daemon.prefilter else "") + pairing(daemon),
        "engine": daemon.engine.state,
        "capabilities": daemon.report.to_dict(),
        "policy": {**daemon.policy.summary(), "source": daemon.source, "loaded_at": daemon.policy_loaded,
                   **({"url": url.url, "url_error": url.last_error} if url else {}), **freshness},
        "trusted_resolvers": daemon.trusted,
        "trusted_from": "dns.trusted_resolvers" if daemon.config.dns.trusted_resolvers else str(resolvers.RESOLV_CONF),
        "learned": {k: v for k, v in learned.items() if v},
        "counters": {**dict(snooper.counters), **counters, "learned_addresses": snooper.total,
                     **(daemon.prefilter.pairing_counters() if daemon.prefilter else {})},
        "tls": daemon.tls.status(),
        "recent_blocks": list(daemon.blocks_log.recent),
        "repairs": daemon.guard.repairs,
        "table": table,
        "notes": notes,
        "errors": list(daemon.errors),
    }
