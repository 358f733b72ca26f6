"""Replies paired with their queries in the kernel (issue #8): the prefilter's pairing
programs, run by the kernel on real packets (BPF_PROG_TEST_RUN), against ``pair_key``, their
specification. A query that may be for an allowlisted name is recorded; a reply is held only
if it answers one (the client's port, the resolver, the ID, the question), once."""

import os
import time

import dns.message
import pytest

from ramfw.kernel import bpf
from ramfw.kernel.pairing import QUERY, REPLY
from ramfw.policy.names import parse_entry
from tests.support.packets import ip_udp

HOLD, PASS = 1, 0
CLIENT, RESOLVER, CLIENT6, RESOLVER6 = "192.0.2.1", "192.0.2.53", "2001:db8::1", "2001:db8::53"


def load(**kwargs):
    if os.geteuid() != 0:
        pytest.skip("loading eBPF needs root")
    from ramfw.kernel.prefilter import Prefilter

    try:
        return Prefilter([parse_entry(e).pattern for e in ("ghcr.io", "registry")], pairing=True, **kwargs)
    except OSError as err:
        pytest.skip(f"the pairing programs do not load on this kernel: {err}")


@pytest.fixture
def pairs():
    prefilter = load()
    try:
        yield prefilter
    finally:
        prefilter.close()


def exchange(name="pkg.ghcr.io", rdtype="A", v6=False, port=40000, query_id=None):
    """(query packet, reply packet) for ``name``: from the client's port to the resolver's 53, and back."""
    query = dns.message.make_query(name, rdtype)
    if query_id is not None:
        query.id = query_id
    client, resolver = (CLIENT6, RESOLVER6) if v6 else (CLIENT, RESOLVER)
    return (ip_udp(query.to_wire(), client, resolver, port, 53),
            ip_udp(dns.message.make_response(query).to_wire(), resolver, client, 53, port))


def ask(prefilter, packet) -> None:
    assert bpf.test_run(prefilter.query_fd, packet) == PASS  # recorded, never copied


def held(prefilter, packet) -> int:
    return bpf.test_run(prefilter.reply_fd, packet)


@pytest.mark.parametrize("v6", [False, True])
def test_a_reply_is_held_only_if_it_answers_a_query_and_only_once(pairs, v6):
    query, reply = exchange(v6=v6)
    assert held(pairs, reply) == PASS  # no query yet
    ask(pairs, query)
    assert held(pairs, reply) == HOLD
    assert held(pairs, reply) == PASS  # a second reply to the same query
    assert pairs.pairing_counters() == {"queries": 1, "paired": 1}


def test_a_reply_that_differs_in_anything_that_pairs_it_is_not_held_and_leaves_the_query(pairs):
    query, reply = exchange(query_id=0x1234)
    ask(pairs, query)
    others = [
        exchange(query_id=0x1235)[1],                     # another ID
        exchange(port=40001, query_id=0x1234)[1],         # another port
        exchange(rdtype="AAAA", query_id=0x1234)[1],      # another type
        exchange("pkgs.ghcr.io", query_id=0x1234)[1],     # another name, same last labels
        exchange("pkg.registry", query_id=0x1234)[1],     # other last labels, same length
        ip_udp(dns.message.make_response(dns.message.from_wire(query[28:])).to_wire(), "192.0.2.54", CLIENT, 53,
               40000),                                    # from another resolver
        ip_udp(dns.message.make_response(dns.message.from_wire(query[28:])).to_wire(), RESOLVER, "192.0.2.2", 53,
               40000),                                    # to another client
    ]
    for other in others:
        assert held(pairs, other) == PASS
    assert held(pairs, reply) == HOLD  # the real answer still finds its query


def test_the_documented_limit_names_alike_in_length_and_last_two_labels_share_a_key(pairs):
    """ramfw/kernel/pairing.py: the key holds the last two labels and the length, not a hash
    of the whole name (the verifier cannot afford that loop)."""
    query, _ = exchange("pkg.ghcr.io", query_id=5)
    ask(pairs, query)
    assert held(pairs, exchange("xyz.ghcr.io", query_id=5)[1]) == HOLD


def test_an_a_and_an_aaaa_query_with_one_id_both_get_their_answer(pairs):
    a_query, a_reply = exchange(rdtype="A", query_id=7)
    aaaa_query, aaaa_reply = exchange(rdtype="AAAA", query_id=7)
    ask(pairs, a_query)
    ask(pairs, aaaa_query)
    assert held(pairs, aaaa_reply) == HOLD and held(pairs, a_reply) == HOLD


def test_case_does_not_unpair_a_reply_from_its_query(pairs):
    """A resolver echoes the question as asked; 0x20 case mixing must not lose the pairing."""
    query, _ = exchange("PKG.GhCr.Io", query_id=9)
    _, reply = exchange("pkg.ghcr.io", query_id=9)
    ask(pairs, query)
    assert held(pairs, reply) == HOLD


def test_queries_for_names_that_cannot_be_allowlisted_are_not_recorded(pairs):
    query, reply = exchange("pypi.org")
    ask(pairs, query)
    assert held(pairs, reply) == PASS and pairs.pairing_counters()["queries"] == 0
    assert bpf.test_run(pairs.prog_fd, reply) == PASS  # and the filter agrees


def test_a_query_unanswered_too_long_is_forgotten():
    prefilter = load(pair_seconds=0.2)
    try:
        query, reply = exchange()
        ask(prefilter, query)
        time.sleep(0.3)
        assert held(prefilter, reply) == PASS
        ask(prefilter, query)  # asked again: answered at once
        assert held(prefilter, reply) == HOLD
    finally:
        prefilter.close()


def test_the_key_in_the_kernel_is_the_one_pair_key_specifies(pairs):
    from ramfw.kernel.prefilter import pair_key

    for v6 in (False, True):
        query, reply = exchange("a.b.ghcr.io", v6=v6, query_id=0xBEEF)
        expected = pair_key(query, pairs.keys, QUERY)
        assert expected is not None and pair_key(reply, pairs.keys, REPLY) == expected
        ask(pairs, query)
        assert bpf.map_lookup(pairs.pairs_fd, expected, 8) is not None
        assert held(pairs, reply) == HOLD
        assert bpf.map_lookup(pairs.pairs_fd, expected, 8) is None  # consumed
