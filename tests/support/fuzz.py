"""Adversarial DNS wire for the hold path's hand-read DNS, and a differential fuzzer that holds
it to dnspython: dots inside labels, non-ASCII, escapes, case, the longest labels and names,
compression pointers (good, forward, looping, into the header), every truncation, bit flips,
any qdcount, TCP segments in any order. Used by tests/unit/test_wire.py (a short run) and by
``scripts/bench fuzz`` (a million packets)."""

import random
import socket
import struct

import dns.exception
import dns.message
import dns.name
import dns.version

from ramfw import policy
from ramfw.config import DnsSettings
from ramfw.snoop.wire import fast_chain, question_name
from tests.support.packets import CLIENT, RESOLVER, AskedSnooper, ip_udp, tcp, udp

ODD = b'.\\ "()@$;*_\x00\x01\x1f\x7f\x80\xc3\xa9\xff'
ALPHABET = b"abcxyzABCXYZ0189-" + ODD
TYPES = {"A": 1, "CNAME": 5, "AAAA": 28}
# dnspython before 2.9 follows pointer chains longer than 16 hops, and targets that overlap
# the name that points to them; ramfw refuses both (as 2.9 does): never learned, fail closed.
LENIENT_DNSPYTHON = (dns.version.MAJOR, dns.version.MINOR) < (2, 9)


def random_label(rng):
    roll = rng.random()
    if roll < 0.08:
        return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(63))
    if roll < 0.2:
        return rng.choice([b"ghcr.io", b"ghcr", b"io", b"GHCR", b"Io", b"gh\\.cr", b"ghcr.", b".io", b"a b"])
    if roll < 0.6:
        return bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz-0123456789") for _ in range(rng.randrange(1, 8)))
    return bytes(rng.choice(ALPHABET) for _ in range(rng.randrange(1, 12)))


def random_labels(rng):
    roll = rng.random()
    if roll < 0.1:  # the longest names: 255 bytes on the wire, and one byte more
        last = 61 + (rng.random() < 0.5)
        return [b"a" * 63, b"b" * 63, b"c" * 63, b"d" * last]
    if roll < 0.15:
        return []
    return [random_label(rng) for _ in range(rng.randrange(1, 6))]


def dotted(labels):
    """The same text, other labels: two labels joined by a literal dot."""
    if len(labels) < 2:
        return labels
    return [labels[0] + b"." + labels[1]] + labels[2:]


class Builder:
    """A DNS message written by hand, with compression pointers where asked."""

    def __init__(self, rng, header):
        self.rng = rng
        self.data = bytearray(header)
        self.label_offsets = []

    def name(self, labels, pointer="none"):
        """``pointer``: "none", "back" (to a label written before, as compressors do) or
        "wild" (anywhere: forward, into this name, into the header)."""
        keep = len(labels) if pointer == "none" else self.rng.randrange(len(labels) + 1)
        start = len(self.data)
        for label in labels[:keep]:
            self.label_offsets.append(len(self.data))
            self.data += bytes([len(label)]) + label
        if pointer == "back" and self.label_offsets and self.label_offsets[0] < start:
            target = self.rng.choice([o for o in self.label_offsets if o < start])
            self.data += struct.pack("!H", 0xC000 | target)
        elif pointer == "wild":
            self.data += struct.pack("!H", 0xC000 | self.rng.randrange(0, len(self.data) + 8))
        else:
            self.data.append(0)

    def record(self, labels, rtype, ttl, rdata, pointer):
        self.name(labels, pointer)
        self.data += struct.pack("!HHIH", rtype, 1 if self.rng.random() < 0.95 else 3, ttl, len(rdata)) + rdata


def random_message(rng):
    flags = 0x8180 if rng.random() < 0.9 else rng.choice([0x8183, 0x0100, 0x8580])
    qdcount = 1 if rng.random() < 0.9 else rng.choice([0, 2])
    qname = random_labels(rng)
    qtype = rng.choice(["A", "AAAA", "A", "AAAA", "CNAME"])
    hops = [qname] + [random_labels(rng) for _ in range(rng.randrange(0, 4))]
    owners = hops + [dotted(qname), [label.upper() for label in qname], dotted(hops[-1])]
    records = []
    for _ in range(rng.randrange(0, 8)):
        rtype = rng.choice(["A", "AAAA", "CNAME", "CNAME", qtype])
        owner = rng.choice(owners)
        if rtype == "CNAME":
            rdata = rng.choice(hops + owners)
        else:
            size = 4 if rtype == "A" else 16
            if rng.random() < 0.05:
                size += rng.choice([-1, 1])
            rdata = bytes(rng.randrange(256) for _ in range(size))
        records.append((owner, TYPES[rtype], rng.randrange(0, 100_000), rdata))
    header = struct.pack("!HHHHHH", rng.randrange(65536), flags, qdcount, len(records), 0, 0)
    builder = Builder(rng, header)
    builder.name(qname, "wild" if rng.random() < 0.1 else "none")
    builder.data += struct.pack("!HH", TYPES[qtype], 1)
    for owner, rtype, ttl, rdata in records:
        pointer = rng.choice(["none", "back", "back", "wild"] if rng.random() < 0.1 else ["none", "back"])
        if rtype == TYPES["CNAME"]:
            builder.name(owner, pointer)
            builder.data += struct.pack("!HHIH", rtype, 1, ttl, 0)
            start = len(builder.data)
            builder.name(rdata, rng.choice(["none", "back"]))
            struct.pack_into("!H", builder.data, start - 2, len(builder.data) - start)
        else:
            builder.record(owner, rtype, ttl, rdata, pointer)
    return bytes(builder.data)


def messages(count, seed):
    rng = random.Random(seed)
    for _ in range(count):
        wire = random_message(rng)
        yield wire
        cut = rng.randrange(len(wire) + 1)
        yield wire[:cut]
        if rng.random() < 0.2:
            corrupt = bytearray(wire)
            corrupt[rng.randrange(12, len(wire))] = rng.randrange(256) if len(wire) > 12 else 0
            yield bytes(corrupt)


def dnspython_question(wire):
    try:
        message = dns.message.from_wire(wire, ignore_trailing=True)
    except (dns.exception.DNSException, ValueError, TypeError, IndexError, struct.error):
        return None, None
    if not message.question:
        return message, None
    return message, message.question[0].name.to_text(omit_final_dot=True).lower()


def dnspython_name(wire, offset):
    try:
        return dns.name.from_wire(wire, offset)[0].to_text(omit_final_dot=True).lower()
    except (dns.exception.DNSException, ValueError, IndexError):
        return None


def packed(addresses):
    return sorted(socket.inet_pton(socket.AF_INET6 if ":" in a else socket.AF_INET, a) for a in addresses)



def mutations(count, seed):
    """``messages``, plus bit flips anywhere (the header too) and any qdcount."""
    rng = random.Random(seed ^ 0x5EED)
    for wire in messages(count, seed):
        yield wire
        if len(wire) >= 12 and rng.random() < 0.3:
            flipped = bytearray(wire)
            for _ in range(rng.randrange(1, 4)):
                flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
            yield bytes(flipped)
        if len(wire) >= 12 and rng.random() < 0.1:
            yield wire[:4] + struct.pack("!H", rng.randrange(65536)) + wire[6:]


def fuzz(count, seed=1):
    """Feed ``count`` generated messages (and their mutations) to the pure core: the question
    reader, the chain follower and the snooper (over UDP, and over TCP in segments of any
    order). Returns the figures: packets fed, exceptions that escaped, disagreements with
    dnspython on what dnspython accepts."""
    snooper = AskedSnooper(policy.from_data({"organizations": [{"name": "t", "registryAccess": {
        "allowDockerHub": False, "registries": [{"address": "ghcr.io"}, {"address": "io"}, {"address": "xyz"}]}}]}),
        {RESOLVER}, DnsSettings(max_addresses=1_000_000))
    rng = random.Random(seed)
    found = {"packets": 0, "exceptions": 0, "question_differs": 0, "chain_differs": 0, "examples": []}

    def failed(kind, wire):
        found[kind] += 1
        if len(found["examples"]) < 5:
            found["examples"].append((kind, wire.hex()))

    for wire in mutations(count, seed):
        found["packets"] += 1
        try:
            ours, fast = question_name(wire), fast_chain(wire)
            message, theirs = dnspython_question(wire)
            if theirs is not None and message.flags & 0x8000 and ours != theirs and not (
                    ours is None and LENIENT_DNSPYTHON):
                failed("question_differs", wire)
            if fast is not None and hasattr(message, "resolve_chaining"):  # a QUERY opcode reply
                try:
                    result = message.resolve_chaining()
                    want = {r.address for r in result.answer} if result.answer is not None else set()
                    if packed(fast[0]) != packed(want):
                        failed("chain_differs", wire)
                except (dns.exception.DNSException, ValueError, KeyError):
                    failed("chain_differs", wire)
            snooper.on_packet(udp(wire), 0)  # after the query it answers, if it has a question
            snooper.on_packet(ip_udp(wire, CLIENT, RESOLVER, 40000, 53), 0)  # as a query copied on its way out
            framed = struct.pack("!H", len(wire)) + wire
            cuts = sorted(rng.sample(range(1, len(framed)), min(2, len(framed) - 1))) if len(framed) > 2 else []
            pieces = [(start, framed[start:end]) for start, end in zip([0] + cuts, cuts + [len(framed)])]
            snooper.on_packet(tcp(b"", 0, flags=0x12), 0)
            if rng.random() < 0.5:
                rng.shuffle(pieces)
            for start, piece in pieces:
                snooper.on_packet(tcp(piece, 1 + start, flags=0x18), 0)
        except Exception:  # noqa: BLE001 - what the fuzzer counts
            failed("exceptions", wire)
    return found
