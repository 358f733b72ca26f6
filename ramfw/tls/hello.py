"""A TLS ClientHello record and an HTTP proxy's CONNECT request, read by hand.

By hand because no library reads a ClientHello it did not make: Python's ``ssl`` (OpenSSL) only
reads one inside a server handshake, which answers; ``cryptography`` has no TLS parser. What is
read here is small and fixed by RFC 8446 (4.1.2, 4.2) and RFC 6066 (3): a record header, the
ClientHello's fixed fields, and the extension list. Everything else is refused, never guessed:
a server may read an ambiguous ClientHello otherwise than ramfw did.

Each reader takes the bytes of a flow's client direction from its first byte (as much as is in
order so far) and says ``More`` (how many bytes it needs at least), ``Name`` (the host name,
canonical, and where the message ended) or ``Refused`` (why it cannot be checked).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from ..policy.names import canonical, is_address

MAX_RECORD = 1 << 14  # a TLS plaintext record's largest length (RFC 8446 5.1); a ClientHello is never encrypted
HEADER = 5
MAX_CONNECT = 4096  # an HTTP CONNECT request with its headers
SERVER_NAME, ECH = 0x0000, 0xFE0D
HANDSHAKE, CLIENT_HELLO, HOST_NAME = 0x16, 1, 0

NOT_TLS = "not TLS"
NO_SERVER_NAME = "no server_name"
ENCRYPTED = "encrypted client hello (0xfe0d)"
MALFORMED = "malformed"
TOO_LARGE = "too large"
NOT_CONNECT = "not an HTTP CONNECT request"
_EXTENSION = struct.Struct("!HH")  # an extension's type and length
_NAME = re.compile(rb"[A-Za-z0-9_-]{1,63}(?:\.[A-Za-z0-9_-]{1,63})*\.?\Z")


@dataclass(frozen=True)
class More:
    """Not enough bytes yet: at least ``wanted`` are needed, counted from the stream's start."""

    wanted: int


@dataclass(frozen=True)
class Name:
    """The host name asked for (canonical: lower case, no trailing dot); the message ends at
    ``end``; ``port``: a CONNECT request's."""

    name: str
    end: int
    port: int = 0


@dataclass(frozen=True)
class Refused:
    reason: str

    @property
    def kind(self) -> str:
        """The reason without its detail: what counters count."""
        return self.reason.split(":", 1)[0]


Outcome = More | Name | Refused


def _malformed(detail: str) -> Refused:
    return Refused(f"{MALFORMED}: {detail}")


def host_name(raw: bytes) -> str | None:
    """A host name as DNS names are compared (``policy.names.canonical``), or None when it is
    not one: letters, digits, hyphens and underscores in labels of 1 to 63, 253 at most."""
    if not _NAME.match(raw) or len(raw.rstrip(b".")) > 253:
        return None
    return canonical(raw.decode("ascii"))


def read_hello(data: bytes) -> Outcome:
    """The first TLS record of a client's stream: a ClientHello, whole, in one record."""
    if data[:1] and data[0] != HANDSHAKE:
        return Refused(NOT_TLS)
    if len(data) >= 2 and data[1] != 3 or len(data) >= 3 and data[2] > 4:
        return Refused(NOT_TLS)
    if len(data) < HEADER:
        return More(HEADER)
    length = int.from_bytes(data[3:5], "big")
    if length > MAX_RECORD:
        return Refused(f"{TOO_LARGE}: a record of {length} bytes (at most {MAX_RECORD})")
    if len(data) < HEADER + length:
        return More(HEADER + length)
    body = data[HEADER : HEADER + length]
    if len(body) < 4 or body[0] != CLIENT_HELLO:
        return _malformed("the first handshake message is not a ClientHello")
    size = int.from_bytes(body[1:4], "big")
    if 4 + size > len(body):
        return _malformed("a ClientHello split across records")
    if 4 + size < len(body):
        return _malformed("more than the ClientHello in its record")
    found = _extensions(body[4:])
    if isinstance(found, Refused):
        return found
    return Name(found, HEADER + length)


def _extensions(hello: bytes) -> str | Refused:
    """The server name of a ClientHello's body (RFC 8446 4.1.2), or why there is none to check."""
    at = 2 + 32  # legacy_version, random
    if len(hello) < at + 1 or hello[0] != 3:
        return _malformed("short, or not a TLS version")
    for what, width, least in (("session id", 1, 0), ("cipher suites", 2, 2), ("compression methods", 1, 1)):
        if len(hello) < at + width:
            return _malformed(f"cut in its {what}")
        n = int.from_bytes(hello[at : at + width], "big")
        if n < least or (what == "session id" and n > 32) or (what == "cipher suites" and n % 2):
            return _malformed(f"its {what} have a bad length ({n})")
        at += width + n
        if at > len(hello):
            return _malformed(f"cut in its {what}")
    if at == len(hello):
        return Refused(NO_SERVER_NAME)  # no extensions at all
    if at + 2 > len(hello) or at + 2 + int.from_bytes(hello[at : at + 2], "big") != len(hello):
        return _malformed("the extensions' length does not match the ClientHello's")
    at, end = at + 2, len(hello)
    seen, name, encrypted = set(), None, False
    while at < end:  # on the hold path: one unpack per extension, and only the server name sliced
        if at + 4 > end:
            return _malformed("an extension cut short")
        kind, n = _EXTENSION.unpack_from(hello, at)
        at += 4 + n
        if at > end:
            return _malformed("an extension cut short")
        if kind in seen:
            return _malformed(f"extension {kind:#06x} twice")
        seen.add(kind)
        if kind == ECH:
            encrypted = True
        elif kind == SERVER_NAME:
            name = _server_name(hello[at - n : at])
            if isinstance(name, Refused):
                return name
    if encrypted:
        return Refused(ENCRYPTED)
    return name if name is not None else Refused(NO_SERVER_NAME)


def _server_name(data: bytes) -> str | Refused:
    """RFC 6066 3: a list of one host_name. Another name type, or a second name, is refused:
    which one a server would use is its own business."""
    if len(data) < 2 or int.from_bytes(data[:2], "big") != len(data) - 2:
        return _malformed("server_name's list length")
    at, names = 2, []
    while at < len(data):
        if at + 3 > len(data):
            return _malformed("server_name cut short")
        kind, n = data[at], int.from_bytes(data[at + 1 : at + 3], "big")
        raw, at = data[at + 3 : at + 3 + n], at + 3 + n
        if at > len(data) or kind != HOST_NAME:
            return _malformed("server_name holds something other than a host name")
        names.append(raw)
    if len(names) != 1:
        return _malformed(f"server_name lists {len(names)} names") if names else Refused(NO_SERVER_NAME)
    name = host_name(names[0])
    if name is None or is_address(name):
        return _malformed("server_name is not a host name")
    return name


def read_connect(data: bytes) -> Outcome:
    """An HTTP proxy request: ``CONNECT host:port HTTP/1.x`` and its headers, whole. Anything
    else is refused: the host of a plain ``GET http://host/`` request can change with every
    request on the connection, a tunnel's cannot. An address for a host cannot be matched
    against the allowlist."""
    prefix = b"CONNECT "
    if data[: len(prefix)] != prefix[: len(data)]:
        return Refused(NOT_CONNECT)
    end = data.find(b"\r\n\r\n")
    if end < 0:
        if len(data) >= MAX_CONNECT:
            return Refused(f"{TOO_LARGE}: a CONNECT request longer than {MAX_CONNECT} bytes")
        return More(len(data) + 1)
    if end + 4 > MAX_CONNECT:
        return Refused(f"{TOO_LARGE}: a CONNECT request longer than {MAX_CONNECT} bytes")
    line = data[: data.find(b"\r\n")]
    parts = line.split(b" ")
    if len(parts) != 3 or not re.fullmatch(rb"HTTP/1\.[01]", parts[2]):
        return _malformed("the CONNECT line is not CONNECT host:port HTTP/1.x")
    host, _, port = parts[1].rpartition(b":")
    if not port.isdigit() or not 0 < int(port) <= 65535 or not host:
        return _malformed("the CONNECT target is not host:port")
    if host.startswith(b"[") or is_address(host.decode("latin-1")):
        return Refused("CONNECT to an address: only a host name can be matched against the allowlist")
    name = host_name(host)
    if name is None:
        return _malformed("the CONNECT target is not a host name")
    return Name(name, end + 4, int(port))
