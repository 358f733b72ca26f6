import socket
import struct

import pytest

from ramfw.kernel import netlink, nft
from ramfw.kernel.ruleset import Hold
from ramfw.snoop.snooper import Element

NEW, DEL = (10 << 8) | netlink.NFT_MSG_NEWRULE, (10 << 8) | netlink.NFT_MSG_DELRULE


def types(batch):
    return [msg_type for msg_type, _, _ in netlink.messages(batch)]


UNSOLICITED = 6  # the first rules of every hold: three tests of an unsolicited reply, TCP and UDP


def held(rules):
    """The rules after those that pass unsolicited replies unread."""
    assert all(b"unsolicited\0" in r and b"objref\0" in r for r in rules[:UNSOLICITED])
    return rules[UNSOLICITED:]


def test_unsolicited_replies_are_counted_and_pass_before_anything_holds_or_copies_them():
    """Issue #8, 1: conntrack (an established flow, the reply direction: the resolver did not
    send first) and the reverse-path check (fib saddr . iif oif exists), each negated."""
    for hold in (Hold.XT_NFQUEUE, Hold.NFT_QUEUE, Hold.PASSIVE):
        rules = nft.hold_rules(hold, 5241, prefilter_fd=None, snoop_group=5242)[:UNSOLICITED]
        assert [b"ct\0" in r and b"bitwise\0" in r for r in rules] == [True, False, False] * 2
        assert [b"fib\0" in r for r in rules] == [False, False, True] * 2
        assert all(b"queue\0" not in r and b"log\0" not in r and b"immediate\0" in r for r in rules)


def test_plain_hold_rules_queue_tcp_and_udp():
    rules = held(nft.hold_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=None, snoop_group=5242))
    assert len(rules) == 2 and all(b"NFQUEUE" in r for r in rules)


def test_prefiltered_hold_rules_match_bpf_then_copy_the_rest():
    rules = held(nft.hold_rules(Hold.NFT_QUEUE, 5241, prefilter_fd=7, snoop_group=5242))
    assert len(rules) == 3
    assert b"bpf\0" in rules[1] and b"queue\0" in rules[1]
    assert b"log\0" in rules[2] and b"queue\0" not in rules[2]


def test_native_queue_hold_uses_bypass():
    rules = held(nft.hold_rules(Hold.NFT_QUEUE, 7, prefilter_fd=None, snoop_group=2))
    bypass = netlink.attr(3, struct.pack("!H", netlink.NFQ_FLAG_BYPASS))
    number = netlink.attr(1, struct.pack("!H", 7))
    assert len(rules) == 2 and all(b"queue\0" in r and bypass in r and number in r for r in rules)


def test_passive_hold_copies_tcp_and_udp_replies_to_the_snoop_group():
    rules = held(nft.hold_rules(Hold.PASSIVE, 7, prefilter_fd=None, snoop_group=2))
    assert len(rules) == 2
    assert all(b"log\0" in r and netlink.attr(1, struct.pack("!H", 2)) in r and b"queue\0" not in r for r in rules)
    assert nft.hold_rules(Hold.NONE, 7, None, 2) == []


def test_replacing_flushes_and_adds_in_one_transaction():
    rules = held(nft.hold_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=None, snoop_group=5242))
    assert types(nft.build_rules_batch("inet", "ramfw", "dns_input", rules)) == [0x10, NEW, NEW, 0x11]
    assert types(nft.build_rules_batch("inet", "ramfw", "dns_input", rules, replace=True)) == [0x10, DEL, NEW, NEW, 0x11]


def test_elements_batch_when_the_kernel_refreshes_timeouts_is_one_add_per_family():
    [batch] = nft.build_elements_batches("ramfw", [Element("203.0.113.5", 90, "ghcr.io"),
                                                   Element("2001:db8::5", 60)], True)
    new = (10 << 8) | netlink.NFT_MSG_NEWSETELEM
    assert types(batch) == [0x10, new, new, 0x11]
    assert b"allow4\0" in batch and b"allow6\0" in batch and b"ghcr.io\0" in batch
    assert struct.pack("!Q", 90_000) in batch and socket.inet_aton("203.0.113.5") in batch


def test_elements_batch_when_the_kernel_keeps_old_timeouts_adds_deletes_adds():
    [batch] = nft.build_elements_batches("ramfw", [Element("203.0.113.5", 90)], False)
    new, delete = (10 << 8) | netlink.NFT_MSG_NEWSETELEM, (10 << 8) | netlink.NFT_MSG_DELSETELEM
    assert types(batch) == [0x10, new, delete, new, 0x11]
    assert nft.build_elements_batches("ramfw", [], True) == []


LONG_NAME = ".".join(["a" * 63, "b" * 63, "split-registry", "test"])  # the comment keeps 127 characters
WMEM_DEFAULT = 212992  # a netlink socket's send buffer; a datagram may use it less 32 bytes


class Recorder:
    """Stands for the table's netlink socket: keeps every datagram sent."""

    def __init__(self):
        self.sent = []

    def send(self, data):
        self.sent.append(bytes(data))
        return len(data)


def transactions(datagrams):
    """Each datagram read back whole: (message type, set name, [(address, comment)]) of each
    message. Lengths must add up exactly; an attribute cut short would lose its elements."""
    found = []
    for datagram in datagrams:
        assert len(datagram) <= WMEM_DEFAULT - 32
        steps, end = [], 0
        for msg_type, start, end in netlink.messages(datagram):
            attrs = netlink.parse_attrs(datagram, start + netlink.NFGEN.size, end)
            listed = attrs.get(netlink.NFTA_SET_ELEM_LIST_ELEMENTS, b"")
            elements = []
            for _, elem in netlink.iter_attrs(listed):
                e = netlink.parse_attrs(elem)
                key = netlink.parse_attrs(e[netlink.NFTA_SET_ELEM_KEY])[netlink.NFTA_DATA_VALUE]
                udata = e.get(netlink.NFTA_SET_ELEM_USERDATA, b"\0\0")
                elements.append((key, udata[2 : 2 + udata[1]].rstrip(b"\0").decode()))
            assert sum((len(elem) + 7) & ~3 for _, elem in netlink.iter_attrs(listed)) == len(listed)
            steps.append((msg_type & 0xFF, attrs.get(netlink.NFTA_SET_ELEM_LIST_SET, b"").rstrip(b"\0"), elements))
        assert end == len(datagram)
        assert steps[0][0] == netlink.NFNL_MSG_BATCH_BEGIN and steps[-1][0] == netlink.NFNL_MSG_BATCH_END
        found.append(steps[1:-1])
    return found


@pytest.mark.parametrize("refreshes, clear_pending", [(True, False), (False, False), (False, True)])
def test_a_reply_of_any_size_is_programmed_in_batches_netlink_can_carry(refreshes, clear_pending):
    """1000 AAAA with 127-character comments are 176 KiB of elements; an attribute's length is
    16 bits. Every datagram is a whole transaction; each address's add (and delete, add) share one."""
    pytest.importorskip("nftables")
    from ramfw.kernel.table import Table

    addresses = [f"2001:db8::{i:x}" for i in range(1000)] + [f"203.0.113.{i}" for i in range(200)]
    elements = [Element(address, 3660, LONG_NAME) for address in addresses]
    table = Table("ramfw")
    table._sock = Recorder()
    table.add_elements(elements, refreshes, clear_pending=clear_pending, check=False)
    where, done = {}, {}  # address -> the transaction that holds it, and the steps it takes there
    for number, steps in enumerate(transactions(table._sock.sent)):
        for kind, set_name, listed in steps:
            for key, comment in listed:
                assert where.setdefault(key, number) == number, "one address, one transaction"
                done.setdefault(key, []).append((kind, set_name, comment))
    assert sorted(done) == sorted(socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a)
                                  for a in addresses)
    new, delete = netlink.NFT_MSG_NEWSETELEM, netlink.NFT_MSG_DELSETELEM
    for key, steps in done.items():
        allow, pending = (b"allow6", b"pending6") if len(key) == 16 else (b"allow4", b"pending4")
        expected = [] if refreshes else [(new, allow, ""), (delete, allow, "")]
        expected.append((new, allow, LONG_NAME[:127]))
        if clear_pending:
            expected += [(new, pending, ""), (delete, pending, "")]
        assert steps == expected


def test_queries_are_copied_where_they_go_out_and_replies_held_where_they_come_in():
    """Issue #8: a reply is paired with its query, so the UDP queries are copied to the snoop
    group from the output and forward hooks, through the prefilter where it runs."""
    chains = nft.dns_chain_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=7, snoop_group=5242)
    replies = nft.hold_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=7, snoop_group=5242)
    queries = nft.query_rules(7, 5242)
    assert chains == {"dns_input": replies, "dns_forward": queries + replies, "dns_output": queries}
    dport = netlink.attr(3, struct.pack("!I", 2))  # the transport header's offset 2: the destination port
    for query, resolvers in zip(queries, (b"resolvers4\0", b"resolvers6\0"), strict=True):
        assert dport in query and b"bpf\0" in query and netlink.attr(1, struct.pack("!H", 5242)) in query
        assert b"lookup\0" in query and resolvers in query  # only queries to a trusted resolver
    assert all(b"bpf\0" not in q for q in nft.query_rules(None, 5242))
    assert nft.dns_chain_rules(Hold.NONE, 5241, None, 5242) == {}


def test_where_the_kernel_pairs_queries_are_recorded_not_copied():
    """With the prefilter's pairing (issue #8), the query rules run the query side of the
    pairing (it records the query and never matches) and log nothing; the replies are held
    through the reply side, and the daemon reads no copy of a query."""
    chains = nft.dns_chain_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=8, snoop_group=5242, pairing_fd=9)
    queries = chains["dns_output"]
    assert chains["dns_forward"] == queries + chains["dns_input"]
    assert chains["dns_input"] == nft.hold_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=8, snoop_group=5242)
    for query in queries:
        assert nft.bpf_match(9) in query and b"log\0" not in query
    assert all(nft.bpf_match(9) not in rule for rule in chains["dns_input"])
