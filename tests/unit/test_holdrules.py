from ramfw import holdrules, netlink

NEW, DEL = (10 << 8) | holdrules.NFT_MSG_NEWRULE, (10 << 8) | holdrules.NFT_MSG_DELRULE


def types(batch):
    return [msg_type for msg_type, _, _ in netlink.messages(batch)]


def test_plain_hold_rules_queue_tcp_and_udp():
    rules = holdrules.hold_rules(5241, native=False, prefilter_fd=None, snoop_group=5242)
    assert len(rules) == 2 and all(b"NFQUEUE" in r for r in rules)


def test_prefiltered_hold_rules_match_bpf_then_copy_the_rest():
    rules = holdrules.hold_rules(5241, native=True, prefilter_fd=7, snoop_group=5242)
    assert len(rules) == 3
    assert b"bpf\0" in rules[1] and b"queue\0" in rules[1]
    assert b"log\0" in rules[2] and b"queue\0" not in rules[2]


def test_replacing_flushes_and_adds_in_one_transaction():
    rules = holdrules.hold_rules(5241, native=False, prefilter_fd=None, snoop_group=5242)
    assert types(holdrules.build_batch("inet", "ramfw", "dns_input", rules)) == [0x10, NEW, NEW, 0x11]
    assert types(holdrules.build_batch("inet", "ramfw", "dns_input", rules, replace=True)) == [0x10, DEL, NEW, NEW, 0x11]


def test_netlink_hold_leaves_the_dns_chains_to_holdrules():
    from ramfw import ruleset
    from ramfw.config import EnforcementSettings

    doc = ruleset.build_ruleset(EnforcementSettings(), [], 10, "netlink", 1, 2)
    flushed = {c["flush"]["chain"]["name"] for c in doc["nftables"] if "flush" in c and "chain" in c["flush"]}
    assert flushed == {"output", "forward", "registry"}
