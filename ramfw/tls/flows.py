"""The flows whose first flight is being read: their segments held until it is whole, then one
verdict for all of them. Pure: time is a parameter, packets are the queue's ids.

A flow is known from its SYN (``syn``: its sequence number is where the stream begins). Each
data segment (``segment``) is held, not released: no byte of a first flight reaches the server
before the flight was read whole and judged. Then every held segment is accepted, or the flow
is refused (all dropped but the last, which the kernel answers with a reset). Bounded: 64
segments per flow, 2 s to complete a first flight, 8192 flows waiting for a verdict.

Those bounds are shared by every client, so each flow also counts against its shares
(``Share``): the local user that opened it or, for a forwarded flow, the interface it came in
by and its source address there. A share's flows waiting and segments held are bounded
(``SHARE_LIMITS``): past them, that share's own new flows are refused, so no user or container
can take the table or the queue from the others (review). Only when the table is full anyway
does a flow go for another's: the oldest of the share with the most waiting.

An accepted flight is not the end: the server's TCP may not take what ramfw read (a segment
that dies on the way, or that it drops: an ACK of data it never sent, an old timestamp), and the
client could then send other bytes for the same place. So the flow stays marked, every segment
of its client still read and compared, until the server acknowledges the whole flight
(``server_ack``, from copies of its packets); only then is it ``allowed`` for the kernel. A
server that does not within 3 s has not taken it: the flow is refused.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from .hello import More, Name, Refused
from .judge import Verdict, refused_share
from .packet import Marks
from .stream import MASK, Flight

HOLD_SECONDS = 2.0  # a first flight not whole this long after its first segment is refused
SYN_SECONDS = 60.0  # a SYN whose flow sends nothing this long is forgotten
LINGER_SECONDS = 5.0  # a decided flow is kept this long, for the segments queued before its mark changed
VERIFY_SECONDS = 3.0  # the server acknowledges an accepted first flight within this, or the flow is refused
MAX_FLOWS = 8192
MAX_HELD = 64
MAX_TURNED_AWAY = 4096  # SYNs refused at their share, remembered for the reason their first segment gets

Key = tuple[str, int, str, int]  # source, source port, destination, destination port
# ("uid", n): the local user whose socket sent the SYN; ("in", ifindex): forwarded in by that
# interface, and with it ("from", ifindex, source address); ("unknown",): neither was given.
# A flow's first share is its own (the table's eviction weighs those).
Share = tuple
UNKNOWN: tuple[Share, ...] = (("unknown",),)
SHARE_LIMITS = {"uid": (1024, 512), "in": (2048, 1024), "from": (256, 128), "unknown": (1024, 512)}
WAITING, HOLDING = 0, 1  # SHARE_LIMITS' columns: flows waiting for a verdict, segments held


class Judge(Protocol):
    def hello(self, name: str, address: str) -> Verdict: ...
    def connect(self, name: str, address: str) -> Verdict: ...
    def tunnel(self, name: str, connect: str, address: str) -> Verdict: ...
    def unread(self, address: str, reason: str) -> Verdict: ...


@dataclass
class Step:
    """What becomes of a flow's packets now: ``accept``, ``drop``, ``reject`` (the kernel resets
    the flow); ``mark``: the flow's verdict for the kernel (``allow``, ``refuse``, or "" for no
    change); ``verdict``: a decision made now; ``reason``: why a first flight was refused."""

    key: Key
    accept: list[int] = field(default_factory=list)
    drop: list[int] = field(default_factory=list)
    reject: list[int] = field(default_factory=list)
    mark: str = ""
    verdict: Verdict | None = None
    reason: str = ""


@dataclass
class _Flow:
    isn: int
    flight: Flight
    opened: float
    held: list[int] = field(default_factory=list)
    held_since: float = 0.0
    # open, tunnel (a CONNECT allowed, its ClientHello to come), verifying (accepted, the server's
    # acknowledgment to come), allowed, refused
    state: str = "open"
    end: int = 0  # where the accepted first flight ends in the stream
    decided: float = 0.0
    connect: str = ""
    conflict: bool = False
    syn_tsval: int | None = None  # the SYN's timestamp: the server takes none older (PAWS)
    marks: Marks | None = None  # the first segment's: every other one of the flight must match
    shares: tuple[Share, ...] = UNKNOWN


def shares_of(uid: int | None, indev: int | None, source: str) -> tuple[Share, ...]:
    """A flow's shares, from what the kernel said of its SYN: the local socket's owner, or the
    interface it was forwarded from and its source address there."""
    if uid is not None:
        return (("uid", uid),)
    if indev is not None:
        return (("in", indev), ("from", indev, source))
    return UNKNOWN


def share_text(share: Share, interface_name=str) -> str:
    """A share as the block log says it; ``interface_name``: an interface's name from its index."""
    if share[0] == "uid":
        return f"uid {share[1]}"
    if share[0] == "in":
        return f"interface {interface_name(share[1])}"
    if share[0] == "from":
        return f"{share[2]} on interface {interface_name(share[1])}"
    return "clients of unknown origin"


class Flows:
    def __init__(self, judge: Judge, audit: bool = False, max_flows: int = MAX_FLOWS,
                 share_text: Callable[[Share], str] = share_text):
        self.judge = judge
        self.audit = audit  # refusals are decided and said, and the flow passes
        self.max_flows = max_flows
        self.share_text = share_text
        self._flows: OrderedDict[Key, _Flow] = OrderedDict()  # waiting for a verdict, oldest first
        self._decided: OrderedDict[Key, _Flow] = OrderedDict()  # kept a while for late segments
        self._waiting: Counter[Share] = Counter()
        self._holding: Counter[Share] = Counter()
        self._turned_away: OrderedDict[Key, Verdict] = OrderedDict()
        self.later: list[Step] = []  # verdicts for flows evicted or timed out: the daemon takes them

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def held(self) -> int:
        return sum(self._holding.values())

    def syn(self, key: Key, isn: int, now: float, proxy: bool = False, tsval: int | None = None,
            shares: tuple[Share, ...] = UNKNOWN) -> None:
        """A SYN's copy: the flow's stream begins after ``isn``; ``shares``: whose it is. The same
        SYN again (a retransmission) changes nothing; another sequence number for a flow not yet
        decided makes its stream ambiguous, and it is refused. A decided flow's tuple may be used
        again by a new connection (conntrack made a new entry: only those SYNs are copied)."""
        flow = self._flows.get(key) or self._decided.get(key)
        if flow is not None and flow.isn == isn:
            return
        if flow is not None and flow.state in ("open", "tunnel") and now - flow.opened < SYN_SECONDS:
            # Two SYNs of one tracked connection, each with its own sequence number: the server
            # may have taken either, so ramfw cannot know where its stream begins.
            flow.conflict = True
            return
        self._forget(key)
        full = self._full(shares, WAITING)
        if full:
            self._turn_away(key, refused_share(key[2], f"{full} connections waiting for their first flight to be "
                                                       "read"))
            return
        self._turned_away.pop(key, None)
        self._flows[key] = _Flow(isn, Flight(isn, proxy), now, syn_tsval=tsval, shares=shares)
        for share in shares:
            self._waiting[share] += 1
        while len(self._flows) > self.max_flows:
            self._evict(now)

    def _full(self, shares: tuple[Share, ...], column: int) -> str:
        """The first of ``shares`` at its limit in ``column``, said ("" when none is)."""
        counts = self._holding if column == HOLDING else self._waiting
        for share in shares:
            limit = SHARE_LIMITS.get(share[0], SHARE_LIMITS["unknown"])[column]
            if counts[share] >= limit:
                return f"{self.share_text(share)} has {limit}"
        return ""

    def _turn_away(self, key: Key, verdict: Verdict) -> None:
        self._turned_away.pop(key, None)
        self._turned_away[key] = verdict
        while len(self._turned_away) > MAX_TURNED_AWAY:
            self._turned_away.popitem(last=False)

    def _evict(self, now: float) -> None:
        """The table is full: the oldest waiting flow of the share with the most goes, refused."""
        fattest = max((share for share in self._waiting if share[0] != "from"), key=self._waiting.__getitem__)
        key = next(k for k, flow in self._flows.items() if flow.shares[0] == fattest)
        flow = self._flows[key]
        verdict = refused_share(key[2], f"evicted: too many flows waiting ({self.share_text(fattest)} has the most)")
        if flow.held:
            self.later.append(self._decide(key, flow, verdict, now))
        else:
            self._forget(key)
            self._turn_away(key, verdict)

    def _forget(self, key: Key) -> None:
        self._decided.pop(key, None)
        flow = self._flows.pop(key, None)
        if flow is not None:
            self._release(flow)
            self._uncount(flow)

    def _uncount(self, flow: _Flow) -> None:
        for share in flow.shares:
            self._waiting[share] -= 1
            if not self._waiting[share]:
                del self._waiting[share]

    def _hold(self, flow: _Flow, packet_id: int) -> None:
        flow.held.append(packet_id)
        for share in flow.shares:
            self._holding[share] += 1

    def _release(self, flow: _Flow) -> list[int]:
        held, flow.held = flow.held, []
        for share in flow.shares:
            self._holding[share] -= len(held)
            if self._holding[share] <= 0:
                del self._holding[share]
        return held

    def segment(self, key: Key, seq: int, payload: bytes, packet_id: int, now: float, reset: bool = False,
                marks: Marks | None = None) -> Step:
        """One data segment of the client's direction, held in the queue as ``packet_id``;
        ``marks``: its header fields (``packet.marks``; None: not compared)."""
        flow = self._flows.get(key) or self._decided.get(key)
        if flow is None:
            flow = _Flow(-1, Flight(0), now, shares=())
            flow.held.append(packet_id)  # counted against no share: decided now
            verdict = self._turned_away.pop(key, None) or self.judge.unread(
                key[2], "its SYN was not seen: the flow began before the daemon, or the copy was lost")
            return self._decide(key, flow, verdict, now)
        if flow.state == "refused":
            return Step(key, reject=[packet_id])
        if reset:  # a reset's data is not the stream's; the flow ends at the server, or is refused here
            dropped = self._release(flow)
            self._forget(key)
            return Step(key, accept=[packet_id], drop=dropped)
        if flow.state in ("verifying", "allowed"):
            reason = _after_the_flight(flow, seq, payload) or flow.flight.stream.add(seq, payload)
            if reason is None:
                return Step(key, accept=[packet_id])
            self._hold(flow, packet_id)
            return self._decide(key, flow, self.judge.unread(key[2], reason), now, reason=reason)
        full = self._full(flow.shares, HOLDING)
        self._hold(flow, packet_id)
        if not flow.held_since or len(flow.held) == 1:
            flow.held_since = now
        if flow.conflict:
            return self._decide(key, flow, self.judge.unread(key[2], "two SYNs with different sequence numbers"), now)
        odd = _odd(flow, marks)
        if odd:
            return self._decide(key, flow, self.judge.unread(key[2], odd), now, reason=odd)
        if len(flow.held) > MAX_HELD:
            return self._decide(key, flow, self.judge.unread(key[2], f"more than {MAX_HELD} segments before the "
                                                                      "first flight was whole"), now)
        outcome = flow.flight.add(seq, payload)
        if isinstance(outcome, More) and full:  # a segment that completes its flight frees its share
            return self._decide(key, flow, refused_share(key[2], f"{full} segments held of first flights not yet "
                                                                 "whole"), now)
        if isinstance(outcome, More):
            return Step(key)
        if isinstance(outcome, Refused):
            return self._decide(key, flow, self.judge.unread(key[2], outcome.reason), now, reason=outcome.reason)
        assert isinstance(outcome, Name)
        if flow.flight.proxy and flow.state == "open":
            verdict = self.judge.connect(outcome.name, key[2])
            if verdict.allow:  # the tunnel's ClientHello comes once the proxy answered
                flow.state, flow.connect, flow.marks = "tunnel", outcome.name, None  # the proxy's answer is acked
                flow.held_since = 0.0
                return Step(key, accept=self._release(flow), verdict=verdict)
        elif flow.flight.proxy:
            verdict = self.judge.tunnel(outcome.name, flow.connect, key[2])
        else:
            verdict = self.judge.hello(outcome.name, key[2])
        return self._decide(key, flow, verdict, now, end=outcome.end)

    def _decide(self, key: Key, flow: _Flow, verdict: Verdict, now: float, reason: str = "",
                end: int | None = None) -> Step:
        """``end``: where the flight just read ends (its verdict waits for the server's acknowledgment)."""
        held = self._release(flow)
        flow.decided = now
        if verdict.allow and end is not None and not self.audit:
            flow.state, flow.end = "verifying", end
            return Step(key, accept=held, verdict=verdict)
        self._settle(key, flow)
        if verdict.allow or self.audit:
            flow.state = "allowed"
            return Step(key, accept=held, mark="allow", verdict=verdict, reason=reason)
        flow.state = "refused"
        return Step(key, drop=held[:-1], reject=held[-1:], mark="refuse", verdict=verdict, reason=reason)

    def _settle(self, key: Key, flow: _Flow) -> None:
        """A flow decided for the kernel: no longer waiting (nor counted), kept a while."""
        if self._flows.pop(key, None) is flow:
            self._uncount(flow)
        self._decided.pop(key, None)
        self._decided[key] = flow
        while len(self._decided) > self.max_flows:
            self._decided.popitem(last=False)

    def expire(self, now: float) -> list[Step]:
        """Refuse the flows whose first flight did not come whole in time; forget the decided
        ones after a while, and SYNs that sent nothing. Returns the verdicts to give (with
        those of evicted flows)."""
        steps, self.later = self.later, []
        for key, flow in list(self._flows.items()):
            if flow.state == "verifying" and now - flow.decided > VERIFY_SECONDS:
                steps.append(self._decide(key, flow, self.judge.unread(
                    key[2], f"the server did not take the first flight within {VERIFY_SECONDS:g} s"), now))
            elif flow.held and now - flow.held_since > HOLD_SECONDS:
                steps.append(self._decide(key, flow, self.judge.unread(
                    key[2], f"the first flight did not come whole within {HOLD_SECONDS:g} s"), now))
            elif flow.state in ("open", "tunnel") and not flow.held and now - flow.opened > SYN_SECONDS:
                # refused, not just forgotten: a flow whose first segment went to the queue and was
                # dropped unread carries both mark bits, which a later daemon would take for one
                # that passed while none ran (review)
                self._forget(key)
                steps.append(Step(key, mark="refuse"))
        while self._decided and now - next(iter(self._decided.values())).decided > LINGER_SECONDS:
            self._decided.popitem(last=False)
        return steps

    def waiting(self) -> list[Key]:
        """The flows not yet decided for the kernel: being read, or verified."""
        return list(self._flows)

    def known(self, key: Key) -> bool:
        return key in self._flows or key in self._decided

    def server_ack(self, key: Key, ack: int, now: float) -> Step | None:
        """A copy of a server's packet to the flow ``key`` (the client's tuple), acknowledging up
        to ``ack``: once that covers the accepted flight, the flow is allowed for the kernel."""
        flow = self._flows.get(key)
        if flow is None or flow.state != "verifying":
            return None
        taken = (ack - flow.flight.stream.base) & MASK
        if taken < flow.end or taken >= 1 << 31:
            return None
        flow.state, flow.decided = "allowed", now
        self._settle(key, flow)
        return Step(key, mark="allow")


def _after_the_flight(flow: _Flow, seq: int, payload: bytes) -> str:
    """Why a segment of a flow whose first flight was read is not that stream's ("" when it
    is): it begins before the stream, past what was read while the server has not taken it
    (a TLS client sends nothing more before the server's answer, which acknowledges the
    flight), or after a gap once it has. Such a segment is a new connection's on the same
    tuple whose SYN went unseen (review: it was let through unread)."""
    stream = flow.flight.stream
    offset = (seq - stream.base) & MASK
    if offset >= 1 << 31:
        return "a segment before the stream's start"
    if flow.state == "verifying" and offset + len(payload) > flow.end:
        return "data past the first flight before the server took it"
    if offset > stream.extent:
        return "a segment past a gap after the first flight"
    return ""


def _odd(flow: _Flow, marks: Marks | None) -> str:
    """Why a segment may not reach the server's TCP as it reaches ramfw ("" when nothing says
    so, or no ``marks`` were given): urgent data, another TTL, acknowledgment or timestamp
    presence than the flight's first segment, a timestamp older than the SYN's."""
    if marks is None:
        return ""
    if marks.urgent:
        return "urgent data (the server would take it out of the stream)"
    if flow.syn_tsval is not None and marks.tsval is not None and (marks.tsval - flow.syn_tsval) & MASK >= 1 << 31:
        return "a timestamp older than the SYN's (the server would drop it)"
    first = flow.marks = flow.marks or marks
    if (first.ttl, first.ack, first.tsval is None) != (marks.ttl, marks.ack, marks.tsval is None):
        return "segments that differ in TTL, acknowledgment or timestamps (the server may not take them all)"
    return ""
