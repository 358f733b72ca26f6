from dataclasses import replace

import pytest

from ramfw.config import EnforcementSettings
from ramfw.kernel import ruleset
from ramfw.kernel.ruleset import Hold
from ramfw.snoop import resolvers

BASE = EnforcementSettings()


def commands(doc, verb, kind):
    return [c[verb][kind] for c in doc["nftables"] if verb in c and kind in c[verb]]


def rules(doc, chain):
    return [r["expr"] for r in commands(doc, "add", "rule") if r["chain"] == chain]


def test_one_transaction_owns_one_table():
    doc = ruleset.build_ruleset(BASE, ["192.0.2.53"], 1000)
    tables = {c.get("table") or c.get("name") for verb in ("add", "flush")
              for kind in ("table", "set", "chain", "rule", "counter", "element")
              for c in commands(doc, verb, kind)}
    assert tables == {"ramfw"}
    assert not commands(doc, "delete", "set"), "sets are kept so learned addresses survive re-apply"


def test_allowed_sets_have_timeouts_and_a_size():
    doc = ruleset.build_ruleset(BASE, [], 1234)
    sets = {s["name"]: s for s in commands(doc, "add", "set")}
    assert sets["allow4"]["type"] == "ipv4_addr" and sets["allow6"]["type"] == "ipv6_addr"
    assert sets["allow4"]["flags"] == ["timeout"] and sets["allow4"]["size"] == 1234


def test_output_chain_order_loopback_containers_peer_first_established_own_traffic_then_scope():
    guard, *out = rules(ruleset.build_ruleset(BASE, [], 10), "output")
    assert guard[-1] == {"jump": {"target": ruleset.TLS_CHAIN}}  # first: flows whose first flight is to be read
    marked = [{"match": {"op": "==", "left": {"&": [{"meta": {"key": "mark"}}, BASE.mark_mask]}, "right": BASE.mark}},
              {"jump": {"target": "registry"}}]
    reply = {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}}
    assert out[0][0]["match"] == {"op": "==", "left": {"meta": {"key": "oif"}}, "right": "lo"}
    assert out[1] == [{"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "@container_bridges"}},
                      {"accept": None}]
    assert out[2][0] == reply and out[2][-2:] == marked  # a bare SYN in the reply direction
    assert out[3][0] == reply and out[3][-2:] == marked  # UDP to a registry port in the reply direction
    original = {"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "original"}}
    established = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": "established"}}
    assert out[4][:2] == [original, established] and out[4][-2:] == marked  # a bare SYN on a reused tuple
    assert out[5][0]["match"]["left"] == {"ct": {"key": "state"}} and out[5][-1] == {"accept": None}
    assert out[6] == [{"jump": {"target": ruleset.OWN_CHAIN}}]
    assert out[7] == marked
    assert len(out) == 8


def test_the_own_traffic_chain_is_made_but_never_flushed_by_the_json_transaction():
    """Its rules (by cgroup id, in raw netlink) are the daemon's to swap, like the DNS chains'."""
    doc = ruleset.build_ruleset(BASE, [], 10)
    assert ruleset.OWN_CHAIN in {c["name"] for c in commands(doc, "add", "chain")}
    assert ruleset.OWN_CHAIN not in {c["name"] for c in commands(doc, "flush", "chain")}


def test_engine_scope_leaves_forwarded_traffic_alone():
    fwd = rules(ruleset.build_ruleset(BASE, [], 10), "forward")
    assert all({"jump": {"target": "registry"}} not in r for r in fwd)


def test_host_and_containers_scopes_filter_registry_ports():
    s = replace(BASE, scope=("host", "containers"), registry_ports=(5000, 443))
    doc = ruleset.build_ruleset(s, [], 10)
    for chain in ("output", "forward"):
        jumps = [r for r in rules(doc, chain) if {"jump": {"target": "registry"}} in r]
        assert len(jumps) == 4  # two for flows the peer opened, one for a tuple used again, then new ones
        assert all({"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}},
                              "right": {"set": [443, 5000]}}} in jump for jump in jumps)


def test_registry_chain_enforce_rejects_and_counts():
    chain = rules(ruleset.build_ruleset(BASE, ["192.0.2.53", "2001:db8::53"], 10), "registry")
    flat = [e for r in chain for e in r]
    assert {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}},
                      "right": "@allow4"}} in flat
    assert {"reject": {"type": "tcp reset"}} in flat
    assert {"reject": {"type": "icmpx", "expr": "admin-prohibited"}} in flat
    assert {"counter": "blocked"} in flat
    assert chain[-1] == [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]


def test_registry_chain_audit_accepts_and_counts():
    chain = rules(ruleset.build_ruleset(replace(BASE, mode="audit"), [], 10), "registry")
    flat = [e for r in chain for e in r]
    assert not any("reject" in e for e in flat)
    assert chain[-1][-2:] == [{"counter": "audited"}, {"accept": None}]


def test_resolvers_are_split_by_family_and_replaced():
    doc = ruleset.build_ruleset(BASE, ["2001:db8::53", "192.0.2.53", "192.0.2.53"], 10)
    elements = {e["name"]: e["elem"] for e in commands(doc, "add", "element")}
    assert elements == {"resolvers4": ["192.0.2.53"], "resolvers6": ["2001:db8::53"]}
    assert {s["name"] for s in commands(doc, "flush", "set")} == {"resolvers4", "resolvers6"}


def test_parse_state_reads_back_counters_elements_and_mode():
    listing = {"nftables": [
        {"metainfo": {}},
        {"table": {"family": "inet", "name": "ramfw"}},
        {"counter": {"name": "blocked", "packets": 3, "bytes": 180}},
        {"set": {"name": "allow4", "elem": [{"elem": {"val": "203.0.113.5", "timeout": 90,
                                                       "expires": 80, "comment": "ghcr.io"}}]}},
        {"set": {"name": "resolvers4", "elem": ["192.0.2.53"]}},
        {"rule": {"chain": "registry", "expr": [{"log": {"prefix": "ramfw audit", "group": 5241}}]}},
    ]}
    state = ruleset.parse_state(listing)
    assert state.mode == "audit" and state.counters["blocked"]["packets"] == 3
    assert state.learned == (ruleset.Learned("203.0.113.5", 80, 90, "ghcr.io"),)
    assert state.resolvers == ("192.0.2.53",)


def test_trusted_resolvers_default_to_resolv_conf_only(tmp_path):
    """Issue #8, 2: no address is trusted for being well known (127.0.0.11, 10.255.255.254 and
    the like were, whatever resolv.conf said); a loopback stub only when resolv.conf names it."""
    conf = tmp_path / "resolv.conf"
    conf.write_text("# comment\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\nnameserver bogus\nsearch x\n")
    assert resolvers.trusted((), conf) == ["192.0.2.53", "fe80::1"]
    assert resolvers.with_origins((), conf) == [("192.0.2.53", str(conf)), ("fe80::1", str(conf))]
    assert resolvers.trusted(("2001:db8::53",), conf) == ["2001:db8::53"]
    assert resolvers.with_origins(("2001:db8::53",), conf) == [("2001:db8::53", "dns.trusted_resolvers")]
    assert resolvers.trusted((), tmp_path / "missing") == []
    conf.write_text("nameserver 127.0.0.53\n")
    assert resolvers.trusted((), conf) == ["127.0.0.53"]


def test_passive_hold_defers_first_syns():
    doc = ruleset.build_ruleset(BASE, [], 10, Hold.PASSIVE)
    flat = [e for r in rules(doc, "registry") for e in r]
    assert {"set": {"op": "add", "elem": {"payload": {"protocol": "ip", "field": "daddr"}}, "set": "@pending4"}} in flat
    assert {"drop": None} in flat


def test_the_dns_chains_exist_and_their_rules_are_left_to_the_hold_transaction():
    for hold in Hold:
        doc = ruleset.build_ruleset(BASE, [], 10, hold)
        chains = {c["name"] for c in commands(doc, "add", "chain")}
        flushed = {c["name"] for c in commands(doc, "flush", "chain")}
        assert set(ruleset.RAW_CHAINS) <= chains
        assert flushed == {"output", "forward", "registry", "tls", "tls_syn", "tls_input"}  # tls_queue: raw, swapped
        assert all(rules(doc, chain) == [] for chain in ruleset.RAW_CHAINS)


def test_container_bridges_are_bridges_whose_ports_are_all_veths_or_taps():
    from ramfw.kernel import links

    found = [(1, "lo", "", 0), (2, "docker0", "bridge", 0), (3, "veth1", "veth", 2), (4, "veth2", "veth", 2),
             (5, "br0", "bridge", 0), (6, "eth0", "", 5), (7, "vm-br", "bridge", 0), (8, "tap0", "tun", 7),
             (9, "br-empty", "bridge", 0), (10, "bond-br", "bridge", 0), (11, "bond0", "bond", 10)]
    assert links.container_bridges(found) == ["br-empty", "docker0", "vm-br"]


def test_a_bridge_with_a_veth_whose_other_end_is_here_is_not_a_container_bridge():
    """That other end may be a port of a bridge with a NIC: traffic onto this one leaves the VM."""
    from ramfw.kernel import links

    found = [(2, "br-a", "bridge", 0), (3, "va", "veth-here", 2), (4, "vb", "veth-here", 5),
             (5, "br-uplink", "bridge", 0), (6, "eth0", "", 5)]
    assert links.container_bridges(found) == []


def test_a_link_dump_that_was_interrupted_or_failed_is_an_error_not_a_short_list():
    import struct

    from ramfw.kernel import links, netlink

    body = links.IFINFOMSG.pack(0, 0, 7, 0, 0) + netlink.attr(links.IFLA_IFNAME, b"docker0\0")
    whole = netlink.HEADER.pack(netlink.HEADER.size + len(body), links.RTM_NEWLINK, 0, 1, 0) + body
    assert links._links(whole) == [(7, "docker0", "", 0)]
    interrupted = netlink.HEADER.pack(netlink.HEADER.size + len(body), links.RTM_NEWLINK, links.NLM_F_DUMP_INTR, 1, 0)
    with pytest.raises(InterruptedError):
        links._links(interrupted + body)
    error = netlink.HEADER.pack(netlink.HEADER.size + 4, netlink.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -16)
    with pytest.raises(OSError):
        links._links(error)
