import socket
import struct

from ramfw.kernel import netlink, nft
from ramfw.kernel.ruleset import Hold
from ramfw.snoop.snooper import Element

NEW, DEL = (10 << 8) | netlink.NFT_MSG_NEWRULE, (10 << 8) | netlink.NFT_MSG_DELRULE


def types(batch):
    return [msg_type for msg_type, _, _ in netlink.messages(batch)]


def test_plain_hold_rules_queue_tcp_and_udp():
    rules = nft.hold_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=None, snoop_group=5242)
    assert len(rules) == 2 and all(b"NFQUEUE" in r for r in rules)


def test_prefiltered_hold_rules_match_bpf_then_copy_the_rest():
    rules = nft.hold_rules(Hold.NFT_QUEUE, 5241, prefilter_fd=7, snoop_group=5242)
    assert len(rules) == 3
    assert b"bpf\0" in rules[1] and b"queue\0" in rules[1]
    assert b"log\0" in rules[2] and b"queue\0" not in rules[2]


def test_native_queue_hold_uses_bypass():
    rules = nft.hold_rules(Hold.NFT_QUEUE, 7, prefilter_fd=None, snoop_group=2)
    bypass = netlink.attr(3, struct.pack("!H", netlink.NFQ_FLAG_BYPASS))
    number = netlink.attr(1, struct.pack("!H", 7))
    assert len(rules) == 2 and all(b"queue\0" in r and bypass in r and number in r for r in rules)


def test_passive_hold_copies_tcp_and_udp_replies_to_the_snoop_group():
    rules = nft.hold_rules(Hold.PASSIVE, 7, prefilter_fd=None, snoop_group=2)
    assert len(rules) == 2
    assert all(b"log\0" in r and netlink.attr(1, struct.pack("!H", 2)) in r and b"queue\0" not in r for r in rules)
    assert nft.hold_rules(Hold.NONE, 7, None, 2) == []


def test_replacing_flushes_and_adds_in_one_transaction():
    rules = nft.hold_rules(Hold.XT_NFQUEUE, 5241, prefilter_fd=None, snoop_group=5242)
    assert types(nft.build_rules_batch("inet", "ramfw", "dns_input", rules)) == [0x10, NEW, NEW, 0x11]
    assert types(nft.build_rules_batch("inet", "ramfw", "dns_input", rules, replace=True)) == [0x10, DEL, NEW, NEW, 0x11]


def test_elements_batch_when_the_kernel_refreshes_timeouts_is_one_add_per_family():
    batch = nft.build_elements_batch("ramfw", [Element("203.0.113.5", 90, "ghcr.io"),
                                               Element("2001:db8::5", 60)], True)
    new = (10 << 8) | netlink.NFT_MSG_NEWSETELEM
    assert types(batch) == [0x10, new, new, 0x11]
    assert b"allow4\0" in batch and b"allow6\0" in batch and b"ghcr.io\0" in batch
    assert struct.pack("!Q", 90_000) in batch and socket.inet_aton("203.0.113.5") in batch


def test_elements_batch_when_the_kernel_keeps_old_timeouts_adds_deletes_adds():
    batch = nft.build_elements_batch("ramfw", [Element("203.0.113.5", 90)], False)
    new, delete = (10 << 8) | netlink.NFT_MSG_NEWSETELEM, (10 << 8) | netlink.NFT_MSG_DELSETELEM
    assert types(batch) == [0x10, new, delete, new, 0x11]
    assert nft.build_elements_batch("ramfw", [], True) == b""
