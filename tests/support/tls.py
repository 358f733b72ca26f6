"""Real ClientHellos, made by Python's ``ssl`` (OpenSSL) into a memory BIO, and edited copies of
them (an extension added, removed or doubled), for the unit tests, the lab's own client and the
benchmarks. Never shipped."""

from __future__ import annotations

import ssl
import struct


def client_hello(server_name: str | None = "allowed-registry.test", alpn: list[str] | None = None) -> bytes:
    """The first flight of an OpenSSL client: one record holding its ClientHello."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    try:
        conn.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def split(record: bytes) -> tuple[bytes, list[tuple[int, bytes]]]:
    """A ClientHello record as (the ClientHello's fixed fields, its extensions)."""
    body = record[5 + 4 :]
    at = 2 + 32
    at += 1 + body[at]
    at += 2 + struct.unpack_from("!H", body, at)[0]
    at += 1 + body[at]
    fixed, rest = body[:at], body[at + 2 :]
    extensions, i = [], 0
    while i < len(rest):
        kind, n = struct.unpack_from("!HH", rest, i)
        extensions.append((kind, rest[i + 4 : i + 4 + n]))
        i += 4 + n
    return fixed, extensions


def join(fixed: bytes, extensions: list[tuple[int, bytes]]) -> bytes:
    """A ClientHello record from its fixed fields and extensions, every length made right."""
    ext = b"".join(struct.pack("!HH", kind, len(data)) + data for kind, data in extensions)
    body = fixed + struct.pack("!H", len(ext)) + ext
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack("!H", len(handshake)) + handshake


def edit(record: bytes, change) -> bytes:
    """``change(extensions)`` returns the new list of (type, data)."""
    fixed, extensions = split(record)
    return join(fixed, change(list(extensions)))


def server_name_extension(*names: bytes, kind: int = 0) -> bytes:
    entries = b"".join(bytes([kind]) + struct.pack("!H", len(n)) + n for n in names)
    return struct.pack("!H", len(entries)) + entries


def with_ech(record: bytes) -> bytes:
    """An Encrypted Client Hello extension (0xfe0d) added: an outer ClientHello whose name is a cover."""
    ech = b"\x00" + struct.pack("!HH", 1, 1) + b"\x07" + struct.pack("!H", 32) + bytes(32) + struct.pack("!H", 8) + bytes(8)
    return edit(record, lambda e: e + [(0xFE0D, ech)])
