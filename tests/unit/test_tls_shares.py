"""The TLS check's flows are shared by every client: each counts against its shares (its local
user, or its interface and source address), and one share at its limits refuses only its own."""

import pytest

from ramfw.tls import flows as f
from ramfw.tls.flows import Flows, share_text
from tests.support import tls
from tests.unit.test_tls import ISN, Judge

HELLO = tls.client_hello("allowed-registry.test")
USER, ENGINE = (("uid", 1000),), (("uid", 0),)
CONTAINER = (("in", 7), ("from", 7, "172.17.0.2"))
NEIGHBOUR = (("in", 7), ("from", 7, "172.17.0.3"))


def key(port, source="192.0.2.1"):
    return (source, port, "203.0.113.10", 443)


def allowed(flows, port, shares, now=0.0, source="192.0.2.1"):
    flows.syn(key(port, source), ISN, now, shares=shares)
    step = flows.segment(key(port, source), ISN + 1, HELLO, 10_000 + port, now)
    return step.verdict is not None and step.verdict.allow


@pytest.fixture
def small(monkeypatch):
    """Limits of 3 flows waiting and 4 segments held for a user; 4 and 6 for an interface, 2 and 3
    for one source there."""
    monkeypatch.setitem(f.SHARE_LIMITS, "uid", (3, 4))
    monkeypatch.setitem(f.SHARE_LIMITS, "in", (4, 6))
    monkeypatch.setitem(f.SHARE_LIMITS, "from", (2, 3))


def test_a_user_with_as_many_flows_waiting_as_its_share_has_its_next_one_refused_not_the_others(small):
    flows = Flows(Judge())
    for port in range(3):
        flows.syn(key(port), ISN, now=0, shares=USER)  # connected, sends nothing
    flows.syn(key(3), ISN, now=0, shares=USER)
    step = flows.segment(key(3), ISN + 1, HELLO, 1, now=0.1)
    assert step.mark == "refuse" and step.reject == [1]
    assert step.verdict.message == ("registry access to 203.0.113.10 is not allowed: uid 1000 has 3 connections "
                                    "waiting for their first flight to be read (its share of the TLS check)")
    assert step.verdict.reason == "share_exceeded"
    assert allowed(flows, 100, ENGINE), "another user's flow is read as ever"
    assert allowed(flows, 0, USER), "the user's own flows already waiting are read"
    assert not allowed(flows, 4, USER), "read but not yet taken by the server: it still waits"
    flows.server_ack(key(0), (ISN + 1 + len(HELLO)) & 0xFFFFFFFF, now=0.2)
    assert allowed(flows, 5, USER), "a place was freed"


def test_a_share_holding_its_limit_of_segments_has_its_next_flight_refused(small):
    flows = Flows(Judge())
    for port in range(2):  # two first flights of two segments each, never finished
        flows.syn(key(port), ISN, now=0, shares=USER)
        for i in range(2):
            assert flows.segment(key(port), ISN + 1 + i, HELLO[i:i + 1], port * 10 + i, now=0).verdict is None
    assert flows.held == 4
    flows.syn(key(2), ISN, now=0, shares=USER)
    step = flows.segment(key(2), ISN + 1, HELLO[:5], 99, now=0)
    assert step.reject == [99] and "uid 1000 has 4 segments held of first flights not yet whole" in step.verdict.message
    assert allowed(flows, 100, ENGINE) and flows.held == 4
    assert flows.segment(key(0), ISN + 3, HELLO[2:], 5, now=0).verdict.allow, "the user's own flight completes"
    assert flows.held == 2


def test_one_source_behind_an_interface_cannot_take_the_whole_interface_share(small):
    flows = Flows(Judge())
    for port in range(2):
        flows.syn(key(port, "172.17.0.2"), ISN, now=0, shares=CONTAINER)
    assert not allowed(flows, 2, CONTAINER, source="172.17.0.2"), "its own share is full"
    assert allowed(flows, 3, NEIGHBOUR, source="172.17.0.3"), "its neighbour on the bridge still connects"
    assert allowed(flows, 4, ENGINE)


def test_a_full_table_evicts_from_the_share_with_most_waiting(small, monkeypatch):
    monkeypatch.setitem(f.SHARE_LIMITS, "uid", (100, 100))
    flows = Flows(Judge(), max_flows=5)
    flows.syn(key(0, "192.0.2.9"), ISN, now=0, shares=ENGINE)  # the oldest of all, in the thinnest share
    for port in range(1, 5):
        flows.syn(key(port), ISN, now=0, shares=USER)
    flows.syn(key(5), ISN, now=0, shares=USER)
    assert len(flows) == 5 and flows.known(key(0, "192.0.2.9")) and not flows.known(key(1))
    assert "evicted: too many flows waiting (uid 1000 has the most)" in flows.segment(
        key(1), ISN + 1, HELLO, 1, now=0).verdict.message
    assert flows.segment(key(0, "192.0.2.9"), ISN + 1, HELLO, 2, now=0).verdict.allow


def test_decided_flows_count_against_no_share_and_the_counts_return_to_nothing(small):
    flows = Flows(Judge())
    for port in range(10):
        assert allowed(flows, port, USER, now=port)  # read: they wait only for the server's ack
        flows.server_ack(key(port), (ISN + 1 + len(HELLO)) & 0xFFFFFFFF, now=port)
    assert len(flows) == 0 and flows.known(key(9))
    flows.syn(key(20), ISN, now=10, shares=USER)
    flows.segment(key(20), ISN + 1, HELLO[:5], 1, now=10)
    flows.syn(key(21), ISN, now=10, shares=CONTAINER)
    flows.segment(key(21), ISN + 1, HELLO[:5], 2, now=10, reset=True)
    assert flows.held == 1 and len(flows) == 1
    flows.expire(now=100)
    flows.expire(now=200)
    assert len(flows) == 0 and flows.held == 0 and not flows._waiting and not flows._holding
    assert not flows.known(key(9)), "decided flows are forgotten after a while"


def test_shares_are_said_plainly():
    assert share_text(("uid", 1000)) == "uid 1000"
    assert share_text(("in", 7), {7: "docker0"}.get) == "interface docker0"
    assert share_text(("from", 7, "172.17.0.2"), {7: "docker0"}.get) == "172.17.0.2 on interface docker0"
    assert share_text(("unknown",)) == "clients of unknown origin"
