"""A flow's client bytes put back in order from TCP segments, and what its first flight says.

The stream begins at the byte after the SYN's sequence number (the SYN is seen first: its
copy comes before any data can). Segments come in any order and may overlap: a byte seen twice
must be the same both times, or the flow is refused, since a server may keep either copy
(RFC 793 leaves it open, and stacks differ: the classic way to show a firewall one name and the
server another). Only the first ``limit`` bytes are kept; nothing past them is needed.
"""

from __future__ import annotations

from .hello import HEADER, MAX_CONNECT, MAX_RECORD, More, Name, Outcome, Refused, read_connect, read_hello

MASK = 0xFFFFFFFF
DISAGREE = "overlapping segments disagree"
BEYOND = "too large: data past the largest first flight"


class Stream:
    """The bytes from the stream's first (``isn + 1``) onwards, as far as ``limit``."""

    def __init__(self, isn: int, limit: int):
        self.base = (isn + 1) & MASK
        self.limit = limit
        self.data = bytearray()
        self.spans: list[tuple[int, int]] = []  # what is held: sorted, disjoint, not touching

    def add(self, seq: int, payload: bytes) -> str | None:
        """Put one segment in; a refusal's reason when it disagrees with what is held, or
        begins past ``limit``. Bytes before the stream's start (a SYN's sequence number) are
        cut off, as the server's TCP cuts them."""
        offset = (seq - self.base) & MASK
        if offset >= 1 << 31:
            skip = (self.base - seq) & MASK
            if skip >= len(payload):
                return None
            payload, offset = payload[skip:], 0
        if not payload:
            return None
        if offset >= self.limit:
            return BEYOND
        end = min(offset + len(payload), self.limit)
        piece = payload[: end - offset]
        for start, stop in self.spans:
            low, high = max(start, offset), min(stop, end)
            if low < high and self.data[low:high] != piece[low - offset : high - offset]:
                return DISAGREE
        if len(self.data) < end:
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = piece
        self._cover(offset, end)
        return None

    def _cover(self, start: int, stop: int) -> None:
        spans = []
        for low, high in self.spans:
            if high < start or low > stop:
                spans.append((low, high))
            else:
                start, stop = min(low, start), max(high, stop)
        spans.append((start, stop))
        self.spans = sorted(spans)

    def prefix(self) -> bytes:
        """The bytes held in order from the start, up to the first gap."""
        if not self.spans or self.spans[0][0] != 0:
            return b""
        return bytes(self.data[: self.spans[0][1]])

    @property
    def extent(self) -> int:
        """One past the last byte held (0: none)."""
        return self.spans[-1][1] if self.spans else 0


class Flight:
    """What a flow's client says first: a TLS ClientHello; through an HTTP proxy, a CONNECT
    request, then (once the proxy has answered) the ClientHello it sends through the tunnel."""

    def __init__(self, isn: int, proxy: bool = False):
        self.stream = Stream(isn, (MAX_CONNECT if proxy else 0) + HEADER + MAX_RECORD)
        self.proxy = proxy
        self.connect: Name | None = None  # the proxy's CONNECT request, once read

    @property
    def start(self) -> int:
        """Where the ClientHello begins in the stream."""
        return self.connect.end if self.connect is not None else 0

    def add(self, seq: int, payload: bytes) -> Outcome:
        reason = self.stream.add(seq, payload)
        return Refused(reason) if reason else self.outcome()

    def outcome(self) -> Outcome:
        """``More``, or the name of the message now read (a CONNECT's host, or the ClientHello's
        server name), or a refusal. A CONNECT's data must wait for the proxy's answer: bytes
        already sent after the request are refused (a pipelined request could name another host)."""
        data = self.stream.prefix()
        if self.proxy and self.connect is None:
            found = read_connect(data)
            if isinstance(found, Name):
                if self.stream.extent > found.end:
                    return Refused("data sent after the CONNECT request, before the proxy answered")
                self.connect = found
            return found
        found = read_hello(data[self.start :])
        if isinstance(found, More):
            return More(found.wanted + self.start)
        if isinstance(found, Name):
            return Name(found.name, found.end + self.start)
        return found
