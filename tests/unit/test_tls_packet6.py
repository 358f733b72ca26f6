"""The queued segment's reader (ramfw.tls.packet) on IPv6 packets as a hostile client makes them
(tests/lab/rawtcp.py): extension headers before TCP, a payload length that is not the packet's,
a Fragment header conntrack did not take away. Pure."""

import pytest

from ramfw.tls.packet import checksum_ok, head, marks, segment
from tests.lab import rawtcp
from tests.lab.rawtcp import ACK, DSTOPTS, EXPERIMENT, HOP, PSH, SYN, RawFlow, auth, fragment, ip6, options, routing

CHAINS = {"none": [], "hop-by-hop": [options(HOP, EXPERIMENT * 3)], "destination": [options(DSTOPTS)],
          "routing": [routing(0, ["2001:db8::50"])],
          "a chain": [options(HOP), options(DSTOPTS, EXPERIMENT), routing(4, ["2001:db8::50", "2001:db8::51"]),
                      options(DSTOPTS)]}


def flow() -> RawFlow:
    made = RawFlow.__new__(RawFlow)
    made.src, made.dst, made.sport, made.dport, made.isn, made.ack = "2001:db8::1", "2001:db8::50", 40000, 443, 7, 99
    return made


@pytest.mark.parametrize("headers", CHAINS.values(), ids=CHAINS.keys())
def test_tcp_behind_extension_headers_is_read_with_its_marks_and_checksum(headers):
    raw = flow()
    packet = raw.packet(8, PSH | ACK, b"hello", ttl=3, tsval=77, headers=headers)
    found = segment(packet)
    assert found is not None and found.payload == b"hello" and (found.sport, found.dport, found.seq) == (40000, 443, 8)
    assert marks(packet) == marks(raw.packet(8, PSH | ACK, b"hello", ttl=3, tsval=77)), "the same marks as without"
    assert marks(packet).ttl == 3 and marks(packet).ack == 99 and marks(packet).tsval == 77
    assert not checksum_ok(raw.packet(8, PSH | ACK, b"hello", good=False, headers=headers))
    syn = head(raw.packet(7, SYN, headers=headers))
    assert syn is not None and syn.seq == 7 and syn.src == "2001:db8::1" and syn.dport == 443


def test_a_payload_length_other_than_the_packets_is_read_as_the_server_would_or_not_at_all():
    raw = flow()
    tcp = raw.data(0, b"0123456789")
    longer = ip6(raw.src, raw.dst, tcp, [options(HOP)]) + b"more"
    assert segment(longer).payload == b"0123456789", "read up to the payload length, as the server's IPv6 trims it"
    for length in (0, 8 + 10, 8 + len(tcp) + 1):  # a jumbogram's; into the TCP header; past the packet
        assert segment(ip6(raw.src, raw.dst, tcp, [options(HOP)], length=length)) is None, length


def test_what_conntrack_leaves_whole_or_the_kernel_does_not_call_tcp_is_not_read():
    raw = flow()
    tcp = raw.data(0, b"hello")
    assert segment(ip6(raw.src, raw.dst, tcp, [fragment(0, False, 1)])) is None, "a Fragment header left in place"
    assert segment(ip6(raw.src, raw.dst, tcp, [auth()])) is None, "behind AH: nftables calls it AH, never queued"
    assert segment(rawtcp.ip6(raw.src, raw.dst, tcp[:12], [options(HOP)])) is None, "cut short"
