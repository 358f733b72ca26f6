"""The flows whose first flight is being read: their segments held until it is whole, then one
verdict for all of them. Pure: time is a parameter, packets are the queue's ids.

A flow is known from its SYN (``syn``: its sequence number is where the stream begins). Each
data segment (``segment``) is held, not released: no byte of a first flight reaches the server
before the flight was read whole and judged. Then every held segment is accepted, or the flow
is refused (all dropped but the last, which the kernel answers with a reset). Bounded: 64
segments per flow, 2 s to complete a first flight, 8192 flows (the oldest go first, refused).

An accepted flight is not the end: the server's TCP may not take what ramfw read (a segment
that dies on the way, or that it drops: an ACK of data it never sent, an old timestamp), and the
client could then send other bytes for the same place. So the flow stays marked, every segment
of its client still read and compared, until the server acknowledges the whole flight
(``server_ack``, from copies of its packets); only then is it ``allowed`` for the kernel. A
server that does not within 3 s has not taken it: the flow is refused.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from .hello import More, Name, Refused
from .judge import Verdict
from .packet import Marks
from .stream import MASK, Flight

HOLD_SECONDS = 2.0  # a first flight not whole this long after its first segment is refused
SYN_SECONDS = 60.0  # a SYN whose flow sends nothing this long is forgotten
LINGER_SECONDS = 5.0  # a decided flow is kept this long, for the segments queued before its mark changed
VERIFY_SECONDS = 3.0  # the server acknowledges an accepted first flight within this, or the flow is refused
MAX_FLOWS = 8192
MAX_HELD = 64

Key = tuple[str, int, str, int]  # source, source port, destination, destination port


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


class Flows:
    def __init__(self, judge: Judge, audit: bool = False, max_flows: int = MAX_FLOWS):
        self.judge = judge
        self.audit = audit  # refusals are decided and said, and the flow passes
        self.max_flows = max_flows
        self._flows: OrderedDict[Key, _Flow] = OrderedDict()
        self.later: list[Step] = []  # verdicts for flows evicted or timed out: the daemon takes them

    def __len__(self) -> int:
        return len(self._flows)

    @property
    def held(self) -> int:
        return sum(len(f.held) for f in self._flows.values())

    def syn(self, key: Key, isn: int, now: float, proxy: bool = False, tsval: int | None = None) -> None:
        """A SYN's copy: the flow's stream begins after ``isn``. The same SYN again (a
        retransmission) changes nothing; another sequence number for a flow not yet decided
        makes its stream ambiguous, and it is refused. A decided flow's tuple may be used again
        by a new connection (conntrack made a new entry: only those SYNs are copied)."""
        flow = self._flows.get(key)
        if flow is not None and flow.isn == isn:
            return
        if flow is not None and flow.state in ("open", "tunnel") and now - flow.opened < SYN_SECONDS:
            # Two SYNs of one tracked connection, each with its own sequence number: the server
            # may have taken either, so ramfw cannot know where its stream begins.
            flow.conflict = True
            return
        self._flows.pop(key, None)
        self._flows[key] = _Flow(isn, Flight(isn, proxy), now, syn_tsval=tsval)
        while len(self._flows) > self.max_flows:
            old_key, old = self._flows.popitem(last=False)
            if old.held:
                self.later.append(self._decide(old_key, old, self.judge.unread(old_key[2], "evicted: too many "
                                                                                "flows waiting"), now))

    def segment(self, key: Key, seq: int, payload: bytes, packet_id: int, now: float, reset: bool = False,
                marks: Marks | None = None) -> Step:
        """One data segment of the client's direction, held in the queue as ``packet_id``;
        ``marks``: its header fields (``packet.marks``; None: not compared)."""
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = _Flow(-1, Flight(0), now)
            flow.held.append(packet_id)
            return self._decide(key, flow, self.judge.unread(key[2], "its SYN was not seen: the flow began "
                                                                      "before the daemon, or the copy was lost"), now)
        if flow.state == "refused":
            return Step(key, reject=[packet_id])
        if reset:  # a reset's data is not the stream's; the flow ends at the server, or is refused here
            dropped, flow.held = flow.held, []
            self._flows.pop(key, None)
            return Step(key, accept=[packet_id], drop=dropped)
        if flow.state in ("verifying", "allowed"):
            reason = flow.flight.stream.add(seq, payload)
            if reason is None:
                return Step(key, accept=[packet_id])
            flow.held.append(packet_id)
            return self._decide(key, flow, self.judge.unread(key[2], reason), now, reason=reason)
        flow.held.append(packet_id)
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
        if isinstance(outcome, More):
            return Step(key)
        if isinstance(outcome, Refused):
            return self._decide(key, flow, self.judge.unread(key[2], outcome.reason), now, reason=outcome.reason)
        assert isinstance(outcome, Name)
        if flow.flight.proxy and flow.state == "open":
            verdict = self.judge.connect(outcome.name, key[2])
            if verdict.allow:  # the tunnel's ClientHello comes once the proxy answered
                flow.state, flow.connect, flow.marks = "tunnel", outcome.name, None  # the proxy's answer is acked
                accepted, flow.held, flow.held_since = flow.held, [], 0.0
                return Step(key, accept=accepted, verdict=verdict)
        elif flow.flight.proxy:
            verdict = self.judge.tunnel(outcome.name, flow.connect, key[2])
        else:
            verdict = self.judge.hello(outcome.name, key[2])
        return self._decide(key, flow, verdict, now, end=outcome.end)

    def _decide(self, key: Key, flow: _Flow, verdict: Verdict, now: float, reason: str = "",
                end: int | None = None) -> Step:
        """``end``: where the flight just read ends (its verdict waits for the server's acknowledgment)."""
        held, flow.held = flow.held, []
        flow.decided = now
        if verdict.allow and end is not None and not self.audit:
            flow.state, flow.end = "verifying", end
            return Step(key, accept=held, verdict=verdict)
        if verdict.allow or self.audit:
            flow.state = "allowed"
            return Step(key, accept=held, mark="allow", verdict=verdict, reason=reason)
        flow.state = "refused"
        return Step(key, drop=held[:-1], reject=held[-1:], mark="refuse", verdict=verdict, reason=reason)

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
            elif flow.state in ("allowed", "refused") and now - flow.decided > LINGER_SECONDS:
                del self._flows[key]
            elif flow.state in ("open", "tunnel") and not flow.held and now - flow.opened > SYN_SECONDS:
                del self._flows[key]
        return steps

    def known(self, key: Key) -> bool:
        return key in self._flows

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
        return Step(key, mark="allow")


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
