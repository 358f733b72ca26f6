"""The daemon's metrics, in Prometheus' exposition format (``prometheus_client``).

Written to a node_exporter textfile (``metrics.textfile``: prometheus_client writes a temporary
file and renames it, so the collector never reads half a file) and, when ``metrics.listen`` is
set, served over HTTP from a thread of its own. Both show the same snapshot, taken by the loop
every ``metrics.interval`` seconds from the status document: the HTTP thread never reads the
daemon's live state. The hold path only appends a duration to ``HoldTimes``; the loop folds them
into the histogram when it takes the snapshot.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from pathlib import Path
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from ..config import Config, split_proxy

# Seconds a held reply waits for its verdict: from the daemon's receive to its verdict.
HOLD_BUCKETS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 100e-3, 1.0)
REPLIES = ("held", "copied", "replies", "queries", "paired", "other_names", "untrusted", "unsolicited",
           "unmatched", "malformed", "errors", "program_failed")  # the DNS counters, as status names them
REJECTS = ("blocked", "audited", "deferred")  # the table's verdict counters for what it did not allow
BLOCK_REASONS = ("not_allowlisted", "address_not_learned", "no_name_seen")  # snoop.snooper.Snooper.block_reason
QUEUE_STATS = Path("/proc/net/netfilter/nfnetlink_queue")
log = logging.getLogger("ramfw")


class HoldTimes:
    """Durations of held replies, appended on the hold path (bounded: a flood between two
    snapshots keeps its last 65,536), taken by the snapshot."""

    def __init__(self):
        self.recent: deque[float] = deque(maxlen=65536)
        self.buckets = [0] * (len(HOLD_BUCKETS) + 1)  # cumulative over the daemon's life, +Inf last
        self.count, self.sum = 0, 0.0

    def fold(self) -> None:
        while self.recent:
            seconds = self.recent.popleft()
            self.count += 1
            self.sum += seconds
            self.buckets[next((i for i, le in enumerate(HOLD_BUCKETS) if seconds <= le), len(HOLD_BUCKETS))] += 1

    def cumulative(self) -> list[tuple[str, int]]:
        total, out = 0, []
        for le, n in zip((*(repr(b) for b in HOLD_BUCKETS), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((le, total))
        return out


def queue_drops(queue_num: int, stats: Path = QUEUE_STATS) -> dict[str, int]:
    """The kernel's drops for ramfw's queue: because it was full, and because the daemon's
    socket could not take a packet (nfnetlink_queue's queue_dropped and user_dropped)."""
    try:
        for line in stats.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 7 and fields[0] == str(queue_num):
                return {"queue_full": int(fields[5]), "socket_full": int(fields[6])}
    except (OSError, ValueError):
        pass
    return {}


def families(doc: dict, hold: HoldTimes, drops: dict[str, int], learned: dict[str, int]) -> list:
    """The metric families of one snapshot (pure: the status document and what the loop read)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily

    counters = doc.get("counters", {})
    policy = doc.get("policy", {})
    out = [InfoMetricFamily("ramfw", "The daemon", value={"version": str(doc.get("version", "")),
                                                           "mode": doc.get("mode", ""),
                                                           "dns_hold": doc.get("dns_hold", "")})]
    out.append(GaugeMetricFamily("ramfw_enforcing", "1 when ramfw's table is in force", value=int(doc["enforcing"])))
    out.append(GaugeMetricFamily("ramfw_engine_scope_trusted", "1 when engine scope is in force as configured (0: "
                                 "widened to host scope, fail closed)", value=int(not doc["engine"].get("widened"))))
    marked = GaugeMetricFamily("ramfw_engine_cgroups", "Engine cgroups, by whether ramfw's program is attached",
                               labels=["marked"])
    rows = doc["engine"].get("cgroups", [])
    for state in (True, False):
        marked.add_metric([str(state).lower()], sum(1 for row in rows if row.get("marked") is state))
    out.append(marked)
    hist = HistogramMetricFamily("ramfw_dns_hold_seconds", "How long a held DNS reply waited for its verdict in the "
                                 "daemon", buckets=hold.cumulative(), sum_value=hold.sum)
    out.append(hist)
    replies = CounterMetricFamily("ramfw_dns_replies", "DNS messages the daemon saw, by what became of them",
                                  labels=["outcome"])
    for name in REPLIES:
        replies.add_metric([name], counters.get(name, 0))
    out.append(replies)
    rejects = CounterMetricFamily("ramfw_rejects", "Connections in scope the table did not allow, by verdict "
                                  "(blocked: refused; audited: audit mode, let through; deferred: a first SYN "
                                  "dropped while a copied reply is read)", labels=["verdict"])
    for name in REJECTS:
        rejects.add_metric([name], counters.get(name, 0))
    out.append(rejects)
    named = CounterMetricFamily("ramfw_named_blocks", "Blocked connections the daemon named (50 a second at most), "
                                "by why: the name is not allowlisted, an allowlisted name's address is not learned "
                                "now, no name was seen for the address", labels=["reason"])
    for reason in BLOCK_REASONS:
        named.add_metric([reason], counters.get(f"blocks_{reason}", 0))
    out.append(named)
    sets = GaugeMetricFamily("ramfw_learned_addresses", "Addresses learned from allowlisted names, by set",
                             labels=["set"])
    for name, count in sorted(learned.items()):
        sets.add_metric([name], count)
    out.append(sets)
    out.append(InfoMetricFamily("ramfw_policy", "The policy in force", value={
        "organization": str(policy.get("organization", "")), "version": str(policy.get("version") or ""),
        "signer": str(policy.get("signer") or ""), "source": str(policy.get("source", ""))}))
    out.append(GaugeMetricFamily("ramfw_policy_loaded_timestamp_seconds", "When the policy in force was loaded",
                                 value=policy.get("loaded_at", 0)))
    out.append(GaugeMetricFamily("ramfw_policy_age_seconds", "Seconds since the policy source last answered",
                                 value=policy.get("age") or 0))
    out.append(GaugeMetricFamily("ramfw_policy_stale", "1 when the policy is out of date (status is red)",
                                 value=int(bool(policy.get("stale")))))
    out.append(CounterMetricFamily("ramfw_tamper_repairs", "Changes another process made to ramfw's table, put back",
                                   value=len(doc.get("repairs", []))))
    queue = CounterMetricFamily("ramfw_queue_drops", "DNS replies the kernel dropped from ramfw's queue",
                                labels=["why"])
    for why in ("queue_full", "socket_full"):
        queue.add_metric([why], drops.get(why, 0))
    out.append(queue)
    return out


class _Snapshot:
    """A prometheus_client collector that gives the last snapshot (swapped whole)."""

    def __init__(self):
        self.families: list = []

    def collect(self):
        return iter(self.families)


class _QuietHandler(WSGIRequestHandler):
    timeout = 5  # a client that sends nothing holds the metrics thread 5 s at most, never the loop

    def log_message(self, *args) -> None:
        pass


class Metrics:
    """The daemon's metrics: ``take`` a snapshot (from the loop), ``close``."""

    def __init__(self, config: Config):
        from prometheus_client import CollectorRegistry

        self.settings = config.metrics
        self.queue_num = config.dns.queue_num
        self.hold = HoldTimes()
        self.snapshot = _Snapshot()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.snapshot)
        self.next = 0.0
        self.server: WSGIServer | None = None
        if self.settings.listen:
            from prometheus_client import make_wsgi_app

            address, port = split_proxy(self.settings.listen)
            server_class = type("MetricsServer", (WSGIServer,), {"address_family": 10 if address.version == 6 else 2})
            try:
                self.server = make_server(str(address), port, make_wsgi_app(self.registry), server_class, _QuietHandler)
            except OSError as err:  # enforcement never waits on metrics: say so, serve none
                log.error("metrics: cannot serve on %s (%s); the textfile, if any, is still written",
                          self.settings.listen, err.strerror)
            else:
                threading.Thread(target=self.server.serve_forever, name="ramfw-metrics", daemon=True).start()

    @classmethod
    def start(cls, config: Config) -> "Metrics | None":
        """None when no metrics are configured (prometheus_client is then never imported), or
        when prometheus_client is missing (said at ERROR: enforcement does not wait on it)."""
        if not (config.metrics.textfile or config.metrics.listen):
            return None
        try:
            return cls(config)
        except ImportError:
            log.error("metrics: python3-prometheus-client is not installed; no metrics are written or served")
            return None

    def take(self, daemon, now: float | None = None) -> None:
        """A new snapshot of the daemon (its status document, the learned addresses per set),
        at most every ``metrics.interval`` seconds."""
        from . import status

        now = time.monotonic() if now is None else now
        if now < self.next:
            return
        self.next = now + self.settings.interval
        self.hold.fold()
        learned = {"allow4": 0, "allow6": 0}
        wall = time.time()
        for addresses in daemon.snooper.learned.values():
            for address, expiry in addresses.items():
                learned["allow6" if ":" in address else "allow4"] += expiry > wall
        self.snapshot.families = families(status.document(daemon, full=False), self.hold,
                                          queue_drops(self.queue_num), learned)
        if self.settings.textfile:
            from prometheus_client import write_to_textfile

            write_to_textfile(self.settings.textfile, self.registry)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
