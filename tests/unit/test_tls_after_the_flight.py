"""A flow whose first flight was read (review of this session's TLS check changes): a segment
that is not that stream's (a new connection on the same tuple whose SYN went unseen) is
refused, not let through unread; a flow left unjudged is refused when it is forgotten."""

from ramfw.tls.flows import SYN_SECONDS, Flows
from tests.support import tls
from tests.unit.test_tls import ISN, KEY, Judge

ALLOWED = tls.client_hello("allowed-registry.test")
OTHER = tls.client_hello("evil.test")
END = (ISN + 1 + len(ALLOWED)) & 0xFFFFFFFF  # the next byte after the flight


def verifying():
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    assert flows.segment(KEY, ISN + 1, ALLOWED, 1, now=0).verdict.allow
    return flows


def test_a_segment_of_another_stream_on_a_flow_being_verified_is_refused():
    for seq, why in (((ISN + 1 + (1 << 31)) & 0xFFFFFFFF, "before the stream's start"),
                     ((ISN + 5000) & 0xFFFFFFFF, "past the first flight before the server took it"),
                     (END, "past the first flight before the server took it")):
        step = verifying().segment(KEY, seq, OTHER, 2, now=0.1)
        assert step.reject == [2] and step.mark == "refuse" and why in step.verdict.message, (seq, step)
    assert verifying().segment(KEY, ISN + 1, ALLOWED, 2, now=0.1).accept == [2], "a retransmission of the flight"


def test_once_the_server_took_the_flight_only_the_streams_next_bytes_pass():
    flows = verifying()
    assert flows.server_ack(KEY, END, now=0.1).mark == "allow"
    assert flows.segment(KEY, END, b"\x17\x03\x03\x00\x05hello", 2, now=0.1).accept == [2], "its next bytes"
    gap = flows.segment(KEY, (END + 3000) & 0xFFFFFFFF, OTHER, 3, now=0.1)
    assert gap.reject == [3] and "past a gap" in gap.verdict.message
    flows = verifying()
    flows.server_ack(KEY, END, now=0.1)
    before = flows.segment(KEY, (ISN - 100) & 0xFFFFFFFF, OTHER, 4, now=0.1)
    assert before.reject == [4] and "before the stream's start" in before.verdict.message


def test_a_flow_left_unjudged_is_refused_when_forgotten():
    """Its first segment dropped unread (a bad checksum, a full queue) left both mark bits set;
    forgotten silently, a later daemon would have cleared them as a flow that passed while none
    ran, and the idle connection could have sent any name."""
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    assert flows.expire(now=SYN_SECONDS / 2) == []
    (step,) = flows.expire(now=SYN_SECONDS + 1)
    assert step.key == KEY and step.mark == "refuse" and step.verdict is None and not flows.known(KEY)


def test_a_segment_without_a_flow_counts_against_no_share():
    flows = Flows(Judge())
    flows.syn(KEY, ISN, now=0)
    flows.segment(KEY, ISN + 1, ALLOWED[:10], 1, now=0)  # held, in the unknown-origin share
    other = ("192.0.2.9", 1, "203.0.113.10", 443)
    assert flows.segment(other, ISN + 1, ALLOWED, 2, now=0).reject == [2]
    assert flows.held == 1, "the held segment is still counted"
