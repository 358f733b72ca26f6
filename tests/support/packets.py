"""Packets for tests: DNS replies on the wire, in IPv4/IPv6 and UDP/TCP, as the kernel hands
them up (IP header onwards). Shared by the unit and integration tests."""

import socket
import struct

import dns.message
import dns.rrset

from ramfw.snoop.snooper import Snooper

RESOLVER = "192.0.2.53"
CLIENT = "192.0.2.1"


def reply(name, *records, rdtype="A"):
    response = dns.message.make_response(dns.message.make_query(name, rdtype))
    for text in records:
        owner, ttl, kind, data = text.split(" ", 3)
        response.answer.append(dns.rrset.from_text(owner, int(ttl), "IN", kind, data))
    return response.to_wire()


def checksum_free_ipv4(proto, payload, src=RESOLVER, dst=CLIENT):
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, 64, proto, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
    return header + payload


def udp(wire, src=RESOLVER, sport=53):
    return ip_udp(wire, src, CLIENT, sport, 40000)


def tcp(data, seq, flags=0x18, src=RESOLVER):
    return checksum_free_ipv4(6, struct.pack("!HHIIBBHHH", 53, 40000, seq, 0, 5 << 4, flags, 65535, 0, 0) + data, src)


def udp6(wire, src="2001:db8::53"):
    return ip_udp(wire, src, "2001:db8::1", 53, 40000)


def ip_udp(payload, src, dst, sport, dport):
    """A UDP packet from ``src`` to ``dst`` (IPv4 or IPv6, checksums left zero)."""
    segment = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    if ":" not in src:
        return checksum_free_ipv4(17, segment, src, dst)
    return (struct.pack("!IHBB", 6 << 28, len(segment), 17, 64) + socket.inet_pton(socket.AF_INET6, src)
            + socket.inet_pton(socket.AF_INET6, dst) + segment)


def query_for(packet):
    """The query a UDP reply packet answers, as the output hook copies it (client to resolver:
    the reply's ports and addresses swapped, its ID and question); None if it has none."""
    from ramfw.snoop.packet import parse_packet
    from ramfw.snoop.wire import _read_name

    segment = parse_packet(packet)
    if segment is None or segment.proto != 17 or len(segment.payload) < 12:
        return None
    wire = segment.payload
    try:
        end = _read_name(wire, 12)[1] + 4
    except ValueError:
        return None
    if end > len(wire):
        return None
    query = wire[:2] + b"\x01\x00" + struct.pack("!HHHH", 1, 0, 0, 0) + wire[12:end]
    return ip_udp(query, segment.dst, segment.src, segment.dport, segment.sport)


class AskedSnooper(Snooper):
    """A ``Snooper`` for which every UDP reply answers a query it saw first, as on a VM where
    the query's copy is read before its reply (pairing has tests of its own)."""

    def on_packet(self, packet, now, held=False):
        query = query_for(packet)
        if query is not None:
            super().on_packet(query, now)
            self.counters["queries"] -= 1  # the test's, not the packet stream's
        return super().on_packet(packet, now, held)
