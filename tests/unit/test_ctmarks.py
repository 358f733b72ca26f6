"""Other tables' writes to the TLS check's conntrack mark bits (``kernel.ctmarks``), over the
ruleset real nft listed (tests/fixtures/ctmarks-ruleset.nft says how it was made): full-width
writes (wg-quick's ``ct mark set meta mark``, a constant, a map, a hash), masked writes that
cover the bits, and iptables-nft's CONNMARK are found; masked writes that leave the bits, reads,
and ramfw's own table are not."""

import json
from pathlib import Path

from ramfw.config import EnforcementSettings
from ramfw.kernel import ctmarks
from ramfw.kernel.probes import Capability, Report
from ramfw.tls import doctor

FIXTURE = json.loads((Path(__file__).parents[1] / "fixtures" / "ctmarks-ruleset.json").read_text())
MASK = EnforcementSettings().tls_mark_mask  # 0x300
CT_MARK = {"ct": {"key": "mark"}}


def found(mask=MASK, ruleset=FIXTURE, own="ramfw"):
    return {(w.family, w.table, w.chain, w.handle): w.statement for w in ctmarks.mark_writers(ruleset, mask, own)}


def test_the_writes_that_can_change_the_bits_are_found_as_nft_lists_them():
    assert found() == {
        ("ip", "wg-quick-like", "postmangle", 3): "ct mark set meta mark",
        ("inet", "hand", "out", 3): "ct mark set 0x5",
        ("inet", "hand", "out", 4): "ct mark set meta mark & 0xff",  # `ct mark set mark and 0xff`
        ("inet", "hand", "out", 5): "ct mark set ip daddr map @marks",
        ("inet", "hand", "out", 7): "ct mark set ip daddr map { ... }",
        ("inet", "hand", "out", 8): "ct mark set ct mark & 0xff",  # clears the bits
        ("inet", "hand", "out", 9): "ct mark set ct mark | 0x200",  # sets "refused"
        ("inet", "hand", "out", 10): "ct mark set ct mark | 0x100",  # `ct mark and 0xfffffeff or 0x100`
        ("inet", "hand", "out", 11): "ct mark set ct mark >> 1",
        ("inet", "hand", "out", 12): "ct mark set jhash ...",
        ("inet", "hand", "out", 13): "ct mark set meta mark & 0xff | 0x1",
        ("ip", "ramfw", "out", 2): "ct mark set meta mark",  # ramfw's name, but not its table (inet)
        ("ip", "mangle", "OUTPUT", 2): "iptables CONNMARK, not inspectable",  # --set-mark 0x1
        ("ip", "mangle", "POSTROUTING", 4): "iptables CONNMARK, not inspectable",  # --save-mark
        ("ip6", "mangle", "OUTPUT", 2): "iptables CONNMARK, not inspectable",  # --set-xmark 0x1/0xff
    }


def test_masked_writes_that_leave_the_bits_reads_and_ramfws_own_table_are_not_found():
    reported = found()
    assert not [key for key in reported if key[1] == "tailscale-like"], \
        "& 0xff04ffff | 0x40000, | 0x10000, ^ 0x1, ct mark itself, & 0xffffff04 | 0x4; meta mark set ct mark; a match"
    assert ("inet", "ramfw", "tls_syn", 3) not in reported, "ramfw's own table (its `ct mark set meta mark` too)"
    assert ("wg-quick-like", "premangle") not in {key[1:3] for key in reported}, "meta mark set ct mark: a read"
    assert ("ip", "mangle", "OUTPUT", 5) not in reported and ("ip", "mangle", "OUTPUT", 6) not in reported, \
        "the connmark match and the MARK target do not write the conntrack mark"


def test_the_mask_decides_which_masked_writes_count():
    moved = found(mask=0xC0000000)  # enforcement.tls_ct_mark = 0x40000000
    assert ("inet", "hand", "out", 9) not in moved and ("inet", "hand", "out", 8) in moved  # | 0x200; & 0xff
    assert ("ip", "wg-quick-like", "postmangle", 3) in moved, "a full-width write covers every bit"
    low = found(mask=0x3)  # enforcement.tls_ct_mark = 0x1
    assert low[("ip", "tailscale-like", "out", 4)] == "ct mark set ct mark ^ 0x1"
    assert ("ip", "tailscale-like", "out", 6) in low, "& 0xffffff04 | 0x4 clears bit 0x2"
    assert ("ip", "tailscale-like", "out", 2) not in low


def test_kept_bits_follow_the_operations_down_and_know_nothing_of_other_shapes():
    assert ctmarks.kept_bits(CT_MARK) == 0xFFFFFFFF
    assert ctmarks.kept_bits({"|": [{"&": [CT_MARK, 0xFF00FFFF]}, 0x40000]}) == 0xFF00FFFF & ~0x40000
    assert ctmarks.kept_bits({"^": [{"&": [CT_MARK, 0xFFFFFCFF]}, 4]}) == 0xFFFFFCFB
    assert ctmarks.kept_bits({"|": [0x1, CT_MARK]}) == 0xFFFFFFFE, "the constant on either side"
    assert ctmarks.kept_bits({"&": [CT_MARK, -1]}) == 0xFFFFFFFF
    for unknown in (5, "0x5", None, True, {"&": [CT_MARK, True]}, {"&": [CT_MARK, {"meta": {"key": "mark"}}]},
                    {"&": [{"meta": {"key": "mark"}}, 0xFFFFFFFF]}, {"&": [CT_MARK]}, {"|": [CT_MARK, 1], "x": 1},
                    {"ct": {"key": "label"}}, {"numgen": {"mode": "inc", "mod": 2, "offset": 0}}, [CT_MARK]):
        assert ctmarks.kept_bits(unknown) == 0, unknown


def test_a_shape_not_known_here_counts_as_a_writer_and_junk_is_passed_by():
    rule = {"family": "inet", "table": "t", "chain": "c", "handle": 9, "expr": [
        {"mangle": {"key": CT_MARK, "value": {"future": {"op": [1, 2]}}}},
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 1}}]}
    ruleset = {"nftables": [{"metainfo": {}}, "junk", {"rule": {"family": "ip"}}, {"rule": rule},
                            {"rule": {**rule, "table": "ramfw", "handle": 10}}]}
    assert found(ruleset=ruleset) == {("inet", "t", "c", 9): "ct mark set future ..."}
    assert found(ruleset={}) == {} and found(ruleset={"nftables": []}) == {}


def test_doctor_and_status_say_which_rule_and_what_to_do():
    settings = EnforcementSettings()
    report = Report("6.18", (Capability("xt_nfqueue", True, "", ""),))  # the check can run
    writers = ctmarks.mark_writers(FIXTURE, MASK, "ramfw")
    said = doctor.doctor_text(settings, report, writers).splitlines()
    assert said[1] == ("TLS server names may NOT be checked: rules of other tables may change the conntrack mark "
                       "bits the check keeps a flow's state in (0x300); while one is there, a flow whose bit it "
                       "clears passes on its address alone and one whose bit it sets is reset (make that rule leave "
                       "those bits, or move enforcement.tls_ct_mark to a free bit):")
    assert said[2:] == [f"  {writer}" for writer in writers], "every rule, one a line"
    assert said[2] == "  table ip wg-quick-like chain postmangle rule handle 3 (ct mark set meta mark)"
    assert doctor.doctor_text(settings, report, []).splitlines()[-1] == \
        "TLS server names: no other table writes the check's conntrack mark bits (0x300)"
    assert doctor.writers_text(writers, MASK) == (  # status's first line, after "TLS server names NOT reliably checked: "
        "another table may change the conntrack mark bits the check keeps a flow's state in (0x300): table ip "
        "wg-quick-like chain postmangle rule handle 3 (ct mark set meta mark); table inet hand chain out rule handle 3 "
        "(ct mark set 0x5); table inet hand chain out rule handle 4 (ct mark set meta mark & 0xff); and 12 more; while "
        "it is there, a flow whose bit it clears passes on its address alone and one whose bit it sets is reset (make "
        "that rule leave those bits, or move enforcement.tls_ct_mark to a free bit)")
