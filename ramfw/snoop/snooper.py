"""What DNS replies teach: the daemon's pure core.

``Snooper.on_packet(packet, now)`` takes the bytes the queue hands up (IP header onwards) and
returns a ``Decision``: the verdict, and the elements to program before the reply is released.
Nothing here does I/O. A packet it cannot read is released and counted; the daemon catches
whatever a bug lets escape, and still gives the packet its verdict.

Most replies on a developer's machine are for names that are not allowlisted. For those the
hold path reads only the question name (a few label lengths), keeps a reference to the reply
and releases it; ``index_unread``, run after the verdicts, reads their addresses into the
address->name map that names blocked destinations. No reply is kept once read.
"""

from __future__ import annotations

import logging
import struct
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field

import dns.exception
import dns.message
import dns.rdata
import dns.rdatatype
import dns.rdtypes.svcbbase

from ..config import DnsSettings
from ..policy import Policy
from .packet import TCP_FIN, TCP_RST, TCP_SYN, UDP, Segment, parse_packet
from .wire import fast_chain, question

log = logging.getLogger("ramfw")
MAX_TCP_FLOWS = 4096
NAMES_BYTES = 4 << 20  # the address->name map for block messages (text, plus ENTRY_BYTES each)
ENTRY_BYTES = 160  # what Python's objects cost per entry of that map, beyond the text
NAMES_PER_ADDRESS = 3  # the names kept per address in that map
UNREAD_BYTES = 1 << 20  # replies for other names waiting to be indexed (one burst, normally)
TCP_BYTES = 8 << 20  # the TCP flows' unread data together: the oldest flows go first
MAX_QUERIES = 16384  # outstanding UDP queries for allowlisted names, to pair replies with
QUERY_SECONDS = 15.0  # a query unanswered this long is forgotten (stubs retry within 5 s)
_ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)
_HINT_TYPES = (dns.rdatatype.HTTPS, dns.rdatatype.SVCB)


@dataclass(frozen=True)
class Element:
    """An address to allow for ``timeout`` seconds; ``name`` is kept as the element's comment."""

    address: str
    timeout: int
    name: str = ""


@dataclass
class Decision:
    accept: bool = True
    elements: list[Element] = field(default_factory=list)


@dataclass
class _Flow:
    next_seq: int
    buffer: bytearray = field(default_factory=bytearray)


def timeout_for(ttl: int, settings: DnsSettings) -> int:
    """Element timeout: the TTL clamped to [ttl_min, ttl_max], plus the grace period."""
    return min(max(ttl, settings.ttl_min), settings.ttl_max) + settings.ttl_grace


class Snooper:
    """What DNS replies from trusted resolvers teach about allowlisted names."""

    def __init__(self, policy: Policy, trusted: set[str], settings: DnsSettings):
        self.policy = policy
        self.trusted = set(trusted)
        self.settings = settings
        self.counters: Counter[str] = Counter()
        self.learned: dict[str, dict[str, float]] = {}  # name -> address -> expiry time
        self.total = 0
        self._forced_expiry = 0.0
        self.address_names: OrderedDict[str, str] = OrderedDict()  # for block messages
        self.caps_hit: deque[str] = deque(maxlen=20)
        self._unread: deque[tuple[str, bytes]] = deque()  # (question name, reply) for other names
        self._unread_bytes = 0
        self._names_bytes = 0
        self._flows: OrderedDict[tuple, _Flow] = OrderedDict()
        self._flow_bytes = 0
        # (client, port, resolver, ID + question type and class) -> (question name, when): queries to answer
        self._queries: OrderedDict[tuple[str, int, str, bytes], tuple[str, float]] = OrderedDict()
        # Set by the daemon where the kernel pairs UDP replies with their queries (the
        # prefilter's pairing): a held reply answered one; a copied one did not.
        self.kernel_pairs = False

    def seed(self, learned, now: float) -> None:
        """What the kernel still allows (``table.learned()``: its elements, with their names and
        expiry), for a restarted daemon."""
        for item in learned:
            if item.name:
                self.learned.setdefault(item.name, {})[item.address] = now + item.expires
                self.total += 1

    def on_packet(self, packet: bytes, now: float, held: bool = False) -> Decision:
        """A reply (``held``, or copied), or a copied UDP query to a trusted resolver."""
        segment = parse_packet(packet)
        if segment is not None and segment.proto == UDP and segment.dport == 53 and segment.dst in self.trusted:
            asked = question(segment.payload, response=False)
            if asked is not None:
                self._on_query(segment, *asked, now)
                return Decision()
        if segment is None or segment.sport != 53:
            self.counters["malformed"] += 1
            return Decision()
        if segment.src not in self.trusted:
            self.counters["untrusted"] += 1
            return Decision()
        if segment.proto == UDP:
            return self._on_message(segment.payload, now, segment, held)
        return self._on_tcp(segment, now)

    def _on_query(self, segment: Segment, name: str, kind: bytes, now: float) -> None:
        """Remember a query for an allowlisted name until its reply comes (or QUERY_SECONDS),
        by client, port, resolver, ID, and the question's type and class (an A and an AAAA
        query may share an ID)."""
        self.counters["queries"] += 1
        if not self.policy.enabled or self.policy.allows(name) is None:
            return
        key = (segment.src, segment.sport, segment.dst, segment.payload[:2] + kind)
        self._queries.pop(key, None)
        self._queries[key] = (name, now)
        while self._queries and (len(self._queries) > MAX_QUERIES
                                 or next(iter(self._queries.values()))[1] < now - QUERY_SECONDS):
            self._queries.popitem(last=False)

    def _answers_a_query(self, segment: Segment, id_and_kind: bytes, name: str, now: float) -> bool:
        """Whether a UDP reply answers a query this VM sent: to the port it came from, from the
        resolver it went to, with its ID and its question. Each query is answered once."""
        key = (segment.dst, segment.dport, segment.src, id_and_kind)
        asked = self._queries.get(key)
        if asked is None or asked[0] != name or now - asked[1] > QUERY_SECONDS:
            return False  # a reply for another question leaves the query to its real answer
        del self._queries[key]
        return True

    def _on_tcp(self, segment: Segment, now: float) -> Decision:
        """Reassemble a flow's messages. A FIN ends the flow only after its segment's data is
        read (a reply's last segment often carries it), and only when it is in order: the data
        still missing before it comes again. A reset's data never reaches the client: unread."""
        key = (segment.src, segment.sport, segment.dst, segment.dport)
        if segment.flags & TCP_RST:
            self._drop_flow(key)
            return Decision()
        if segment.flags & TCP_SYN:
            self._drop_flow(key)
            self._flows[key] = _Flow((segment.seq + 1) & 0xFFFFFFFF)
            self._trim_flows()
            return Decision()
        flow = self._flows.get(key)
        if flow is None:
            if segment.payload:
                self.counters["tcp_unsynced"] += 1  # began before the daemon: cannot frame it
            return Decision()
        ahead = (segment.seq - flow.next_seq) & 0xFFFFFFFF
        if ahead and ahead < 0x80000000:
            if not segment.payload:
                return Decision()
            # Out of order: drop it so the server sends it again in order. Passing it would
            # let the client assemble a message ramfw never read whole.
            self.counters["tcp_out_of_order"] += 1
            return Decision(accept=False)
        behind = (flow.next_seq - segment.seq) & 0xFFFFFFFF
        fresh = segment.payload[behind:] if behind < len(segment.payload) else b""
        flow.buffer += fresh
        self._flow_bytes += len(fresh)
        flow.next_seq = (flow.next_seq + len(fresh)) & 0xFFFFFFFF
        self._flows.move_to_end(key)
        decision = Decision()
        while len(flow.buffer) >= 2:
            length = struct.unpack_from("!H", flow.buffer)[0]
            if len(flow.buffer) < 2 + length:
                break
            message = bytes(flow.buffer[2 : 2 + length])
            del flow.buffer[: 2 + length]
            self._flow_bytes -= 2 + length
            decision.elements += self._on_message(message, now).elements
        if segment.flags & TCP_FIN:
            self._drop_flow(key)
        self._trim_flows()
        return decision

    def _keep(self, name: str, wire: bytes) -> None:
        """Keep a reply for ``index_unread`` (the hold path only appends); past UNREAD_BYTES the
        oldest go unread (counted: their addresses are then named only if seen again)."""
        self._unread.append((name, wire))
        self._unread_bytes += len(wire)
        while self._unread_bytes > UNREAD_BYTES:
            self._unread_bytes -= len(self._unread.popleft()[1])
            self.counters["unindexed"] += 1

    def index_unread(self) -> int:
        """Read the kept replies' addresses into ``address_names`` and let the replies go; the
        daemon runs it after the verdicts, and before naming a blocked destination. Returns
        how many replies were read."""
        count = len(self._unread)
        while self._unread:
            name, wire = self._unread.popleft()
            chain = fast_chain(wire)  # A/AAAA only: a name seen only in HTTPS hints stays unnamed
            for address in chain[0] if chain is not None else ():
                self._remember(address, name)
        self._unread_bytes = 0
        return count

    def _drop_flow(self, key: tuple) -> None:
        flow = self._flows.pop(key, None)
        if flow is not None:
            self._flow_bytes -= len(flow.buffer)

    def _trim_flows(self) -> None:
        """At most MAX_TCP_FLOWS flows and TCP_BYTES of unread data: the oldest go (their
        replies then pass unread: nothing learned, fail closed)."""
        while self._flows and (len(self._flows) > MAX_TCP_FLOWS or self._flow_bytes > TCP_BYTES):
            _, flow = self._flows.popitem(last=False)
            self._flow_bytes -= len(flow.buffer)
            self.counters["tcp_evicted"] += 1

    def _on_message(self, wire: bytes, now: float, segment: Segment | None = None, held: bool = False) -> Decision:
        """One DNS message: over UDP (``segment``), it teaches only if it answers a query (where
        the kernel pairs, a reply it held did; one it let through did not)."""
        self.counters["replies"] += 1
        asked = question(wire)
        if asked is None:
            self.counters["malformed"] += 1
            return Decision()
        name, kind = asked
        entry = self.policy.allows(name) if self.policy.enabled else None
        if entry is None:
            self.counters["other_names"] += 1
            self._keep(name, wire)
            return Decision()
        if segment is not None and self.settings.pair_queries and not (
                held if self.kernel_pairs else self._answers_a_query(segment, wire[:2] + kind, name, now)):
            self.counters["unmatched"] += 1  # forged, late, a duplicate, or its query was not seen
            return Decision()
        return Decision(elements=self._learn(wire, name, now))

    def _learn(self, wire: bytes, name: str, now: float) -> list[Element]:
        fast = fast_chain(wire)
        if fast is not None:
            addresses, ttl = fast
            return self._admit(name, addresses, timeout_for(ttl, self.settings), now) if addresses else []
        try:
            message = dns.message.from_wire(wire, ignore_trailing=True)
            if not isinstance(message, dns.message.QueryMessage):  # another opcode (UPDATE, NOTIFY...)
                raise dns.exception.FormError("not the reply to a query")
            result = message.resolve_chaining()
        except (dns.exception.DNSException, ValueError, TypeError, IndexError, struct.error):
            self.counters["malformed"] += 1
            return []
        addresses = []
        if result.answer is not None:
            for rdata in result.answer:
                if rdata.rdtype in _ADDRESS_TYPES:
                    addresses.append(rdata.address)
                elif rdata.rdtype in _HINT_TYPES:
                    for key in ("ipv4hint", "ipv6hint"):
                        hint = rdata.params.get(dns.rdtypes.svcbbase.ParamKey.make(key))
                        addresses += list(hint.addresses) if hint is not None else []
        if not addresses:
            return []
        timeout = timeout_for(result.minimum_ttl, self.settings)
        return self._admit(name, addresses, timeout, now)

    def _admit(self, name: str, addresses: list[str], timeout: int, now: float) -> list[Element]:
        """Apply the per-name and total caps; remember what is programmed."""
        if self.total + len(addresses) > self.settings.max_addresses and now >= self._forced_expiry:
            self._forced_expiry = now + 1  # near the cap: sweep now, but at most once a second
            self.expire(now, remember=False)
        known = self.learned.setdefault(name, {})
        expired = [a for a, expiry in known.items() if expiry <= now]
        for address in expired:
            del known[address]
        self.total -= len(expired)
        elements = []
        for address in addresses:
            if address not in known:
                if len(known) >= self.settings.max_addresses_per_name:
                    self._cap(f"{name}: more than {self.settings.max_addresses_per_name} addresses")
                    continue
                if self.total >= self.settings.max_addresses:
                    self._cap(f"the allowed sets are full ({self.settings.max_addresses} addresses)")
                    continue
                self.total += 1
            known[address] = now + timeout
            elements.append(Element(address, timeout, name))
        self.counters["learned"] += len(elements)
        return elements

    def expire(self, now: float, remember: bool = True) -> int:
        """Forget the addresses the kernel has expired (their element timeouts run on the same
        clock as ``learned``), and names left with none; return how many were released. Run
        by housekeeping, and when the total cap is near: a cap frees itself, it never fills
        up for good. ``remember``: a block to an expired address still names it (not near the
        cap, where it runs while a reply is held)."""
        released = 0
        for name in list(self.learned):
            known = self.learned[name]
            gone = [address for address, expiry in known.items() if expiry <= now]
            for address in gone:
                del known[address]
                if remember:
                    self._remember(address, name)
            released += len(gone)
            if not known:
                del self.learned[name]
        self.total -= released
        return released

    def _cap(self, what: str) -> None:
        self.counters["capped"] += 1
        if not self.caps_hit or self.caps_hit[-1] != what:
            self.caps_hit.append(what)
            log.warning("cap reached, address not allowed: %s", what)

    def _remember(self, address: str, name: str) -> None:
        """The names this address was last given for (up to ``NAMES_PER_ADDRESS``, the latest
        first, space-separated: a CDN edge answers for many); the least recently seen addresses
        go past NAMES_BYTES."""
        old = self.address_names.pop(address, None)
        if old is not None:
            self._names_bytes -= len(address) + len(old) + ENTRY_BYTES
            name = " ".join([name] + [n for n in old.split(" ") if n != name][:NAMES_PER_ADDRESS - 1])
        self.address_names[address] = name
        self._names_bytes += len(address) + len(name) + ENTRY_BYTES
        while self._names_bytes > NAMES_BYTES:
            gone, gone_name = self.address_names.popitem(last=False)
            self._names_bytes -= len(gone) + len(gone_name) + ENTRY_BYTES

    def forget(self, now: float) -> dict[str, list[str]]:
        """Names no longer allowed by the current policy and their addresses (for a reload)."""
        gone = {}
        for name in list(self.learned):
            if not self.policy.enabled or self.policy.allows(name) is None:
                addresses = self.learned.pop(name)
                self.total -= len(addresses)
                gone[name] = [a for a, expiry in addresses.items() if expiry > now]
        return gone

    def names_of(self, address: str) -> list[str]:
        """The names this VM last resolved to ``address``, the latest first (Hubble's
        ``destination_names``)."""
        if address in self.address_names:
            return self.address_names[address].split(" ")
        return [name for name, known in self.learned.items() if address in known][:NAMES_PER_ADDRESS]

    def block_message(self, address: str) -> str:
        self.index_unread()
        names = self.names_of(address)
        return self.message_for(address, names, self.block_reason(names))

    @staticmethod
    def message_for(address: str, names: list[str], reason: str) -> str:
        """The block message for ``address``, from the names and reason its event carries."""
        if not names:
            return f"registry access to {address} is not allowed (no DNS name was seen for it)"
        if reason == "address_not_learned":
            return (f"registry access to {names[0]} is not allowed at {address} now (allowlisted, but that address "
                    "is not learned: its lookup expired, or no trusted resolver gave it)")
        return f"registry access to {names[0]} is not allowed"

    def block_reason(self, names: list[str]) -> str:
        """Why a connection to an address with these names was refused (a stable word)."""
        if not names:
            return "no_name_seen"  # a hard-coded address, /etc/hosts, or a lookup ramfw did not see
        if self.policy.enabled and self.policy.allows(names[0]) is not None:
            return "address_not_learned"  # allowlisted, but not (now) allowed: expired, or an untrusted answer
        return "not_allowlisted"


def warm_up() -> None:
    """Import dnspython's lazily loaded record classes now, not while the first reply is held."""
    for rdtype in ("A", "AAAA", "CNAME", "HTTPS", "SVCB"):
        query = dns.message.make_query("warm-up.invalid", rdtype)
        dns.message.from_wire(dns.message.make_response(query).to_wire()).resolve_chaining()
    dns.rdata.from_text("IN", "A", "192.0.2.1")
    dns.rdata.from_text("IN", "AAAA", "2001:db8::1")
    dns.rdata.from_text("IN", "CNAME", "warm-up.invalid.")
    dns.rdata.from_text("IN", "HTTPS", '1 . ipv4hint="192.0.2.1" ipv6hint="2001:db8::1"')
