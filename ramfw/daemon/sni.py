"""The TLS server name check in the daemon (issue #13): an address learned for an allowlisted
name is open only to the names under that entry.

The kernel (``tlsrules.tls_rules``) copies each in-scope SYN to a TLS port of a learned address
(or to a configured proxy) to an NFLOG group, and marks its flow in conntrack; the flow's first
data segments then wait in a netfilter queue of their own. Here each is read (``tls.flows``): the
ClientHello's server name (through a proxy: the CONNECT request's host, then the tunnel's
ClientHello) is matched against the allowlist, and the destination must have been learned for a
name under the same entry. The verdict goes into the flow's conntrack mark (``kernel.conntrack``)
before the held segments are released: allowed, the mark is cleared and nothing of the flow
reaches userspace again; refused, the segments are dropped but the last, which the kernel answers
with a reset, as it answers every later packet of the flow, and a block event names the host the
client asked for at that address. QUIC to the TLS ports is refused by the kernel and named here.

No daemon bound: the queue's bypass lets the segments pass (the address check alone, as before);
the queue never fails open when full (the kernel drops; the client sends again). Another table
that writes the check's conntrack mark bits (``kernel.ctmarks``) undoes it: read at start and
after another process changed another table, said in ``state`` (status's first line) and logged.
"""

from __future__ import annotations

import functools
import logging
import selectors
import socket
import time
from collections import Counter, deque

from ..config import split_proxy
from ..errors import NftablesError
from ..kernel import ctmarks, netlink, nft
from ..kernel.conntrack import Marks
from ..kernel.nflog import Log
from ..kernel.queue import NF_ACCEPT, NF_DROP, Queue
from ..snoop.packet import TCP, TCP_RST, TCP_SYN, UDP, Flow, destination, source
from ..tls.doctor import writers_text
from ..tls.flows import Flows, Step, share_text, shares_of
from ..tls.judge import Addresses, Verdict, judge, judge_connect, judge_tunnel, refused_unread
from ..tls.packet import head, marks, segment
from . import logs
from .blocks import TRANSPORTS, process_name

log = logging.getLogger("ramfw")
TCP_ACK = 0x10
NF_REPEAT = 4  # the packet goes through the hook again: the refused flow's mark has it reset
BURST = 64
SWEEP = 10.0
SPIN_SECONDS = 100e-6  # waiting for a first flight's next segment before the loop sleeps
MARKS_READ_EVERY = 5.0  # seconds between two readings of the ruleset for writers of the mark bits


class TlsCheck:
    """Binds the SYN copies' group and the first flights' queue (where the kernel can queue and
    the check is on); ``state`` says what is in force, for status."""

    def __init__(self, daemon):
        self.daemon = daemon
        e = self.settings = daemon.config.enforcement
        self.mask, self.refused_mark = e.tls_mark_mask, e.tls_ct_mark << 1
        self.proxies = {(str(address), port) for address, port in map(split_proxy, e.proxies)}
        self.index = Addresses(cap=2 * daemon.config.dns.max_addresses)
        self.flows = Flows(self, audit=e.mode == "audit", share_text=lambda share: share_text(share, _interface))
        self.counters: Counter[str] = Counter()
        self.costs: deque[float] = deque(maxlen=1024)  # seconds from a first flight's last segment to its verdict
        self.queue = self.copies = self.marks = None
        self.mark_writers: list[ctmarks.MarkWriter] = []  # other tables' rules that may change the mark bits
        self._next_sweep, self._holding, self._next_marks_read = 0.0, False, 0.0
        if not e.tls_check:
            self.state = "off (enforcement.tls_check = false): flows to learned addresses pass on their address alone"
        elif not daemon.report.hold.holds:
            self.state = ("NOT checked: this kernel cannot queue packets; flows to learned addresses pass on their "
                          "address alone (QUIC to the TLS ports is still refused)")
            log.warning("TLS server names %s", self.state)
        else:
            self.copies = netlink.bind_group(Log, e.tls_syn_group, "NFLOG group", "enforcement.tls_syn_group")
            self.queue = netlink.bind_group(Queue, e.tls_queue_num, "netfilter queue", "enforcement.tls_queue_num")
            self.marks = Marks()
            self.state = "active"

    @property
    def active(self) -> bool:
        return self.queue is not None

    def rules(self) -> dict[str, list[bytes]]:
        """The queue rule (raw netlink), once this daemon reads the queue."""
        return nft.tls_queue_rules(self.daemon.report.hold, self.settings.tls_queue_num) if self.active else {}

    def register(self, sel: selectors.BaseSelector) -> None:
        """Into the loop; first, what the allowed sets hold (from before a restart), and the
        flows marked while no daemon read them (``_sweep``)."""
        if not self.active:
            return
        now = time.time()
        for name, addresses in self.daemon.snooper.learned.items():
            for address, expiry in addresses.items():
                self.index.add(address, name, expiry, now)
        self._on_copies()
        self._sweep()
        self._read_mark_writers()
        sel.register(self.copies.sock, selectors.EVENT_READ, self._on_copies)
        sel.register(self.queue.sock, selectors.EVENT_READ, self._on_queue)

    def _sweep(self) -> None:
        """The flows marked before this daemon read them. Those whose first flight went to the
        queue while none was bound passed it on their address (they began while no daemon ran):
        their marks are cleared, so they keep passing rather than be reset mid-transfer. Those
        that sent nothing yet keep their mark: their first flight is refused (no daemon saw where
        their stream begins) and the client connects again. Cleared, an idle connection opened
        before a restart would have sent any name after it (review)."""
        try:
            stale = [flow for flow in self.marks.marked(self.mask, self.mask) if not self.flows.known(flow)]
        except OSError as err:
            self.daemon._error(f"TLS check: reading conntrack: {err}")
            return
        for flow in stale:
            try:
                self.marks.set(flow, 0, self.mask)
            except OSError:
                continue
        if stale:
            self.counters["unchecked_at_start"] += len(stale)
            log.info("TLS check: %d connections to learned addresses sent their first flight while no daemon read "
                     "it: they keep passing on their address", len(stale))

    def _read_mark_writers(self) -> None:
        """At start, then in housekeeping once another process changed another table (at most every
        ``MARKS_READ_EVERY`` s: listing takes ~4 ms for 100 rules, a quarter of a second for 5,000,
        while the loop waits). A change in what is found is logged once."""
        self.daemon.guard.watch.others_changed = False
        self._next_marks_read = time.monotonic() + MARKS_READ_EVERY
        try:
            writers = ctmarks.find(self.settings)
        except NftablesError as err:  # tried again in MARKS_READ_EVERY s
            self.daemon.guard.watch.others_changed = True
            self.daemon._error(f"TLS check: reading the ruleset for writers of its conntrack mark bits: {err}")
            return
        if writers == self.mark_writers:
            return
        self.mark_writers = writers
        said = logs.event("tls_mark_writers", rules=list(map(str, writers)))
        if writers:
            self.state = f"NOT reliably checked: {writers_text(writers, self.mask)}"
            log.warning("TLS server names %s", self.state, extra=said)
        else:
            self.state = "active"
            log.info("TLS check: no other table writes its conntrack mark bits any more", extra=said)

    def learned(self, elements) -> None:
        """The addresses a reply just taught, with the name they were learned for (on the hold
        path: nothing to do where the check does not run)."""
        if not self.active:
            return
        now = time.time()
        for element in elements:
            self.index.add(element.address, element.name, now + element.timeout, now)

    # -- the judge (tls.flows.Judge) --------------------------------------------------------
    def hello(self, name: str, address: str) -> Verdict:
        return judge(name, address, self.daemon.policy.allows, self.index.names(address, time.time()))

    def connect(self, name: str, address: str) -> Verdict:
        return judge_connect(name, address, self.daemon.policy.allows)

    def tunnel(self, name: str, connect: str, address: str) -> Verdict:
        return judge_tunnel(name, connect, address, self.daemon.policy.allows)

    def unread(self, address: str, reason: str) -> Verdict:
        return refused_unread(address, reason)

    # -- handlers ------------------------------------------------------------------------------
    def _on_copies(self) -> None:
        for _ in range(BURST):
            try:
                packets = self.copies.receive_logged()
            except OSError as err:  # ENOBUFS: copies were lost; their flows will be refused (fail closed)
                self.counters["copy_errors"] += 1
                self.daemon._error(f"TLS check: SYN copies: {err}")
                return
            if not packets:
                return
            for packet in packets:
                self._copy(packet)

    def _copy(self, logged) -> None:
        data = logged.payload
        seg, now = head(data), time.time()  # a copy is cut at its snap length: headers only
        if seg is not None and seg.flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            self.counters["syns"] += 1
            self.flows.syn((seg.src, seg.sport, seg.dst, seg.dport), seg.seq, now, proxy=(seg.dst, seg.dport)
                           in self.proxies, tsval=seg.marks.tsval, shares=shares_of(logged.uid, logged.indev, seg.src))
            return
        if seg is not None and seg.flags & TCP_ACK:  # the server's: has it taken the first flight?
            step = self.flows.server_ack((seg.dst, seg.dport, seg.src, seg.sport), seg.marks.ack, now)
            if step is not None:
                self._apply(step)
            return
        found = destination(data)
        if found is not None and _protocol(data) == UDP:
            self.counters["quic_refused"] += 1
            address, port = found
            names = self.index.names(address, now) or self.daemon.snooper.names_of(address)[:1] or [""]
            self._say(Verdict(False, names[0], f"registry access to {names[0] or address} over QUIC (UDP port {port}) "
                                               "is not allowed: its server name cannot be read (clients fall back "
                                               "to TCP)", "quic"), (source(data), 0, address, port), UDP)

    def _on_queue(self) -> None:
        for _ in range(BURST):
            try:
                packets = self.queue.receive()
                if not packets and self._holding:
                    packets = self._spin()
            except OSError as err:
                self.counters["queue_errors"] += 1
                self.daemon._error(f"TLS check: queue: {err}")
                return
            if not packets:
                return
            # after the segments were read: the copy of each one's SYN was made before it was queued.
            # Read always, not only for flows not waiting: a tuple used again must meet its new SYN
            # before its old flow (review).
            self._on_copies()
            for packet in packets:
                self._read(packet)

    def _spin(self) -> list:
        """A first flight's next segment is on its way (a client sends them back to back): wait
        for it here, ``SPIN_SECONDS`` at most, rather than sleep and pay the wake-up (a ClientHello
        in two segments, Go's since 1.24, took 10-20 µs more that way)."""
        self._holding = False
        deadline = time.perf_counter() + SPIN_SECONDS
        while time.perf_counter() < deadline:
            packets = self.queue.receive()
            if packets:
                return packets
        return []

    def _read(self, packet) -> None:
        """Every queued packet gets a verdict, whatever happens on the way."""
        start = time.perf_counter()
        self.counters["segments"] += 1
        try:
            seg, found = segment(packet.payload), marks(packet.payload)
            if seg is None or found is None:  # not TCP, cut, or a checksum the server's TCP would drop it for
                self.counters["unreadable"] += 1
                self._verdict(packet.packet_id, NF_DROP)
                return
            step = self.flows.segment((seg.src, seg.sport, seg.dst, seg.dport), seg.seq, seg.payload,
                                      packet.packet_id, time.time(), reset=bool(seg.flags & TCP_RST), marks=found)
        except Exception as err:  # noqa: BLE001 - the packet still gets its verdict
            self.counters["errors"] += 1
            self.daemon._error(f"TLS check: reading a segment: {err!r}")
            self._verdict(packet.packet_id, NF_DROP)
            return
        self._apply(step)
        self._holding = not (step.accept or step.drop or step.reject)  # held: the flight is not whole
        if step.verdict is not None:
            self.costs.append(time.perf_counter() - start)

    def _apply(self, step: Step) -> None:
        """The mark first (so no later packet of the flow is queued again), then the verdicts."""
        reject = NF_REPEAT
        if step.mark:
            try:
                if step.mark == "allow":  # the hot path: the kernel answers only a refusal (read in housekeeping)
                    self.marks.send(step.key, 0, self.mask)
                else:  # waited for: a refused flow's segment must not come back to the queue; the reset
                    # rule answers it (below), then the entry goes
                    self.marks.set(step.key, self.refused_mark, self.mask)
            except OSError as err:  # the flow is gone (or conntrack refused): drop rather than loop
                self.counters["mark_errors"] += 1
                self.daemon._error(f"TLS check: setting a flow's mark: {err}")
                reject = NF_DROP
        given = [(i, NF_ACCEPT) for i in step.accept] + [(i, NF_DROP) for i in step.drop] + \
            [(i, reject) for i in step.reject]
        if given:
            try:  # in one system call (each accepted segment is carried on to the server inside it)
                self.queue.verdicts(given)
            except OSError as err:  # one by one, so none is left in the queue for good
                self.counters["queue_errors"] += 1
                self.daemon._error(f"TLS check: queue verdicts: {err}")
                for packet_id, verdict in given:
                    self._verdict(packet_id, verdict)
        if step.mark == "refuse" and reject == NF_REPEAT:
            # The reset was sent inside the verdict. Kept, the entry would reset its tuple for
            # as long as packets refresh it: a user refused from every source port would refuse
            # the engine those ports too (review). Gone, the client's next SYN is checked anew;
            # anything else of the old flow is new without a SYN, and dropped.
            try:
                self.marks.forget(step.key)
            except OSError as err:
                self.counters["mark_errors"] += 1
                self.daemon._error(f"TLS check: forgetting a refused flow: {err}")
        if step.verdict is None:
            if step.mark == "refuse":
                self.counters["idle_refused"] += 1
            return
        self.counters["allowed" if step.verdict.allow else "refused"] += 1
        if step.verdict.reason == "share_exceeded":
            self.counters["over_share"] += 1
        if not step.verdict.allow:
            self._say(step.verdict, step.key)

    def _verdict(self, packet_id: int, verdict: int) -> None:
        try:
            self.queue.verdict(packet_id, verdict)
        except OSError as err:
            self.counters["queue_errors"] += 1
            self.daemon._error(f"TLS check: queue verdict: {err}")

    def _say(self, verdict: Verdict, key, transport: int = TCP) -> None:
        """A block event through the daemon's block log (its host: the name asked for; its
        client: who connected, as the kernel recorded it), and the refusal kept for ``ramfw report``."""
        client, client_port, address, port = key
        blocks, names = self.daemon.blocks_log, self.daemon.snooper.names_of(address)
        named = blocks.clients.describe(Flow(transport, client, client_port, address, port)) if blocks.clients else {}
        blocks.record(verdict.message, address, port, names=names, host=verdict.name, reason=verdict.reason,
                      client=named, containers=blocks.clients.containers if blocks.clients else None,
                      transport=TRANSPORTS.get(transport, str(transport)))
        self.daemon.seen.refusal(verdict.name, address, port, client, blocks.verdict, time.time(), process_name(named))

    def housekeeping(self) -> None:
        if not self.active:
            return
        now = time.time()
        for step in self.flows.expire(now):
            self._apply(step)
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP
            self.index.sweep(now)
        if self.marks.refusals():  # allowed flows whose mark the kernel refused: their segments come back
            self.counters["allow_mark_refused"] = self.marks.failed
        if self.daemon.guard.watch.others_changed and time.monotonic() >= self._next_marks_read:
            self._read_mark_writers()

    def status(self) -> dict:
        costs = sorted(self.costs)
        return {"state": self.state, "ports": list(self.settings.tls_ports),
                "proxies": sorted(f"{a}:{p}" for a, p in self.proxies), "flows_waiting": len(self.flows),
                "segments_held": self.flows.held, "addresses_indexed": len(self.index),
                "verdict_us_p50": round(costs[len(costs) // 2] * 1e6, 1) if costs else None,
                "mark_writers": list(map(str, self.mark_writers)), "counters": dict(self.counters)}

    def close(self) -> None:
        """The flows still being read or verified are refused first: the next daemon could not
        know where their streams begin, and between the two the bypass would let their first
        flights pass unread (what the queue still holds is dropped when it is unbound, and sent
        again). Their clients connect again."""
        if self.marks is not None:
            waiting, audit = self.flows.waiting(), self.settings.mode == "audit"  # audit: they pass, unread
            for key in waiting:
                try:
                    self.marks.set(key, 0 if audit else self.refused_mark, self.mask)
                except OSError:
                    continue
            if waiting:
                log.info("TLS check: stopping: %d connections whose first flight was being read %s", len(waiting),
                         "pass unread (audit mode)" if audit else "are reset")
        for thing in (self.queue, self.copies, self.marks):
            if thing is not None:
                thing.close()


@functools.lru_cache(maxsize=256)
def _interface(index: int) -> str:
    try:
        return socket.if_indextoname(index)
    except OSError:
        return f"#{index}"


def _protocol(data: bytes) -> int:
    try:
        return data[9] if data[0] >> 4 == 4 else data[6]
    except IndexError:
        return 0
