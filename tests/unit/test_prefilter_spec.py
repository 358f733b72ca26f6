"""would_hold, the prefilter's executable specification, on hand-picked packets (no root: the
kernel's run of the program against it is tests/integration/test_prefilter_reference.py)."""

import struct

import pytest

from ramfw.kernel.prefilter import MAX_LABELS, key, keys_for, would_hold
from ramfw.policy.names import parse_entry
from tests.support.packets import reply, udp, udp6

KEYS = keys_for(parse_entry(e).pattern for e in ("ghcr.io", "*.blob.core.windows.net", "registry"))
HEADER = b"\x12\x34\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00"  # a response, one question


def wire(*labels: bytes) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def question(name_wire: bytes) -> bytes:
    return HEADER + name_wire + b"\x00\x01\x00\x01"


@pytest.mark.parametrize("name, held", [
    ("ghcr.io", True), ("GHCR.IO", True), ("pkg.ghcr.io", True),  # the last two labels
    ("x.blob.core.windows.net", True), ("windows.net", True),     # a superset: the daemon decides
    ("registry", True), ("a.b.Registry", True),                   # a one-label entry: the last label
    ("github.com", False), ("badghcr.io", False), ("ghcr.io.evil.test", False), ("registryx", False),
])
def test_names_are_held_by_their_last_one_or_two_labels(name, held):
    assert would_hold(udp(reply(name)), KEYS) is held
    assert would_hold(udp6(reply(name)), KEYS) is held


def test_the_keys_are_the_wire_form_hash():
    assert KEYS >= {key(b"\x04ghcr\x02io"), key(b"\x07windows\x03net"), key(b"\x08registry")}
    assert key(b"\x04GHCR\x02IO") == key(b"\x04ghcr\x02io")


def test_what_it_does_not_follow_is_held():
    assert would_hold(udp(question(b"\xc0\x0c")), KEYS), "a compression pointer"
    assert would_hold(udp(question(b"\x03pkg\xc0\x0c")), KEYS), "a pointer after a label"
    assert would_hold(udp(question(b"\x40" + b"a" * 64 + b"\0")), KEYS), "a length over 63"
    hop_by_hop = bytearray(udp6(reply("github.com")))
    hop_by_hop[6] = 0
    assert would_hold(bytes(hop_by_hop), KEYS), "an IPv6 extension header"
    assert would_hold(b"\x50" + udp(reply("github.com"))[1:], KEYS), "IP version 5"


def test_the_label_bound_holds_from_128_labels():
    for count, held in ((MAX_LABELS - 1, False), (MAX_LABELS, True), (MAX_LABELS + 1, True)):
        packet = udp(question(wire(*[b"a"] * count)))
        assert would_hold(packet, KEYS) is held, count
    # held at the bound before the next length byte is read: even when there is none
    cut = udp(question(wire(*[b"a"] * MAX_LABELS)))
    assert would_hold(cut[:cut.index(b"\x01a" * MAX_LABELS) + 2 * MAX_LABELS], KEYS)


def test_a_read_past_the_end_passes():
    packet = udp(reply("pkg.ghcr.io"))
    assert would_hold(packet, KEYS)
    end = 20 + 8 + 12 + len(b"\x03pkg\x04ghcr\x02io")  # the terminating zero
    assert would_hold(packet[:end + 1], KEYS), "the whole name: held"
    for cut in range(end + 1):
        assert not would_hold(packet[:cut], KEYS), cut


def test_the_root_name_and_an_empty_key_set_pass():
    assert not would_hold(udp(question(b"\0")), KEYS)
    assert not would_hold(udp(reply("ghcr.io")), set())


def test_ipv4_options_move_the_question():
    for name, held in (("pkg.ghcr.io", True), ("github.com", False)):
        plain = udp(reply(name))
        options = bytes([0x46]) + plain[1:20] + b"\x01\x01\x01\x00" + plain[20:]  # IHL 6: 4 bytes of options
        assert would_hold(options, KEYS) is held
    # IHL is trusted: IHL 6 without the options reads the name 4 bytes late ("1234" is then a length)
    assert not would_hold(bytes([0x46]) + udp(reply("1234.ghcr.io"))[1:], KEYS)


def test_flags_and_counts_are_not_read():
    name = wire(b"ghcr", b"io")
    for flags, qdcount in ((0x0100, 1), (0x8180, 0)):  # a query; a response with no question
        message = struct.pack("!HHHHHH", 1, flags, qdcount, 0, 0, 0) + name + b"\x00\x01\x00\x01"
        assert would_hold(udp(message), KEYS)
