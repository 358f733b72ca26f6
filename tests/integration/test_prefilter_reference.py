"""The DNS prefilter three ways, on the same packets: the hand-assembled program and its C
reference (bpf/dns_prefilter.bpf.c, compiled by bcc where it can be) run by the kernel
(BPF_PROG_TEST_RUN), and would_hold, the pure-Python specification. All three must give the
same verdict on every packet: a few thousand generated from a fixed seed, valid and
adversarial (see ``corpus``). The daemon's own reading of each packet checks the intended
meaning too: every reply the daemon would learn addresses from must be held.
"""

import contextlib
import ctypes
import errno
import os
import random
import socket
import string
import struct
from collections import Counter

import pytest

from ramfw import policy
from ramfw.config import DnsSettings
from ramfw.kernel import bpf
from ramfw.kernel.prefilter import MAX_LABEL, MAX_LABELS, keys_for, would_hold
from ramfw.snoop.packet import parse_packet
from tests.support.packets import RESOLVER, AskedSnooper, reply, udp, udp6

SEED = 20250611
LONGEST = "a" * 63 + "." + "b" * 63  # its last two labels are the longest hashed part: 128 bytes
ALLOWLIST = ("ghcr.io", "*.blob.core.windows.net", "registry", "Docker.IO", "quay.io", "a.b.c.example.com",
             "xn--bcher-kva.example", LONGEST)
POLICY = policy.from_data({"organizations": [{"name": "t", "registryAccess": {
    "allowDockerHub": False, "registries": [{"address": entry} for entry in ALLOWLIST]}}]})
PATTERNS = POLICY.patterns()  # what the daemon puts in the map, and matches names against
KEYS = keys_for(PATTERNS)
RESOLVER6 = "2001:db8::53"  # udp6's source, as ipv4's and ipv6's below
LDH = (string.ascii_letters + string.digits + "-").encode()
ANSWER = b"\xc0\x0c\x00\x01\x00\x01\x00\x00\x00\x3c\x00\x04\xc0\x00\x02\x01"  # A 192.0.2.1, for the question


def wire(labels) -> bytes:
    """A name in wire form, with its terminating zero (labels as given: any bytes, any length)."""
    return b"".join(bytes([len(label)]) + label for label in labels) + b"\0"


def message(name: bytes, flags: int = 0x8180, qdcount: int = 1) -> bytes:
    """A reply whose question name is ``name`` (wire bytes as given), with one A record."""
    return struct.pack("!HHHHHH", 0x1234, flags, qdcount, 1, 0, 0) + name + b"\x00\x01\x00\x01" + ANSWER


def segment(dns: bytes) -> bytes:
    return struct.pack("!HHHH", 53, 40000, 8 + len(dns), 0) + dns


def ipv4(dns: bytes, ihl: int = 5, version: int = 4) -> bytes:
    """IPv4 with IHL ``ihl``: options (NOPs) when over 5; under 5 only the field says so."""
    options = b"\x01" * (max(ihl, 5) - 5) * 4
    payload = segment(dns)
    header = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, 20 + len(options) + len(payload), 0, 0, 64, 17, 0,
                         socket.inet_aton(RESOLVER), socket.inet_aton("192.0.2.1"))
    return header + options + payload


def ipv6(dns: bytes, next_header: int) -> bytes:
    """IPv6 with ``next_header``; for hop-by-hop, routing, fragment and destination options
    an 8-byte extension header of that kind comes first, then UDP."""
    extension = struct.pack("!BB6x", 17, 0) if next_header in (0, 43, 44, 60) else b""
    payload = extension + segment(dns)
    addresses = socket.inet_pton(socket.AF_INET6, RESOLVER6) + socket.inet_pton(socket.AF_INET6, "2001:db8::1")
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + addresses + payload


def label(rng: random.Random, longest: int = MAX_LABEL) -> bytes:
    """A random letter-digit-hyphen label: mostly short, one in three of any length to ``longest``."""
    size = rng.randint(1, longest) if rng.random() < 0.3 else rng.randint(1, min(12, longest))
    return bytes(rng.choice(LDH) for _ in range(size))


def mixed_case(rng: random.Random, name: str) -> bytes:
    return "".join(c.upper() if rng.random() < 0.5 else c for c in name).encode()


def corpus() -> list[tuple[str, bytes]]:
    """(kind, IP packet) pairs; most questions in IPv4 and IPv6."""
    rng = random.Random(SEED)
    packets: list[tuple[str, bytes]] = []

    def add(kind: str, dns: bytes) -> None:
        packets.append((kind, udp(dns)))
        packets.append((kind, udp6(dns)))

    def name_of(text: str) -> bytes:
        return wire(mixed_case(rng, text).split(b"."))

    allowed = [p.domain for p in PATTERNS]
    for _ in range(700):  # random valid names: 1-10 labels, mixed case, labels of 1-63
        add("random", message(wire([label(rng) for _ in range(rng.randint(1, 10))])))
    for domain in allowed:  # allowlisted names and their subdomains, as dnspython writes them
        for _ in range(30):
            prefix = ".".join(label(rng, 20).decode() for _ in range(rng.randint(0, 4)))
            text = mixed_case(rng, f"{prefix}.{domain}" if prefix else domain).decode()
            add("allowlisted", reply(text, f"{text}. 60 A 192.0.2.1") if len(text) < 250 else message(name_of(text)))
    for domain in allowed:  # near misses: not label-aligned, or the allowlisted name not last
        for text in (f"bad{domain}", f"{domain}x", f"{domain}.evil.test", f"x{domain[1:]}", domain.replace(".", "-")):
            add("near miss", message(name_of(text)))
    for domain in allowed:  # labels that contain dots
        labels = domain.encode().split(b".")
        add("dotted", message(wire([domain.encode()])))
        for cut in range(1, len(labels)):
            add("dotted", message(wire([b".".join(labels[:cut])] + labels[cut:])))
            add("dotted", message(wire(labels[:cut] + [b".".join(labels[cut:])])))
        add("dotted", message(wire([label(rng, 10) + b"." + labels[0]] + labels[1:])))
    for _ in range(60):
        add("dotted", message(wire([b".".join(label(rng, 8) for _ in range(rng.randint(2, 4)))
                                    for _ in range(rng.randint(1, 4))])))
    for _ in range(150):  # non-ASCII and any other byte in labels, and around allowlisted names
        labels = [bytes(rng.randrange(256) for _ in range(rng.randint(1, 20))) for _ in range(rng.randint(1, 4))]
        tail = rng.choice(allowed).encode().split(b".") if rng.random() < 0.5 else []
        add("any byte", message(wire(labels + tail)))
    for byte in range(256):  # every byte value in a label before, and in, an allowlisted name
        add("any byte", message(wire([bytes([byte]), b"ghcr", b"io"])))
        add("any byte", message(wire([b"gh" + bytes([byte]) + b"r", b"io"])))
    for _ in range(60):  # a zero length in the middle: the name ends there
        others = [label(rng, 10) for _ in range(rng.randint(0, 3))]
        allowlisted = rng.choice(allowed).encode().split(b".")
        head, tail = (others, allowlisted) if rng.random() < 0.5 else (allowlisted, others)
        add("zero length", message(wire(head) + wire(tail)))
    for length in range(MAX_LABEL + 1, 256):  # label lengths 64-255 (0xC0 and up: pointers)
        body = bytes(rng.choice(LDH) for _ in range(rng.choice((length, 10))))
        head = wire(rng.choice(([], [b"pkg"], [b"ghcr", b"io"])))[:-1]
        add("long length", message(head + bytes([length]) + body + b"\0"))
    for _ in range(80):  # compression pointers in the question
        head = [label(rng, 10) for _ in range(rng.randint(0, 3))] + rng.choice(([], [b"ghcr", b"io"]))
        add("pointer", message(wire(head)[:-1] + bytes([0xC0 | rng.randrange(64), rng.randrange(256)])))
    for count in (100, 120, *range(MAX_LABELS - 3, MAX_LABELS + 3), 150, 200, 255):  # around the label bound
        for tail in ([b"ghcr", b"io"], [b"github", b"com"], [b"registry"], []):
            add("many labels", message(wire([b"a"] * (count - len(tail)) + tail)))
            add("many labels", message(wire([b"a"] * (count - len(tail)) + tail)[:-1]))  # no terminating zero
    for first in range(58, 64):  # the longest hashed parts: two labels of up to 63 bytes
        for second in range(58, 64):
            add("long hash", message(wire([label(rng, 5), b"a" * first, b"b" * second])))
    add("long hash", message(wire(LONGEST.encode().split(b"."))))
    add("long hash", message(wire([b"x"] + LONGEST.upper().encode().split(b"."))))
    for text in ("pkg.ghcr.io", "github.com", "registry"):  # truncated at every byte offset
        for whole in (udp(reply(text)), udp6(reply(text))):
            packets += [("truncated", whole[:cut]) for cut in range(len(whole) + 1)]
    for text in ("pkg.ghcr.io", "ghcr.io", "github.com", "1234.ghcr.io", "registry", "a.registry", "quay.io", "x.y"):
        for ihl in range(16):  # IPv4 with options (IHL > 5), and impossible IHLs
            packets.append(("ipv4 ihl", ipv4(message(name_of(text)), ihl)))
        for version in (0, 1, 2, 3, 5, 7, 15):  # not IPv4 nor IPv6
            packets.append(("ip version", ipv4(message(name_of(text)), version=version)))
        for next_header in (17, 0, 43, 44, 60, 6, 58, 59):  # IPv6, with an extension header or not UDP
            packets.append(("ipv6 next header", ipv6(message(name_of(text)), next_header)))
        for flags, qdcount in ((0x8180, 0), (0x0100, 1), (0x0100, 0), (0x8183, 1), (0xFFFF, 0xFFFF)):
            add("flags and counts", message(name_of(text), flags, qdcount))  # no question, not a response
    packets.append(("empty", b""))
    add("root", message(b"\0"))
    before = list(packets)
    for _ in range(700):  # random mutations: a few bytes changed, or cut anywhere
        kind, packet = rng.choice(before)
        mutated = bytearray(packet)
        for _ in range(rng.randint(1, 3)):
            if mutated:
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
        packets.append(("mutated", bytes(mutated[:rng.randint(0, len(mutated))] if rng.random() < 0.2 else mutated)))
    for _ in range(200):  # garbage after a plausible first byte
        first = rng.choice((0x45, 0x46, 0x4F, 0x60, rng.randrange(256)))
        packets.append(("garbage", bytes([first]) + bytes(rng.randrange(256) for _ in range(rng.randint(0, 120)))))
    return packets


CORPUS = corpus()


def run(prog_fd: int, packet: bytes) -> int | None:
    """The kernel's verdict; None for a packet shorter than its IP header, which this kernel's
    BPF_PROG_TEST_RUN refuses (EINVAL) and the IP stack drops before netfilter."""
    try:
        return bpf.test_run(prog_fd, packet)
    except OSError as err:
        if err.errno == errno.EINVAL and len(packet) < (40 if packet[:1] and packet[0] >> 4 == 6 else 20):
            return None
        raise


def load_or_skip(load):
    if os.geteuid() != 0:
        pytest.skip("loading eBPF and BPF_PROG_TEST_RUN need root")
    try:
        return load()
    except OSError as err:
        pytest.skip(f"the prefilter does not load on this kernel: {err}")


@pytest.fixture(scope="module")
def hand_verdicts():
    """The hand-assembled program's verdict on every packet of the corpus."""
    from ramfw.kernel.prefilter import Prefilter

    prefilter = load_or_skip(Prefilter)
    try:
        prefilter.update(PATTERNS)
        assert prefilter.keys == KEYS
        yield [run(prefilter.prog_fd, packet) for _, packet in CORPUS]
    finally:
        prefilter.close()


@pytest.fixture(scope="module")
def reference(bcc_headers):
    """bpf/dns_prefilter.bpf.c compiled by bcc, its keys' map holding the same keys."""
    from bcc import BPF

    if os.geteuid() != 0:
        pytest.skip("loading eBPF and BPF_PROG_TEST_RUN need root")
    try:
        compiled = BPF(src_file=str(bpf.SOURCE_DIR / "dns_prefilter.bpf.c").encode())
    except Exception as err:  # bcc raises Exception, with clang's errors on stderr
        pytest.skip(f"bcc cannot compile bpf/dns_prefilter.bpf.c here: {err}")
    try:
        table = compiled[b"ramfw_prefilter"]
        for k in KEYS:
            table[ctypes.c_uint32(k)] = ctypes.c_uint8(1)
        yield compiled
    finally:
        compiled.cleanup()


@pytest.fixture(scope="module")
def reference_verdicts(reference):
    """The C reference's verdicts."""
    from bcc import BPF

    try:
        function = reference.load_func(b"ramfw_dns", BPF.SOCKET_FILTER)
    except Exception as err:
        pytest.skip(f"the kernel does not load the compiled C reference: {err}")
    return [run(function.fd, packet) for _, packet in CORPUS]


def disagreements(verdicts: list[int | None], what: str) -> list[str]:
    assert sum(v is not None for v in verdicts) > 4000, "the kernel ran most of the corpus"
    found = []
    for (kind, packet), verdict in zip(CORPUS, verdicts):
        expected = int(would_hold(packet, KEYS))
        if verdict is not None and verdict != expected:
            found.append(f"{kind}: {what} {verdict}, would_hold {expected}: {packet.hex()}")
    return found


def test_the_corpus_is_thousands_of_packets_of_every_kind_and_both_verdicts():
    kinds = Counter(kind for kind, _ in CORPUS)
    assert 4000 < len(CORPUS) < 10000, kinds
    held = Counter(kind for kind, packet in CORPUS if would_hold(packet, KEYS))
    assert held["allowlisted"] == kinds["allowlisted"], "every allowlisted name is held"
    for kind in ("near miss", "any byte", "zero length", "many labels", "truncated", "ipv4 ihl",
                 "ipv6 next header", "flags and counts", "mutated", "garbage"):
        assert 0 < held[kind] < kinds[kind], f"{kind}: both verdicts occur"


def test_the_hand_assembled_program_decides_as_would_hold(hand_verdicts):
    bad = disagreements(hand_verdicts, "program")
    assert not bad, f"{len(bad)} of {len(CORPUS)} packets disagree, e.g.:\n" + "\n".join(bad[:10])


def test_the_c_reference_decides_as_would_hold(reference_verdicts):
    bad = disagreements(reference_verdicts, "C reference")
    assert not bad, f"{len(bad)} of {len(CORPUS)} packets disagree, e.g.:\n" + "\n".join(bad[:10])


def question_labels(packet: bytes) -> list[bytes]:
    """The question's wire labels (of a packet the daemon has read a name in)."""
    dns, labels, at = parse_packet(packet).payload, [], 12
    while dns[at]:
        labels.append(dns[at + 1 : at + 1 + dns[at]])
        at += 1 + dns[at]
    return labels


def learned_from(verdicts: list[int | None], dotted: bool) -> tuple[int, list[str]]:
    """How many replies the daemon learns addresses from (the labels of their question
    containing a dot, or not), and those of them the program does not hold."""
    daemon = AskedSnooper(POLICY, {RESOLVER, RESOLVER6}, DnsSettings())  # the queries seen
    learned, misses = 0, []
    for (kind, packet), verdict in zip(CORPUS, verdicts):
        try:
            elements = daemon.on_packet(packet, 0.0).elements
        except Exception:  # the daemon's loop catches it (as non-ASCII names raise): nothing learned
            continue
        if not elements or any(b"." in label for label in question_labels(packet)) != dotted:
            continue
        learned += 1
        if verdict != 1:
            name = elements[0].name
            misses.append(f"{kind}: {name!r} as {question_labels(packet)!r}, verdict {verdict}: {packet.hex()}")
    return learned, misses


def test_every_reply_the_daemon_would_learn_from_is_held(hand_verdicts):
    learned, misses = learned_from(hand_verdicts, dotted=False)
    assert learned > 500
    assert not misses, f"{len(misses)} of {learned} not held, e.g.:\n" + "\n".join(misses[:10])


def test_a_dotted_label_teaches_the_daemon_nothing_so_not_holding_it_is_safe(hand_verdicts):
    """The prefilter keys wire labels, so it passes b'\x07ghcr.io' (one label with a dot). The
    daemon reads it as dnspython does, ghcr\\.io, which no entry allows: nothing is learned
    from it, held or copied (issue 8: once it read 'ghcr.io' and learned from the copy)."""
    learned, _ = learned_from(hand_verdicts, dotted=True)
    assert learned == 0


def as_query(packet: bytes) -> bytes:
    """The query a reply answers: its addresses and ports swapped (the rest as it is)."""
    data = bytearray(packet)
    version = packet[0] >> 4 if packet else 0
    if version == 4 and len(data) >= 20:
        data[12:16], data[16:20] = packet[16:20], packet[12:16]
        at = (packet[0] & 0x0F) * 4
    elif version == 6 and len(data) >= 40:
        data[8:24], data[24:40] = packet[24:40], packet[8:24]
        at = 40
    else:
        return packet
    if len(data) >= at + 4:
        data[at : at + 2], data[at + 2 : at + 4] = packet[at + 2 : at + 4], packet[at : at + 2]
    return bytes(data)


def pairing_disagreements(query_fd: int, reply_fd: int, pairs_fd: int) -> list[str]:
    """Each packet of the corpus as a reply, after its query: the pairing programs must record
    the key ``pair_key`` gives the query (none where it gives none) and hold the reply exactly
    when it gives it a key, once."""
    from ramfw.kernel.pairing import QUERY, REPLY
    from ramfw.kernel.prefilter import pair_key

    bad, paired = [], 0
    for kind, packet in CORPUS:
        query = as_query(packet)
        expected = pair_key(packet, KEYS, REPLY)
        assert expected == pair_key(query, KEYS, QUERY)
        if run(query_fd, query) is None:
            continue
        recorded = expected is not None and bpf.map_lookup(pairs_fd, expected, 8) is not None
        verdicts = (run(reply_fd, packet), run(reply_fd, packet))
        if recorded != (expected is not None) or verdicts != ((1, 0) if expected is not None else (0, 0)):
            bad.append(f"{kind}: recorded {recorded}, verdicts {verdicts}, key {expected!r}: {packet.hex()}")
        paired += expected is not None
        if expected is not None:
            with contextlib.suppress(OSError):
                bpf.map_delete(pairs_fd, expected)
    assert paired > 500
    return bad


def test_the_hand_assembled_pairing_pairs_as_pair_key_says():
    from ramfw.kernel.prefilter import Prefilter

    prefilter = load_or_skip(lambda: Prefilter(PATTERNS, pairing=True))
    try:
        bad = pairing_disagreements(prefilter.query_fd, prefilter.reply_fd, prefilter.pairs_fd)
    finally:
        prefilter.close()
    assert not bad, f"{len(bad)} of {len(CORPUS)} packets disagree, e.g.:\n" + "\n".join(bad[:10])
