"""The TLS server name check's rules (tlsrules.tls_rules), its conntrack messages and its settings:
pure, on rendered data."""

import socket
import struct

import pytest

from ramfw import config as config_mod
from ramfw.config import EnforcementSettings
from ramfw.errors import ConfigError
from ramfw.kernel import conntrack, netlink, nft, ruleset
from ramfw.kernel.ruleset import Hold

BASE = EnforcementSettings()


def rules(doc, chain):
    return [c["add"]["rule"]["expr"] for c in doc["nftables"] if "rule" in c.get("add", {})
            and c["add"]["rule"]["chain"] == chain]


def text(expr) -> str:
    return repr(expr)


def test_flows_to_be_read_are_sent_to_the_tls_chain_first_in_output_and_forward():
    doc = ruleset.build_ruleset(BASE, [], 10)
    mask = BASE.tls_mark_mask
    guard = [{"match": {"op": "!=", "left": {"&": [{"ct": {"key": "mark"}}, mask]}, "right": 0}},
             {"jump": {"target": "tls"}}]
    assert rules(doc, "output")[0] == guard
    copy, second = rules(doc, "forward")[:2]
    assert second == guard and {"log": {"group": BASE.tls_syn_group, "snaplen": ruleset.LOG_SNAPLEN}} in copy
    tls = rules(doc, "tls")
    assert "rst" in text(tls[0]) and tls[0][-1] == {"return": None}, "the refusal's own reset passes"
    assert {"reject": {"type": "tcp reset"}} in tls[1] and "'right': 512" in text(tls[1])
    queued = [r for r in tls if r[-1] == {"jump": {"target": "tls_queue"}}]
    assert len(queued) == 2 + 2 * 11, "IPv4 with options, IPv6 of payload length 0, then each TCP header length"
    assert "'ip6', 'field': 'length'}}, 'right': 0}" in text(queued[1]), "a jumbogram's length: Linux takes its data"
    four = [r for r in queued if "'doff'}}, 'right': 8" in text(r) and "'ip', 'field': 'length'" in text(r)]
    assert "'right': 52" in text(four), "a 32-byte TCP header: data only past 52 bytes"
    both = {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"|": [{"ct": {"key": "mark"}}, mask]}}}
    assert all(r[-2] == both for r in queued), "a flow whose first flight went to the queue says so in its mark"
    being_read = {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, BASE.tls_ct_mark]},
                            "right": BASE.tls_ct_mark}}
    assert copy[0] == being_read, "the server's packets are copied whether or not the first flight went yet"


def test_syns_to_tls_ports_of_learned_addresses_are_copied_and_marked_and_quic_refused():
    doc = ruleset.build_ruleset(EnforcementSettings(tls_ports=(443, 8443), proxies=("192.0.2.8:3128",)), [], 10)
    registry = rules(doc, "registry")
    accept = next(i for i, r in enumerate(registry) if "@allow4" in text(r))
    before = [text(r) for r in registry[:accept]]
    assert any("udplite" in r and "admin-prohibited" in r and "[443, 8443]" in r for r in before)
    assert any("'invalid'" in r and "'drop'" in r for r in before)
    assert any("'new'" in r and "'syn'" in r and "'drop'" in r for r in before)
    assert any("tls_syn" in r and "3128" in r for r in before), "the proxy's SYNs too"
    tls_syn = rules(doc, "tls_syn")
    copies = [r for r in tls_syn if {"log": {"group": 5244, "snaplen": ruleset.LOG_SNAPLEN}} in r]
    assert len(copies) == 5  # allow4, allow6, each also as the original destination of a DNAT; the proxy
    mark = copies[0][-1]["mangle"]
    assert mark["key"] == {"ct": {"key": "mark"}} and mark["value"]["|"][1] == 0x100
    assert all(r[-1] == {"drop": None} for r in tls_syn[:24]), "a SYN with data (TCP Fast Open) is dropped"


def test_audit_refuses_nothing_and_off_adds_nothing():
    audit = ruleset.build_ruleset(EnforcementSettings(mode="audit"), [], 10)
    assert not any("admin-prohibited" in text(r) and "udplite" in text(r) for r in rules(audit, "registry"))
    assert not any("'invalid'" in text(r) for r in rules(audit, "registry"))
    off = ruleset.build_ruleset(EnforcementSettings(tls_check=False), [], 10)
    assert rules(off, "tls") == rules(off, "tls_syn") == []
    assert not any("tls" in text(r) for r in rules(off, "output") + rules(off, "registry"))
    assert {c["add"]["chain"]["name"] for c in off["nftables"] if "chain" in c.get("add", {})} >= {
        "tls", "tls_syn", "tls_queue"}, "the chains exist either way"


def test_the_queue_rule_is_raw_with_bypass_and_only_where_a_queue_holds():
    found = nft.tls_queue_rules(Hold.XT_NFQUEUE, 5243)
    assert list(found) == ["tls_queue"] and b"NFQUEUE" in found["tls_queue"][0]
    info = struct.pack("=HHH", 5243, 1, netlink.NFQ_FLAG_BYPASS)
    assert info in found["tls_queue"][0]
    assert nft.tls_queue_rules(Hold.PASSIVE, 5243) == {} and nft.tls_queue_rules(Hold.NONE, 5243) == {}


def _attrs(data):
    return netlink.parse_attrs(data, netlink.HEADER.size + netlink.NFGEN.size)


def test_a_mark_message_finds_the_entry_by_its_reply_tuple_and_changes_only_the_masked_bits():
    flow = ("192.0.2.1", 40000, "203.0.113.50", 443)
    message = conntrack.mark_message(flow, 0x200, 0x300, 7, timeout=120)
    length, kind, flags, seq, _ = netlink.HEADER.unpack_from(message)
    assert length == len(message) and kind == (1 << 8) and flags & netlink.NLM_F_ACK and seq == 7
    attrs = _attrs(message)
    assert struct.unpack("!I", attrs[conntrack.CTA_MARK])[0] == 0x200
    assert struct.unpack("!I", attrs[conntrack.CTA_MARK_MASK])[0] == 0x300
    assert struct.unpack("!I", attrs[conntrack.CTA_TIMEOUT])[0] == 120
    assert conntrack._reply_flow(attrs) == flow, "read back as the client's packet shows it"
    six = ("2001:db8::1", 40000, "2001:db8::50", 443)
    assert conntrack._reply_flow(_attrs(conntrack.mark_message(six, 0, 0x300, 8))) == six
    quiet = conntrack.mark_message(flow, 0, 0x300, 9, ack=False)
    assert not netlink.HEADER.unpack_from(quiet)[2] & netlink.NLM_F_ACK
    assert socket.inet_pton(socket.AF_INET, "203.0.113.50") in message


def test_settings_are_checked():
    good = config_mod.from_text("[enforcement]\ntls_ports = [443, 8443]\ntls_ct_mark = 0x400\n")
    assert good.enforcement.tls_mark_mask == 0xC00
    for bad in ("tls_ports = []", "tls_ports = [0]", "tls_ct_mark = 3", "tls_ct_mark = 0x80000000",
                "tls_queue_num = 5241", "tls_syn_group = 5241", "tls_syn_group = 5242", "tls_check = 1"):
        with pytest.raises(ConfigError):
            config_mod.from_text(f"[enforcement]\n{bad}\n")


def test_the_servers_packets_are_copied_only_where_a_servers_packets_arrive():
    """Review: a packet forged locally in the server's name (CAP_NET_RAW), made for the local TCP
    to drop, was copied in the output hook and ended the check before the real first flight."""
    doc = ruleset.build_ruleset(BASE, [], 10)
    routed_back = {"match": {"op": "==", "left": {"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, "right": True}}
    not_loopback = {"match": {"op": "!=", "left": {"meta": {"key": "iif"}}, "right": "lo"}}
    (copy,) = rules(doc, ruleset.TLS_INPUT)
    assert routed_back in copy and not_loopback in copy
    forwarded = rules(doc, "forward")[0]
    assert routed_back in forwarded and "container_bridges" in text(forwarded)
    assert not any("'log'" in text(rule) for rule in rules(doc, "tls") + rules(doc, "output")), \
        "nothing in the output hook is taken for the server's"


@pytest.mark.parametrize("state", [
    "NOT checked: this kernel cannot queue packets; flows to learned addresses pass on their address alone",
    "NOT reliably checked: another table may change the conntrack mark bits the check keeps a flow's state in "
    "(0x300): table ip wg chain out rule handle 2 (ct mark set meta mark); while it is there, ...",
])
def test_a_tls_check_the_kernel_cannot_run_or_another_table_undoes_is_said_first_and_exits_8(monkeypatch, state):
    """Never claim what is not true: configured, the check that cannot run (no netfilter queue),
    or whose conntrack mark bits another table's rule may write (``kernel.ctmarks``), leaves the
    shared-address hole open; status's first line says so, and it is degraded (8)."""
    from ramfw import api
    from ramfw.config import Config
    from ramfw.daemon import control

    answer = {"ok": True, "status": {"policy": {"enabled": True, "organization": "acme"}, "enforcing": True,
                                     "mode": "enforce", "engine": {}, "scope_in_force": ["engine"],
                                     "tls": {"state": state}}}
    monkeypatch.setattr(control, "request", lambda config, command: answer)
    result = api.status(Config())
    assert result["degraded"] and result["message"] == (
        f"ramfw is enforcing in enforce mode, but NOT as configured: TLS server names {state}")
    answer["status"]["tls"]["state"] = "active"
    assert not api.status(Config()).get("degraded")
