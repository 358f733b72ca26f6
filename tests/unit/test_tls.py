"""The TLS first-flight reader (ramfw.tls): real ClientHellos made by Python's ssl, cut, reordered,
overlapped, edited and fuzzed; CONNECT requests; the judge; the flows' verdicts."""

import itertools
import random

import pytest

from ramfw.policy import names
from ramfw.tls import hello as h
from ramfw.tls.flows import HOLD_SECONDS, MAX_HELD, Flows
from ramfw.tls.judge import Addresses, Verdict, judge, judge_connect, judge_tunnel, refused_unread
from ramfw.tls.stream import BEYOND, DISAGREE, Flight
from tests.support import tls

ISN = 0xFFFFFF00  # the stream wraps past 2**32 in every test


@pytest.fixture(scope="module")
def hello():
    return tls.client_hello("allowed-registry.test")


def feed(record, cuts, order=None, isn=ISN, proxy=False):
    """The record cut at ``cuts`` into segments, added in ``order``; every outcome."""
    bounds = [0, *cuts, len(record)]
    pieces = [(bounds[i], record[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]
    flight = Flight(isn, proxy)
    return [flight.add((isn + 1 + offset) & 0xFFFFFFFF, data)
            for offset, data in (pieces[i] for i in (order or range(len(pieces))))]


def test_a_real_client_hello_names_its_server(hello):
    assert h.read_hello(hello) == h.Name("allowed-registry.test", len(hello))
    assert h.read_hello(tls.client_hello("Allowed-Registry.TEST")) == h.Name("allowed-registry.test", len(hello))
    assert h.read_hello(tls.client_hello("a.b", alpn=["h2", "http/1.1"])).name == "a.b"


def test_without_server_name_it_is_refused():
    assert h.read_hello(tls.client_hello(None)) == h.Refused(h.NO_SERVER_NAME)


def test_every_prefix_asks_for_more(hello):
    for n in range(len(hello)):
        assert isinstance(h.read_hello(hello[:n]), h.More), n
    assert h.read_hello(hello[:3]) == h.More(5) and h.read_hello(hello[:7]) == h.More(len(hello))


def test_split_in_two_at_every_byte_in_both_orders(hello):
    for cut in range(1, len(hello)):
        for order in ([0, 1], [1, 0]):
            outcomes = feed(hello, [cut], order)
            assert outcomes[-1] == h.Name("allowed-registry.test", len(hello)), (cut, order)
            assert isinstance(outcomes[0], h.More)


def test_split_in_three_at_every_pair_of_bytes(hello):
    for first, second in itertools.combinations(range(1, len(hello)), 2):
        outcomes = feed(hello, [first, second])
        assert isinstance(outcomes[0], h.More) and isinstance(outcomes[1], h.More)
        assert outcomes[2].name == "allowed-registry.test"


def test_three_segments_in_every_order(hello):
    rng = random.Random(13)
    for _ in range(300):
        cuts = sorted(rng.sample(range(1, len(hello)), 2))
        for order in itertools.permutations(range(3)):
            outcomes = feed(hello, cuts, list(order))
            assert outcomes[-1].name == "allowed-registry.test" and all(isinstance(o, h.More) for o in outcomes[:-1])


def test_overlapping_segments_that_agree_are_read(hello):
    flight = Flight(ISN)
    base = (ISN + 1) & 0xFFFFFFFF
    assert isinstance(flight.add(base + 100, hello[100:300]), h.More)
    assert isinstance(flight.add(base + 250, hello[250:400]), h.More)
    assert isinstance(flight.add(base, hello[:120]), h.More)
    assert isinstance(flight.add(base + 150, hello[150:160]), h.More)  # inside what is held
    assert flight.add(base + 380, hello[380:]).name == "allowed-registry.test"
    assert flight.add(base, hello).name == "allowed-registry.test"  # a whole retransmission


def test_overlapping_segments_that_disagree_are_refused(hello):
    other = tls.client_hello("blocked-registry.test")
    for cut in range(1, len(hello), 7):
        flight = Flight(ISN)
        base = (ISN + 1) & 0xFFFFFFFF
        flight.add(base, hello[:cut])
        # the same bytes again but one: the server could keep either
        changed = bytearray(hello[cut - 1 :])
        changed[0] ^= 0x20
        assert flight.add(base + cut - 1, bytes(changed)) == h.Refused(DISAGREE)
    # the evasion: a cover name sent ahead, then the real one over it
    flight = Flight(ISN)
    base = (ISN + 1) & 0xFFFFFFFF
    flight.add(base + 5, other[5:])
    assert flight.add(base, hello) == h.Refused(DISAGREE)


def test_a_segment_before_the_stream_is_cut_as_the_server_cuts_it(hello):
    flight = Flight(ISN)
    assert flight.add(ISN, b"\x00" + hello).name == "allowed-registry.test"  # one byte on the SYN's number
    assert Flight(ISN).add(ISN - 10, b"x" * 5) == h.More(5)


def test_data_past_the_largest_first_flight_is_refused():
    assert Flight(ISN).add(ISN + 1 + 20000, b"x") == h.Refused(BEYOND)


def test_encrypted_client_hello_is_refused(hello):
    assert h.read_hello(tls.with_ech(hello)) == h.Refused(h.ENCRYPTED)
    assert h.read_hello(tls.with_ech(tls.client_hello(None))) == h.Refused(h.ENCRYPTED)


def test_plain_http_and_other_protocols_are_not_tls():
    for data in (b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n", b"\x80\x2e\x01\x03\x01", b"SSH-2.0-OpenSSH_9.2\r\n",
                 b"\x17\x03\x03\x00\x10", b"\x16\x02\x00", b"\x16\x03\x07"):
        assert h.read_hello(data) == h.Refused(h.NOT_TLS), data


def test_a_record_longer_than_tls_allows_is_too_large():
    assert h.read_hello(b"\x16\x03\x01\x40\x01").kind == h.TOO_LARGE


def test_ambiguous_client_hellos_are_refused(hello):
    name = tls.server_name_extension(b"allowed-registry.test")
    twice = tls.edit(hello, lambda e: e + [(0, name)])
    assert h.read_hello(twice).reason == "malformed: extension 0x0000 twice"
    two_names = tls.edit(hello, lambda e: [(k, tls.server_name_extension(b"allowed-registry.test", b"evil.test"))
                                           if k == 0 else (k, d) for k, d in e])
    assert h.read_hello(two_names).kind == h.MALFORMED
    for raw in (b"evil.test\x00.allowed-registry.test", b"a..b", b"203.0.113.10", b"caf\xc3\xa9.test", b"",
                b"x" * 64 + b".test", b"a b.test", b"evil\\.test"):
        odd = tls.edit(hello, lambda e: [(k, tls.server_name_extension(raw)) if k == 0 else (k, d) for k, d in e])
        assert h.read_hello(odd).kind == h.MALFORMED, raw
    other_type = tls.edit(hello, lambda e: [(k, tls.server_name_extension(b"x.test", kind=1)) if k == 0 else (k, d)
                                            for k, d in e])
    assert h.read_hello(other_type).kind == h.MALFORMED
    trailing = tls.edit(hello, lambda e: e)
    assert h.read_hello(trailing).name == "allowed-registry.test"
    assert h.read_hello(trailing[:5] + trailing[5:] + b"").name == "allowed-registry.test"


def test_a_client_hello_split_across_records_is_refused(hello):
    body = hello[5:]
    first, second = body[:100], body[100:]
    record = b"\x16\x03\x01" + len(first).to_bytes(2, "big") + first
    assert h.read_hello(record + b"\x16\x03\x01" + len(second).to_bytes(2, "big") + second).kind == h.MALFORMED


def test_no_cut_or_flip_makes_the_reader_raise(hello):
    rng = random.Random(2026)
    outcomes = set()
    for _ in range(20000):
        data = bytearray(hello[: rng.randrange(len(hello) + 1)])
        for _ in range(rng.randrange(1, 4)):
            if data:
                data[rng.randrange(len(data))] = rng.randrange(256)
        found = h.read_hello(bytes(data))
        assert isinstance(found, (h.More, h.Name, h.Refused))
        outcomes.add(type(found).__name__)
        if isinstance(found, h.Name):
            assert names.Matcher([names.Pattern(found.name)]).match(found.name) is not None
    assert outcomes == {"More", "Name", "Refused"}


def test_connect_requests():
    request = b"CONNECT allowed-registry.test:443 HTTP/1.1\r\nHost: allowed-registry.test:443\r\n\r\n"
    assert h.read_connect(request) == h.Name("allowed-registry.test", len(request), 443)
    for n in range(len(request)):
        assert isinstance(h.read_connect(request[:n]), h.More), n
    assert h.read_connect(b"GET http://evil.test/v2/ HTTP/1.1\r\n\r\n") == h.Refused(h.NOT_CONNECT)
    assert h.read_connect(b"CONNECT 203.0.113.10:443 HTTP/1.1\r\n\r\n").reason.startswith("CONNECT to an address")
    assert h.read_connect(b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\n\r\n").reason.startswith("CONNECT to an address")
    assert h.read_connect(b"CONNECT evil.test HTTP/1.1\r\n\r\n").kind == h.MALFORMED
    assert h.read_connect(b"CONNECT a.test:443 HTTP/2\r\n\r\n").kind == h.MALFORMED
    assert h.read_connect(b"CONNECT " + b"a" * 5000).kind == h.TOO_LARGE


def test_a_connect_then_the_tunnels_client_hello(hello):
    request = b"CONNECT allowed-registry.test:443 HTTP/1.1\r\n\r\n"
    outcomes = feed(request + hello, [10, len(request), len(request) + 200], proxy=True)
    assert outcomes[0] == h.More(11)
    assert outcomes[1] == h.Name("allowed-registry.test", len(request), 443)
    assert isinstance(outcomes[2], h.More)
    assert outcomes[3] == h.Name("allowed-registry.test", len(request) + len(hello))
    pipelined = feed(request + hello, [len(request) + 10], proxy=True)  # the hello sent before the proxy answered
    assert pipelined[0].reason.startswith("data sent after the CONNECT")
    early = feed(request + hello, [len(request) - 2], order=[1, 0], proxy=True)
    assert early[-1].reason.startswith("data sent after the CONNECT")


POLICY = names.Matcher([names.parse_entry(e).pattern for e in ("allowed-registry.test", "*.cdn.test", "other.test")])


def test_judge_uses_the_dns_grammar_and_the_learned_names():
    allows = POLICY.match
    assert judge("allowed-registry.test", "203.0.113.10", allows, ["allowed-registry.test"]).allow
    assert judge("eu.allowed-registry.test", "203.0.113.10", allows, ["allowed-registry.test"]).allow
    assert judge("allowed-registry.test", "203.0.113.10", allows, ["x.allowed-registry.test"]).allow
    refused = judge("badallowed-registry.test", "203.0.113.10", allows, ["allowed-registry.test"])
    assert not refused.allow and refused.name == "badallowed-registry.test"
    assert refused.message == ("registry access to badallowed-registry.test is not allowed (its TLS server name, "
                               "at 203.0.113.10)")
    assert not judge("cdn.test", "203.0.113.10", allows, ["a.cdn.test"]).allow  # *.x: subdomains only
    assert judge("b.cdn.test", "203.0.113.10", allows, ["a.cdn.test"]).allow
    other = judge("other.test", "203.0.113.10", allows, ["allowed-registry.test"])  # allowed, but not learned there
    assert not other.allow and "203.0.113.10 was learned for allowed-registry.test, not for a name under other.test" \
        in other.message
    assert "not learned for any name" in judge("other.test", "203.0.113.10", allows, []).message
    assert judge_connect("other.test", "192.0.2.8", allows).allow
    assert not judge_connect("evil.test", "192.0.2.8", allows).allow
    assert judge_tunnel("a.other.test", "other.test", "192.0.2.8", allows).allow
    assert not judge_tunnel("allowed-registry.test", "other.test", "192.0.2.8", allows).allow


def test_learned_addresses_expire_and_are_bounded():
    index = Addresses(cap=3)
    index.add("192.0.2.1", "a.test", 10, now=0)
    index.add("192.0.2.1", "b.test", 20, now=0)
    index.add("192.0.2.2", "a.test", 10, now=0)
    assert index.names("192.0.2.1", now=5) == ["a.test", "b.test"] and index.names("192.0.2.1", now=15) == ["b.test"]
    index.add("192.0.2.3", "c.test", 30, now=15)  # over the cap: the expired go
    assert len(index) == 2 and index.names("192.0.2.2", now=15) == []


class Judge:
    def hello(self, name, address):
        return judge(name, address, POLICY.match, ["allowed-registry.test"])

    def connect(self, name, address):
        return judge_connect(name, address, POLICY.match)

    def tunnel(self, name, connect, address):
        return judge_tunnel(name, connect, address, POLICY.match)

    def unread(self, address, reason):
        return refused_unread(address, reason)


KEY = ("192.0.2.1", 40000, "203.0.113.10", 443)


def segments(record, cuts, isn=ISN):
    bounds = [0, *cuts, len(record)]
    return [((isn + 1 + bounds[i]) & 0xFFFFFFFF, record[bounds[i]:bounds[i + 1]]) for i in range(len(bounds) - 1)]


def test_flows_hold_every_segment_until_the_hello_is_whole(hello):
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    pieces = segments(hello, [100, 300])
    assert flows.segment(KEY, *pieces[2], 1, now=0.1).accept == []
    assert flows.segment(KEY, *pieces[0], 2, now=0.1).accept == []
    step = flows.segment(KEY, *pieces[1], 3, now=0.1)
    assert step.accept == [1, 2, 3] and step.mark == "" and step.verdict.allow, "read, not yet taken by the server"
    assert flows.segment(KEY, *pieces[1], 4, now=0.2).accept == [4], "a retransmission, still read"
    base = (ISN + 1) & 0xFFFFFFFF
    assert flows.server_ack(KEY, base + 300, now=0.2) is None, "the server has not taken all of it"
    assert flows.server_ack(KEY, base + len(hello), now=0.2).mark == "allow"
    changed = flows.segment(KEY, pieces[0][0], b"\x16" + bytes(50), 5, now=0.2)
    assert changed.reject == [5] and changed.mark == "refuse", "queued before the mark changed: still compared"


def test_flows_refuse_with_a_reset_and_say_which_name(hello):
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    pieces = segments(tls.client_hello("evil.test"), [200])
    flows.segment(KEY, *pieces[0], 1, now=0)
    step = flows.segment(KEY, *pieces[1], 2, now=0)
    assert step.drop == [1] and step.reject == [2] and step.mark == "refuse"
    assert step.verdict == Verdict(False, "evil.test", "registry access to evil.test is not allowed (its TLS server "
                                                       "name, at 203.0.113.10)", "not_allowlisted")
    assert flows.segment(KEY, *pieces[0], 3, now=0).reject == [3]
    audit = Flows(Judge(), audit=True)
    audit.syn(KEY, ISN, now=0)
    step = audit.segment(KEY, ISN + 1, tls.client_hello("evil.test"), 1, now=0)
    assert step.accept == [1] and step.mark == "allow" and not step.verdict.allow


def test_flows_without_a_syn_or_with_two_are_refused(hello):
    flows = Flows(Judge())
    step = flows.segment(KEY, ISN + 1, hello, 1, now=0)
    assert step.reject == [1] and "its SYN was not seen" in step.verdict.message
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    flows.syn(KEY, ISN, now=0.5)  # a retransmission
    assert flows.segment(KEY, ISN + 1, hello, 1, now=1).verdict.allow
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    flows.syn(KEY, ISN + 5000, now=0.5)
    assert "two SYNs" in flows.segment(KEY, ISN + 1, hello, 1, now=1).verdict.message
    flows.syn(KEY, ISN + 9000, now=2)  # decided: a new connection may use the tuple again
    assert flows.segment(KEY, ISN + 9001, hello, 2, now=2).verdict.allow


def test_flows_bound_what_they_hold(hello):
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    for i in range(MAX_HELD):
        assert flows.segment(KEY, ISN + 1 + i, hello[i:i + 1], i, now=0).mark == ""
    step = flows.segment(KEY, ISN + 1 + MAX_HELD, hello[MAX_HELD:MAX_HELD + 1], MAX_HELD, now=0)
    assert step.mark == "refuse" and len(step.drop) == MAX_HELD
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    flows.segment(KEY, ISN + 1, hello[:50], 1, now=0)
    assert flows.expire(now=HOLD_SECONDS / 2) == []
    (late,) = flows.expire(now=HOLD_SECONDS + 0.1)
    assert late.reject == [1] and "did not come whole" in late.verdict.message
    small = Flows(Judge(), max_flows=2)
    for port in range(3):
        small.syn(("192.0.2.1", port, "203.0.113.10", 443), ISN, now=0)
        small.segment(("192.0.2.1", port, "203.0.113.10", 443), ISN + 1, hello[:9], port, now=0)
    (evicted,) = small.expire(now=0)
    assert evicted.reject == [0] and len(small) == 2


def test_flows_through_a_proxy(hello):
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0, proxy=True)
    request = b"CONNECT other.test:443 HTTP/1.1\r\n\r\n"
    step = flows.segment(KEY, ISN + 1, request, 1, now=0)
    assert step.accept == [1] and step.mark == "" and step.verdict.allow
    inner = tls.client_hello("other.test")
    assert flows.segment(KEY, ISN + 1 + len(request), inner, 2, now=0).verdict.allow
    assert flows.server_ack(KEY, ISN + 1 + len(request) + len(inner), now=0).mark == "allow"
    flows.syn(KEY, ISN + 7, now=1, proxy=True)
    refused = flows.segment(KEY, ISN + 8, b"CONNECT evil.test:443 HTTP/1.1\r\n\r\n", 3, now=1)
    assert refused.mark == "refuse" and refused.verdict.name == "evil.test"


def test_the_segments_of_one_flight_must_share_what_decides_whether_the_server_takes_them(hello):
    from ramfw.tls.packet import Marks

    base = Marks(ttl=64, ack=1000, urgent=False, tsval=500)
    for odd, why in ((Marks(2, 1000, False, 500), "differ in TTL"), (Marks(64, 999, False, 500), "differ in TTL"),
                     (Marks(64, 1000, False, None), "timestamps"), (Marks(64, 1000, True, 500), "urgent data"),
                     (Marks(64, 1000, False, 100), "older than the SYN")):
        for first, second in ((base, odd), (odd, base)):
            flows = Flows(Judge())
            flows.syn(KEY, ISN, now=0, tsval=400)
            steps = [flows.segment(KEY, ISN + 1, hello[:100], 1, now=0, marks=first),
                     flows.segment(KEY, ISN + 101, hello[100:], 2, now=0, marks=second)]
            refused = [step for step in steps if step.mark == "refuse"]
            assert refused and why in refused[0].verdict.message and not any(s.accept for s in steps), (first, second)
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0, tsval=0xFFFFFFF0)  # timestamps wrap as sequence numbers do
    newer = Marks(64, 1000, False, 5)
    flows.segment(KEY, ISN + 1, hello[:100], 1, now=0, marks=newer)
    assert flows.segment(KEY, ISN + 101, hello[100:], 2, now=0, marks=newer).verdict.allow


def test_header_marks_are_read_from_real_packets():
    from ramfw.tls.packet import marks
    from tests.lab.rawtcp import URG, RawFlow

    flow = RawFlow.__new__(RawFlow)
    flow.src, flow.dst, flow.sport, flow.dport, flow.isn, flow.ack = "192.0.2.1", "203.0.113.50", 40000, 443, 7, 99
    found = marks(flow.packet(8, URG | 0x18, b"x", ttl=9, tsval=1234))
    assert found.ttl == 9 and found.ack == 99 and found.urgent and found.tsval == 1234
    assert marks(flow.packet(8, 0x18, b"x")).tsval is None and marks(b"\x45") is None


def test_an_accepted_flight_the_server_never_takes_is_refused_and_what_comes_instead_is_read(hello):
    """The cover: a ClientHello the server drops (it dies on the way, or acks data never sent),
    then the real one at the same place. The flow stays read until the server acknowledges."""
    from ramfw.tls.flows import VERIFY_SECONDS

    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    assert flows.segment(KEY, ISN + 1, hello, 1, now=0).accept == [1]
    real = flows.segment(KEY, ISN + 1, tls.client_hello("evil.test"), 2, now=0.5)
    assert real.reject == [2] and real.mark == "refuse" and "disagree" in real.verdict.message
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    flows.segment(KEY, ISN + 1, hello, 1, now=0)
    assert flows.expire(now=VERIFY_SECONDS / 2) == []
    (late,) = flows.expire(now=VERIFY_SECONDS + 0.1)
    assert late.mark == "refuse" and "did not take the first flight" in late.verdict.message
    assert flows.server_ack(KEY, ISN + 1 + len(hello), now=VERIFY_SECONDS + 0.2) is None, "too late"
