"""The hand-read DNS of the hold path, held to dnspython on adversarial wire (the generator and
the fuzzer are in tests/support/fuzz.py)."""

import struct

import dns.exception

from ramfw import policy
from ramfw.config import DnsSettings
from ramfw.snoop.wire import fast_chain, question_name
from tests.support.fuzz import LENIENT_DNSPYTHON, dnspython_name, dnspython_question, fuzz, messages, packed
from tests.support.packets import RESOLVER, AskedSnooper, tcp, udp


def test_question_name_reads_what_dnspython_reads():
    compared = 0
    for wire in messages(2500, seed=8):
        ours = question_name(wire)
        message, theirs = dnspython_question(wire)
        if theirs is not None and message.flags & 0x8000:
            compared += 1
            assert ours == theirs or (ours is None and LENIENT_DNSPYTHON), wire
        if len(wire) >= 12 and wire[2] & 0x80 and struct.unpack_from("!H", wire, 4)[0]:
            alone = dnspython_name(wire, 12)  # the name by itself, whatever follows it
            assert ours == alone or (ours is None and LENIENT_DNSPYTHON), wire
    assert compared > 1200


def test_question_name_on_every_truncation_of_odd_names():
    for labels in ([b"ghcr.io"], [b"gh\xc3\xa9cr", b"io"], [b"GHCR", b"IO"], [b"a b", b"\\", b"io"],
                   [b"x" * 63] * 3 + [b"y" * 61], [b"x" * 63] * 3 + [b"y" * 62]):
        wire = struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0) + b"".join(
            bytes([len(label)]) + label for label in labels) + b"\0\0\1\0\1"
        for cut in range(len(wire) + 1):
            assert question_name(wire[:cut]) == dnspython_name(wire[:cut], 12), (labels, cut)


def test_dotted_and_escaped_names_read_as_dnspython_writes_them():
    def name_of(*labels):
        return question_name(struct.pack("!HHHHHH", 1, 0x8180, 1, 0, 0, 0)
                             + b"".join(bytes([len(label)]) + label for label in labels) + b"\0\0\1\0\1")

    assert name_of(b"ghcr.io") == "ghcr\\.io"
    assert name_of(b"GHCR", b"Io") == "ghcr.io"
    assert name_of(b"gh\xc3\xa9", b"io") == "gh\\195\\169.io"
    assert name_of(b"a b", b'"x"', b"io") == 'a\\032b.\\"x\\".io'
    assert name_of() == "."


def test_fast_chain_agrees_with_resolve_chaining_on_adversarial_wire():
    followed = 0
    for wire in messages(2500, seed=9):
        fast = fast_chain(wire)
        message, _ = dnspython_question(wire)
        if message is None:
            continue
        try:
            result = message.resolve_chaining()
        except (dns.exception.DNSException, ValueError, KeyError):
            assert fast is None, wire
            continue
        if fast is None:
            continue
        followed += 1
        addresses, ttl = fast
        want = {r.address for r in result.answer} if result.answer is not None else set()
        assert len(addresses) == len(set(addresses)) and packed(addresses) == packed(want), wire
        if want:
            assert ttl == result.minimum_ttl, wire
    assert followed > 800


def test_the_snooper_never_raises_and_never_learns_from_a_dotted_or_escaped_name():
    s = AskedSnooper(policy.from_data({"organizations": [{"name": "t", "registryAccess": {
        "allowDockerHub": False, "registries": [{"address": "ghcr.io"}, {"address": "io"}]}}]}),
        {RESOLVER}, DnsSettings())

    def wire_for(*labels):
        name = b"".join(bytes([len(label)]) + label for label in labels) + b"\0"
        return (struct.pack("!HHHHHH", 1, 0x8180, 1, 1, 0, 0) + name + b"\0\1\0\1"
                + b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 300, 4) + bytes([203, 0, 113, 9]))

    for labels in ([b"ghcr.io"], [b"a.ghcr", b"io"], [b"x", b"ghcr.io"], [b"\xff", b"ghcr", b"io\x00"],
                   [b"ghcr\\", b"io"], [b"gh\xc3\xa9cr", b"io"], [b"ghcr ", b"io"]):
        wire = wire_for(*labels)
        for packet in (udp(wire), tcp(struct.pack("!H", len(wire)) + wire, 1)):
            s.on_packet(tcp(b"", 0, flags=0x12), 0)
            decision = s.on_packet(packet, 0)
            assert decision.accept and decision.elements == [], labels
    assert s.total == 0 and not s.learned
    assert [e.name for e in s.on_packet(udp(wire_for(b"x", b"GHCR", b"io")), 0).elements] == ["x.ghcr.io"]
    for wire in messages(1500, seed=10):
        s.on_packet(udp(wire), 0)
        s.on_packet(tcp(b"", 0, flags=0x12), 0)
        s.on_packet(tcp(struct.pack("!H", len(wire)) + wire, 1, flags=0x19), 0)


def test_a_short_fuzz_run_finds_nothing():
    """Issue #10: no exception escapes the pure core, and it agrees with dnspython on what
    dnspython accepts (``scripts/bench fuzz`` runs a million packets)."""
    found = fuzz(3000, seed=11)
    assert found["packets"] > 6000
    assert (found["exceptions"], found["question_differs"], found["chain_differs"]) == (0, 0, 0), found["examples"]


def test_replies_of_other_opcodes_are_malformed_not_an_exception():
    """The million-packet fuzz run found them: dnspython reads an UPDATE or NOTIFY reply as a plain
    Message, which has no resolve_chaining; the snooper raised AttributeError."""
    s = AskedSnooper(policy.from_data({"organizations": [{"name": "t", "registryAccess": {
        "allowDockerHub": False, "registries": [{"address": "io"}]}}]}), {RESOLVER}, DnsSettings())
    for found in ("21738980000100010000000002696f0171044748435202696f000005000102494f0151044748435202494f0000050001"
                  "0000e898000702494f0151c023", "b72cc1c0000100000000000002696f00005c0001"):
        decision = s.on_packet(udp(bytes.fromhex(found)), 0)
        assert decision.accept and decision.elements == []
    assert s.counters["malformed"] == 2
