"""Packets for tests: DNS replies on the wire, in IPv4/IPv6 and UDP/TCP, as the kernel hands
them up (IP header onwards). Shared by the unit and integration tests."""

import socket
import struct

import dns.message
import dns.rrset

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
    return checksum_free_ipv4(17, struct.pack("!HHHH", sport, 40000, 8 + len(wire), 0) + wire, src)


def tcp(data, seq, flags=0x18, src=RESOLVER):
    return checksum_free_ipv4(6, struct.pack("!HHIIBBHHH", 53, 40000, seq, 0, 5 << 4, flags, 65535, 0, 0) + data, src)


def udp6(wire, src="2001:db8::53"):
    segment = struct.pack("!HHHH", 53, 40000, 8 + len(wire), 0) + wire
    return (struct.pack("!IHBB", 6 << 28, len(segment), 17, 64) + socket.inet_pton(socket.AF_INET6, src)
            + socket.inet_pton(socket.AF_INET6, "2001:db8::1") + segment)
