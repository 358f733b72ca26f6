"""The TLS server name check against a hostile IPv6 client of raw packets (CAP_NET_RAW, in the
VM or in a container): extension headers before TCP, a payload length of zero, fragments, covers
with a hop limit that ends before the server, data on a SYN. The attacks IPv4 shares with it
(out of order, overlaps, bad checksums, a forged server acknowledgment, a tuple used again) are
test_sni.py's, run for both families there."""

import os
import socket
import time

import pytest

from tests.integration import test_sni
from tests.integration.test_sni import ALLOWED, MARK, OTHER, status
from tests.lab.edge import EDGE4, EDGE6, Authority, Edge, add_addresses
from tests.lab.rawtcp import DSTOPTS, EXPERIMENT, HOP, SYN, RawFlow, auth, fragment, fragments, ip6, options, routing
from tests.lab.sandbox import NET4, NET6, VM4, VM6
from tests.support import tls

FAR6, ROUTER6 = "2001:db8:2::50", "2001:db8:2::1"  # an edge one router away, behind the lab's internet
edge_lab = test_sni.edge_lab


def raw_flow(lab, source=None, src=VM6, dst=EDGE6):
    flow = RawFlow(source or lab.vm, src, dst, mark=MARK)
    flow.handshake()
    return flow


def asked_only_allowed(lab):
    time.sleep(0.3)
    return OTHER not in lab.edge.asked


def test_extension_headers_before_tcp_are_read_through(edge_lab):
    """Hop-by-hop and destination options, a routing header with no segment left (type 0, which
    the server ignores then), and a chain of them: the segment is queued and read as the
    server's TCP reads it, whichever name it carries."""
    lab = edge_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    chains = {"hop-by-hop": [options(HOP)], "destination options": [options(DSTOPTS, EXPERIMENT * 2)],
              "routing type 0, none left": [routing(0, [EDGE6])],
              "a chain": [options(HOP, EXPERIMENT), options(DSTOPTS), routing(0, [EDGE6]), options(DSTOPTS)]}
    before = status(lab)["tls"]["counters"].get("segments", 0)
    for what, headers in chains.items():
        flow = raw_flow(lab)
        flow.send(0, allowed, headers=headers)
        assert flow.outcome() == "answered", what
        flow.close()
        flow = raw_flow(lab)
        flow.send(0, other[:100], headers=headers)
        flow.send(100, other[100:], headers=headers)
        assert flow.outcome() == "reset", what
        flow.close()
    assert status(lab)["tls"]["counters"]["segments"] - before == 3 * len(chains), "every one read"
    assert asked_only_allowed(lab), lab.edge.asked


def test_a_cover_behind_a_header_the_server_drops_does_not_let_the_real_name_follow(edge_lab):
    """Headers the daemon reads through but the server's IPv6 drops the packet for: more than 7
    bytes of padding in a row, a segment routing header where segment routing is off, a
    hop-by-hop header after another header, a routing header of type 0 with a segment left. The
    cover is read and accepted; the real name after it disagrees with what was read, and the
    server never acknowledged the cover. Behind an authentication header nothing is read, and
    the server takes nothing."""
    lab = edge_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    covers = {"padding of 12 bytes": [options(DSTOPTS, size=16)], "segment routing": [routing(4, [EDGE6])],
              "hop-by-hop second": [options(DSTOPTS), options(HOP)],
              "type 0, a segment left": [routing(0, [EDGE6], left=1)]}
    for what, headers in covers.items():
        flow = raw_flow(lab)
        flow.send(0, allowed, headers=headers)
        time.sleep(0.2)
        flow.send(0, other)
        assert flow.outcome() in ("nothing", "reset"), what
        flow.close()
    assert asked_only_allowed(lab) and ALLOWED not in lab.edge.asked, lab.edge.asked
    flow = raw_flow(lab)  # behind an authentication header: nftables calls it AH and never queues it, conntrack
    flow.send(0, other, headers=[auth()])  # follows it as TCP, the server drops it (no security association)
    assert flow.outcome() == "nothing"
    flow.send(0, allowed)
    assert flow.outcome() == "answered" and lab.edge.asked == [ALLOWED], "the stream the server took: read"
    flow.close()


def test_a_payload_length_of_zero_is_not_data_the_check_may_skip(edge_lab):
    """A payload length of 0 (a jumbogram's, RFC 2675) behind a hop-by-hop header: Linux's
    receiver takes such a packet at its real length (the Jumbo option's checks run only where
    one is present), but nftables read its length as 0, so no rule counted it as carrying data:
    the other name reached the edge unread. Now queued, unreadable, dropped."""
    lab = edge_lab
    other = tls.client_hello(OTHER)
    for headers in ([options(HOP)], [options(HOP), options(DSTOPTS)],
                    [options(HOP), fragment(0, False, 5)]):  # (the last: not reassembled by conntrack)
        flow = raw_flow(lab)
        flow._send(ip6(flow.src, flow.dst, flow.data(0, other), headers, length=0))
        assert flow.outcome() in ("nothing", "reset"), headers
        flow.close()
    assert asked_only_allowed(lab), lab.edge.asked
    assert status(lab)["tls"]["counters"]["unreadable"] >= 3


def test_a_payload_length_of_zero_from_a_container_is_not_skipped_either(lab, write_config, write_policy, tmp_path):
    """The same packet from a container's raw socket, in the forward hook."""
    from tests.lab.sandbox import CONTAINER6

    add_addresses(lab)
    container = lab.add_container()
    lab.vm.run("sysctl", "-qw", "net.ipv4.tcp_autocorking=0")
    lab.edge = Edge(lab.net, Authority(tmp_path / "edge"), [ALLOWED, OTHER])
    lab.servers.append(lab.edge)
    lab.start_dnsmasq(NET4, f"--host-record={ALLOWED},{EDGE4},{EDGE6}", f"--host-record={OTHER},{EDGE4},{EDGE6}")
    write_policy([ALLOWED])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n', scope=["containers"], registry_ports=[443])
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve(ALLOWED, "AAAA", source=container)
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    flow = raw_flow(lab, container, CONTAINER6)
    flow.send(0, allowed, headers=[options(HOP)])
    assert flow.outcome() == "answered", "the container's flows are read"
    flow.close()
    flow = raw_flow(lab, container, CONTAINER6)
    flow._send(ip6(flow.src, flow.dst, flow.data(0, other), [options(HOP)], length=0))
    assert flow.outcome() in ("nothing", "reset")
    flow.close()
    assert asked_only_allowed(lab), lab.edge.asked


def test_fragments_are_read_as_the_server_reassembles_them(edge_lab):
    """Conntrack reassembles a locally sent datagram's fragments in the output hook before any
    rule sees them (nf_defrag_ipv6, LOCAL_OUT), and sends on what it reassembled (fragmented again
    as it came): the queue holds the whole segment, the server gets those bytes. Overlapping
    fragments are dropped whole (RFC 5722), a duplicate's second copy too; a first fragment
    without the whole TCP header passes reassembly untouched and is dropped by the server."""
    lab = edge_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)

    def send(hello, pieces, before=(), other_pieces=(), ident=0x5241):
        flow = raw_flow(lab)
        whole, cover = flow.data(0, hello), flow.data(0, other)
        packets = fragments(flow.src, flow.dst, whole, pieces(len(whole)), ident, before=list(before))
        for packet in packets[:1] + fragments(flow.src, flow.dst, cover, other_pieces, ident) + packets[1:]:
            flow._send(packet)
            time.sleep(0.01)
        outcome = flow.outcome()
        flow.close()
        return outcome

    assert send(allowed, lambda n: [(0, 200), (200, n)]) == "answered"
    assert send(allowed, lambda n: [(0, 24), (24, 104), (104, n)]) == "answered"
    for pieces in (lambda n: [(0, 200), (200, n)], lambda n: [(200, n), (0, 200)], lambda n: [(0, n)]):
        assert send(other, pieces) == "reset"
    assert send(other, lambda n: [(0, 96), (96, n)], before=[options(HOP)]) == "reset"
    assert send(other, lambda n: [(0, 16), (16, n)]) == "nothing", "the TCP header cut: no one reads it"
    assert send(allowed, lambda n: [(0, 208), (208, n)], other_pieces=[(200, 400)]) == "nothing", "overlapping"
    assert send(allowed, lambda n: [(0, 200), (200, n)], other_pieces=[(0, 200)]) == "answered", "duplicate"
    assert asked_only_allowed(lab), lab.edge.asked


@pytest.mark.parametrize("address", [EDGE4, EDGE6], ids=["ipv4", "ipv6"])
def test_a_syn_with_data_is_dropped_even_where_the_server_takes_it(edge_lab, address):
    """TCP Fast Open: a server that takes data on a SYN without a cookie (Linux, tcp_fastopen
    0x202) would read a ClientHello no one else did. The kernel drops such a SYN (the client
    sends it again without), and over IPv6 one whose payload length says 0 too, and one behind
    extension headers (nftables cannot tell their length from data's)."""
    lab = edge_lab
    lab.net.run("sysctl", "-qw", "net.ipv4.tcp_fastopen=0x202")
    for listener in lab.edge.sockets:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN, 16)
    other = tls.client_hello(OTHER)
    sends = [lambda f: f.packet(f.isn, SYN, other)]
    if address == EDGE6:
        sends.append(lambda f: ip6(f.src, f.dst, f.tcp(f.isn, SYN, other), [options(HOP)], length=0))
        sends.append(lambda f: f.packet(f.isn, SYN, headers=[options(HOP)]))  # no data, but nftables cannot
        # tell extension headers from data: dropped too (no registry client sends one)
    for i, make in enumerate(sends):
        flow = RawFlow(lab.vm, VM6 if address == EDGE6 else VM4, address, mark=MARK)
        flow._send(make(flow))
        assert flow.outcome() == "nothing", i
        flow.close()
    assert asked_only_allowed(lab), lab.edge.asked


@pytest.fixture
def far_lab(lab, write_config, write_policy, tmp_path):
    """The edge for both names one router away (the lab's internet forwards to it), so that a
    hop limit can end between the VM and the server."""
    far = lab._ns("far")
    inner, outer = f"rff{os.getpid() % 100000}", f"rfr{os.getpid() % 100000}"
    lab.net.run("ip", "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", far.name)
    lab.net.run("ip", "addr", "add", f"{ROUTER6}/64", "dev", outer, "nodad")
    lab.net.run("ip", "link", "set", outer, "up")
    lab.net.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    far.run("ip", "addr", "add", f"{FAR6}/64", "dev", inner, "nodad")
    far.run("ip", "link", "set", inner, "up")
    far.run("ip", "-6", "route", "add", "default", "via", ROUTER6)
    lab.vm.run("ip", "-6", "route", "add", "2001:db8:2::/64", "via", NET6)
    lab.edge = Edge(far, Authority(tmp_path / "edge"), [ALLOWED, OTHER], addresses=(FAR6,))
    lab.servers.append(lab.edge)
    lab.start_dnsmasq(NET4, f"--host-record={ALLOWED},{FAR6}", f"--host-record={OTHER},{FAR6}")
    write_policy([ALLOWED])
    lab.config = write_config(f'[dns]\ntrusted_resolvers = ["{NET4}"]\n')
    lab.daemon = lab.start_daemon(lab.config)
    lab.resolve(ALLOWED, "AAAA")
    return lab


def test_a_cover_whose_hop_limit_ends_before_the_server_does_not_let_the_real_name_follow(far_lab):
    """The cover ClientHello with a hop limit of 1 is read and accepted, then dies at the router;
    the real one after it disagrees with what was read. Within one first flight, segments whose
    hop limits differ are refused."""
    lab = far_lab
    allowed, other = tls.client_hello(ALLOWED), tls.client_hello(OTHER)
    flow = raw_flow(lab, dst=FAR6)
    flow.send(0, allowed)
    assert flow.outcome() == "answered", "one router away"
    flow.close()
    flow = raw_flow(lab, dst=FAR6)
    flow.send(0, allowed, ttl=1)
    time.sleep(0.2)
    flow.send(0, other)
    assert flow.outcome() in ("nothing", "reset")
    flow.close()
    flow = raw_flow(lab, dst=FAR6)
    flow.send(0, other[:100], ttl=1)
    flow.send(100, other[100:])
    assert flow.outcome() in ("nothing", "reset")
    flow.close()
    assert lab.edge.asked == [ALLOWED], lab.edge.asked
    assert any("differ in TTL" in b["message"] for b in status(lab)["recent_blocks"])
