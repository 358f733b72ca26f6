"""The daemon's loop: holds DNS replies, programs the allowed sets, names what it blocks.

One thread, one ``selectors`` loop: the queue socket, the NFLOG sockets (blocked connections; copies of replies
not held), the control sockets and a wake-up socket for signals. Every socket is non-blocking and every handler
reads what waits, then returns. A held reply is read, decided (``snoop``), its addresses programmed, and only then
released. Where the kernel allows, an eBPF prefilter holds only the replies that may be for allowlisted names; the
others reach the daemon as copies, for counters and block messages. TLS first flights wait in a queue of their own
(``sni``). SIGHUP or ``ramfw reload`` re-reads the policy; SIGTERM exits and leaves enforcement in place.

The path of a held reply: ``kernel.queue.Queue.receive`` -> ``Daemon._read`` ->
``snoop.snooper.Snooper.on_packet`` -> ``kernel.table.Table.add_elements`` -> the verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import selectors
import signal
import socket
import time
from collections import deque
from pathlib import Path

from .. import record
from ..config import Config
from ..errors import NftablesError, RamfwError, require_root
from ..kernel import links, netlink, nft, probes, ruleset
from ..kernel.links import LinkWatch
from ..kernel.nflog import Log
from ..kernel.queue import NF_ACCEPT, NF_DROP, Queue
from ..kernel.ruleset import Hold
from ..kernel.table import Table
from ..policy import source as policy_source
from ..snoop import resolvers
from ..snoop.snooper import Decision, Snooper, warm_up
from . import logs, status as status_doc
from .blocks import BlockLog, Throttle
from .control import ControlServer
from .engine import EngineScope
from .guard import Guard
from .metrics import Metrics
from .poller import Poller, describe, fetch_at_start, refused
from .seen import Seen, seen_path
from .sni import TlsCheck

log = logging.getLogger("ramfw")
HOUSEKEEPING = 1.0
EXPIRY_SWEEP = 10.0  # seconds between two sweeps of the learned addresses the kernel expired
BURST = 64  # datagrams one handler reads before the loop looks at the other sockets


class Daemon:
    def __init__(self, config: Config, policy_path: str | None = None):
        self.config = config
        self.policy_path = policy_path
        self.stopping = False
        self.reload_requested = False
        self.errors: deque[str] = deque(maxlen=20)  # kept for status
        self.blocks_log = BlockLog(config.enforcement.mode == "audit")
        self.seen = Seen()  # what start() loads: refusals and lookups, for ramfw report
        self._error_log = Throttle()
        self.queue: Queue | None = None
        self.snoop = self.blocks = self.prefilter = self.metrics = None  # snoop, blocks: a Log once bound
        self.control = ControlServer(config, self.handle)
        self.started, self._next_sweep = time.time(), 0.0
        self.poller: Poller | None = None

    # -- start-up --------------------------------------------------------------------------
    def start(self) -> None:
        require_root("ramfw daemon")
        self.control.take_lock()  # first: a second daemon in this namespace stops before touching anything
        self.url_source = policy_source.url_source(self.config) if self.policy_path is None else None
        if self.url_source is not None and self.url_source.due(time.time()):
            fetch_at_start(self.url_source, log)
        self.policy, self.source = policy_source.load(self.config, self.policy_path, fallback=True, polled=self.url_source)
        self.policy_loaded = time.time()
        self.seen = Seen.load(seen_path(self.config))
        self.report = probes.run(Path(self.config.daemon.run_dir) / probes.CACHE)
        self.report.check_required()
        self.hold = Hold.PASSIVE if self.config.dns.hold == "passive" else self.report.hold
        self.table = Table(self.config.enforcement.table, owned=self.report.owns_table(self.config.enforcement.table_owner))
        self.resolv_conf = resolvers.Follower(self.config.dns.trusted_resolvers)
        self.trusted = resolvers.trusted(self.config.dns.trusted_resolvers)
        self.snooper = Snooper(self.policy, set(self.trusted), self.config.dns)
        # bound before the hold rules exist: a held reply never meets an unbound queue, whose bypass passes it unread
        if self.hold.holds:
            self.queue = netlink.bind_group(Queue, self.config.dns.queue_num, "netfilter queue", "dns.queue_num")
            if self.config.dns.prefilter and self.report.has("dns_prefilter"):
                from ..kernel.prefilter import Prefilter
                pairing = self.config.dns.pair_queries and self.report.has("dns_pairing")
                self.prefilter = Prefilter(self.policy.patterns(), pairing)
                self.snooper.kernel_pairs = pairing
        self.tls = TlsCheck(self)  # the TLS server name check's queue and SYN copies: bound before its rules exist
        if self.hold is not Hold.NONE:  # copies: the queries replies are paired with, replies not held
            self.snoop = netlink.bind_group(Log, self.config.dns.snoop_group, "NFLOG group", "dns.snoop_group")
        if self.report.has("nflog"):
            self.blocks = netlink.bind_group(Log, self.config.enforcement.nflog_group, "NFLOG group", "enforcement.nflog_group")
        self.links = LinkWatch()  # before the ruleset: no bridge made meanwhile is missed
        self.guard = Guard(self)  # and no change made by another process
        self.engine = EngineScope(self.config, self.report)
        self.engine.start()  # before the ruleset: it must know whether engine scope can be trusted
        if self.blocks:  # before the ruleset too: who connects is recorded from the start
            self.blocks_log.name_clients(self.engine.mount, self.config.enforcement)
        self.own_traffic, self.applied_scope = "", ()
        self.apply()
        self.engine.say_scope()
        self.snooper.seed(self.table.learned(), time.time())  # what the kernel still allows, from before a restart
        warm_up()
        self.control.open()
        self.metrics = Metrics.start(self.config)
        log.info("ramfw daemon enforcing %s (%d entries, %s mode, scope %s, DNS hold: %s)",
                 self.policy.organization, len(self.policy.matcher), self.config.enforcement.mode,
                 ", ".join(self.scope), self.hold.value, extra=logs.event(
                     "started", organization=self.policy.organization, mode=self.config.enforcement.mode,
                     scope=list(self.scope), dns_hold=self.hold.value))
        if self.hold is Hold.PASSIVE:
            log.warning("this kernel cannot hold DNS replies: the first connection to a new address can be lost")
        for note in record.proxy_notes(self.config):
            log.warning("%s", note)

    @property
    def scope(self) -> tuple[str, ...]:
        """The scope the kernel was last given (the engine's state may ask for another)."""
        return self.applied_scope

    def apply(self, rebuild: bool = False) -> None:
        """Apply the whole ruleset, with the DNS hold this kernel allows (``rebuild``: ``Table.apply``)."""
        e, d = self.config.enforcement, self.config.dns
        if not self.policy.enabled:
            self.table.remove()
            self.applied_scope = ()
        else:
            f = self.prefilter
            dns_rules = self.tls.rules() | nft.dns_chain_rules(self.hold, d.queue_num, f.reply_program if f else None, d.snoop_group,
                                            d.pair_queries, f.query_fd if f else None)
            scope = self.engine.scope_in_force
            settings = dataclasses.replace(e, scope=scope)
            self.table.apply(ruleset.build_ruleset(settings, self.trusted, d.max_addresses, self.hold), dns_rules, rebuild)
            self.applied_scope = scope
            self._on_links()
            self.own_traffic = self.engine.exempt_own_traffic(self.table, "", self.url_source, force=True)
        record.write(self.config, record.build(self.config, self.policy, self.source, self.trusted, self.report.to_dict(),
                                               daemon_pid=os.getpid(), scope_in_force=list(self.applied_scope)))

    def _check_engine(self) -> None:
        """Mark what the engine runs in now; widen or narrow the scope when that changed (or
        when applying it failed before: it is tried again every second)."""
        changed = self.engine.check()
        if not self.policy.enabled:
            return
        if changed or self.applied_scope != self.engine.scope_in_force:
            self.engine.say_scope()
            self.apply()
        else:
            self.own_traffic = self.engine.exempt_own_traffic(self.table, self.own_traffic, self.url_source)

    def _on_links(self) -> None:
        """Links changed (a container network made, a port added): the container bridges again."""
        self.links.drain()
        if not self.policy.enabled:
            return  # no table
        try:
            self.table.set_container_bridges(links.container_bridges(links.dump()))
        except (OSError, RamfwError) as err:  # the set stays as it was; a bridge not in it is filtered
            self._error(f"reading the container bridges failed: {err}")

    def _on_cgroups(self) -> None:
        """A cgroup was made or removed beside the engine's: an engine restart, mark it now."""
        self.engine.watch.drain()
        self._check_engine()

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> None:
        wake_r, wake_w = socket.socketpair()
        for end in (wake_r, wake_w):
            end.setblocking(False)
        old_wakeup = signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)
        stop = lambda *_: setattr(self, "stopping", True)  # noqa: E731
        handlers = {signal.SIGHUP: self._on_sighup, signal.SIGTERM: stop, signal.SIGINT: stop}
        previous = {sig: signal.signal(sig, handler) for sig, handler in handlers.items()}
        sel = selectors.DefaultSelector()
        if self.queue:
            sel.register(self.queue.sock, selectors.EVENT_READ, self._on_queue)
        if self.snoop:  # read at once: a query's copy is read while its reply is on its way
            sel.register(self.snoop.sock, selectors.EVENT_READ, self._on_snoop)
        if self.blocks:
            sel.register(self.blocks.sock, selectors.EVENT_READ, self._on_block)
        sel.register(self.links.sock, selectors.EVENT_READ, self._on_links)
        self.tls.register(sel)
        sel.register(self.guard.watch.sock, selectors.EVENT_READ, self.guard.on_notifications)
        if self.engine.watch is not None:
            sel.register(self.engine.watch.fd, selectors.EVENT_READ, self._on_cgroups)
        for listener in self.control.listeners():
            sel.register(listener, selectors.EVENT_READ, lambda listener=listener: self.control.serve(listener))
        sel.register(wake_r, selectors.EVENT_READ, lambda: (netlink.drain(wake_r), self.control.run_pending()))
        self._wake = wake_w
        self.control.wake = self._wake_up
        if self.url_source is not None:
            self.poller = Poller(self.url_source, self._on_new_policy, self._error)
            self.control.prepare = lambda command: self.poller.fetch_now() if command == "reload" else None
            self.poller.start()
        next_housekeeping = time.monotonic() + HOUSEKEEPING
        if self.queue:  # replies read while the queue's binding was acknowledged wait in it, not in the socket
            self._guarded(self._on_queue)
        try:
            while not self.stopping:
                for key, _ in sel.select(max(0.0, next_housekeeping - time.monotonic())):
                    self._guarded(key.data)
                if self.reload_requested:
                    self.reload_requested = False
                    self._guarded(self.reload)
                if time.monotonic() >= next_housekeeping:
                    self._guarded(self._housekeeping)
                    next_housekeeping = time.monotonic() + HOUSEKEEPING
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for thing in (sel, wake_r, wake_w, self):
                thing.close()

    def _on_new_policy(self) -> None:
        """From the poller: a new policy was accepted and cached; the loop reloads it."""
        self.reload_requested = True
        self._wake_up()

    def _wake_up(self) -> None:
        """From another thread: make the loop look at its wake-up socket now."""
        with contextlib.suppress(OSError):  # full: it is awake already
            self._wake.send(b"w")

    def _guarded(self, step) -> None:
        """What goes wrong in a step is logged and counted; the daemon, its enforcement and DNS go on."""
        try:
            step()
        except Exception as err:  # noqa: BLE001 - the daemon must outlive its own bugs
            self.snooper.counters["errors"] += 1
            self._error(f"{getattr(step, '__name__', 'step')}: {err!r}")

    def _on_sighup(self, *_):
        self.reload_requested = True
        if self.poller is not None:  # a URL is fetched in the poller's thread, reloaded if new
            self.poller.poll_soon()

    # -- handlers: each reads what waits and returns -----------------------------------------
    def _drain(self, reader, counter: str, errors: str, handle, first=None, burst: int = BURST) -> None:
        """Handle what waits on one of the loop's sockets: a bounded number of datagrams, so
        the other sockets get their turn; return at once when the socket is empty. ``first``
        runs after each datagram is received and before it is handled."""
        for _ in range(burst):
            try:
                items = reader.receive()
            except OSError as err:
                self.snooper.counters[errors] += 1
                self._error(f"{errors.replace('_', ' ')}: {err}")
                return
            if not items:
                return
            if first is not None:
                self._guarded(first)  # whatever it meets, these items still get handled
            self.snooper.counters[counter] += len(items)
            for item in items:
                handle(item)

    def _on_queue(self) -> None:
        """A verdict for every held reply waiting, each after the copies then waiting (its query's among them)."""
        copies = lambda: self._drain(self.snoop, "copied", "copy_errors", self._read, burst=16 * BURST)  # noqa: E731
        queries_copied = self.snoop and self.config.dns.pair_queries and not self.snooper.kernel_pairs
        self._drain(self.queue, "held", "queue_errors", self._release, copies if queries_copied else None)
        self.snooper.index_unread()  # after the verdicts: naming blocked addresses can wait

    def _release(self, packet) -> None:
        """Decide on one held reply and give it its verdict, whatever raises on the way: a
        reply left in the queue would never be released (the bypass only helps an unbound
        queue), and the client's lookup would time out."""
        accept, start = True, time.perf_counter()
        try:
            accept = self._read(packet.payload, held=True).accept
        except Exception as err:  # noqa: BLE001 - the verdict comes first
            self.snooper.counters["errors"] += 1
            self._error(f"reading a reply: {err!r}")
        try:
            self.queue.verdict(packet.packet_id, NF_ACCEPT if accept else NF_DROP)
        except OSError as err:
            self.snooper.counters["queue_errors"] += 1
            self._error(f"queue verdict: {err}")
        if self.metrics is not None:
            self.metrics.hold.recent.append(time.perf_counter() - start)

    def _on_snoop(self, burst: int = BURST) -> None:
        """Read the copies waiting: queries, replies not held (passive, or passed by the prefilter)."""
        self._drain(self.snoop, "copied", "copy_errors", self._read, burst=burst)
        self.snooper.index_unread()

    def _read(self, payload: bytes, held: bool = False) -> Decision:
        """Decide on one reply and program what it teaches; the caller issues the verdict."""
        try:
            decision = self.snooper.on_packet(payload, time.time(), held)
        except Exception as err:  # a packet must never stop the daemon; it is released
            self.snooper.counters["errors"] += 1
            self._error(f"reading a reply: {err!r}")
            return Decision()
        if decision.elements:
            self._program(decision.elements)
            self.seen.learned(decision.elements, time.time())
            self.tls.learned(decision.elements)
        return decision

    def _program(self, elements) -> None:
        """Program before the release; the kernel's refusals are read in housekeeping. Nothing
        here may keep a held reply from its verdict."""
        try:
            self.table.add_elements(elements, self.report.kernel_refreshes_timeout,
                                    clear_pending=self.hold is Hold.PASSIVE, check=False)
        except Exception as err:  # noqa: BLE001 - whatever it is, the reply still gets its verdict
            self.snooper.counters["program_failed"] += 1
            self._error(f"programming the allowed sets failed: {err}")

    def _on_block(self) -> None:
        try:
            packets = self.blocks.receive()
        except OSError:
            return
        if self.snoop is not None:  # copies of replies that name the address may still wait there
            self._on_snoop()
        self.blocks_log.name_and_record(packets, self.snooper, self.seen)

    # -- control -----------------------------------------------------------------------------
    def handle(self, command: str, uid: int = 0, prepared=None) -> dict:
        if command in ("ping", "status"):
            return {"ok": True, **({"status": status_doc.answer(self, uid)} if command == "status" else {})}
        if command == "stop":
            self.stopping = True
            return {"ok": True, "message": "the daemon is stopping"}
        if command == "reload":
            ok, message = self.reload(prepared)
            return {"ok": ok, "message": message}
        return {"ok": False, "error": f"unknown command {command!r}"}

    # -- policy and housekeeping -----------------------------------------------------------
    def reload(self, fetched=None) -> tuple[bool, str]:
        """Re-read the policy and apply it at once; a refused policy keeps the one in force.
        ``fetched``: what ``ramfw reload`` got from a URL source just before (``Poller.fetch_now``)."""
        if refused(fetched, self.policy):
            return False, refused(fetched, self.policy)
        try:
            policy, source = policy_source.load(self.config, self.policy_path, polled=self.url_source)
        except RamfwError as err:
            self._error(f"reload refused, the policy in force stays: {err}")
            return False, f"reload refused, the policy in force stays: {err}"
        if self.prefilter is not None:
            try:
                self.prefilter.update(policy.patterns())
            except OSError as err:  # replies for new names are then copied, not held: say so
                self._error(f"the DNS prefilter could not be updated ({err}); first connections to "
                            "newly allowed names may fail until it is")
        self.policy, self.source, self.policy_loaded = policy, source, time.time()
        self.snooper.policy = policy
        try:
            self.apply()
        finally:  # whatever apply met, names the new policy removes stop being allowed now
            gone = self.snooper.forget(time.time())
            still = {a for addresses in self.snooper.learned.values() for a in addresses}
            drop = {a for addresses in gone.values() for a in addresses} - still
            if drop and policy.enabled:
                self.table.delete_elements(drop)
        message = f"policy reloaded: {describe(policy)}, {len(policy.matcher)} entries from {source}" + (
            f" ({fetched[1]})" if fetched else "")
        log.info(message, extra=logs.event("policy_reloaded", source=source, version=policy.version))
        return True, message

    def _housekeeping(self) -> None:
        if self.snoop is not None:  # all the copies no held reply came to read
            self._guarded(lambda: self._on_snoop(burst=1 << 20))
        if time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + EXPIRY_SWEEP
            self.snooper.expire(time.time())
        for refusal in self.table.refusals():
            self.snooper.counters["program_failed"] += 1
            self._error(f"programming the allowed sets failed: {refusal}")
        self._check_engine()
        self._guarded(self.tls.housekeeping)
        self.guard.verify()
        self.blocks_log.keep(self.snooper, self.seen)  # connections counted, then saved
        if self.metrics is not None:
            self._guarded(lambda: self.metrics.take(self))
        trusted = self.resolv_conf.changed()
        if trusted is not None and trusted != self.trusted:
            self.trusted = trusted
            self.snooper.trusted = set(trusted)
            try:
                self.table.set_resolvers(trusted)
            except NftablesError as err:
                self._error(str(err))
            log.info("trusted resolvers now %s", ", ".join(trusted) or "none")

    def _error(self, text: str) -> None:
        """Logged (one line per kind of error per 10 s: a packet that makes the same error
        again and again must not flood the log) and kept for status."""
        self._error_log.log(logging.ERROR, text.split(":", 1)[0], text, logs.event("error"))
        self.errors.append(text)

    def close(self) -> None:
        """Held replies get their verdicts first (``Queue.close``): a restart loses none. The
        table's owner socket closes before the control socket: once the daemon stops answering
        (``ramfw down`` waits for that), its table is an orphan anyone may remove."""
        if self.queue is not None:
            if self.snoop is not None:  # the copies of the held replies' queries wait there
                self._guarded(self._on_snoop)
            self.queue.close(release=self._release)
        self.blocks_log.keep(getattr(self, "snooper", None), self.seen, force=True)  # (start may have failed)
        for thing in (self.snoop, self.blocks, self.prefilter, self.poller, self.metrics, getattr(self, "tls", None), *(
                      getattr(self, name, None) for name in ("engine", "blocks_log", "links", "guard", "table"))):
            if thing is not None:
                thing.close()
        self.control.close()

