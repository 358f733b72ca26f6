"""The replay of a staged table into an owned one (kernel/replay.py): pure, on built messages."""

import struct

from ramfw.config import EnforcementSettings
from ramfw.kernel import netlink as nl
from ramfw.kernel import replay, ruleset


def test_the_staged_document_has_no_table_commands_and_names_the_staging_table():
    document = ruleset.build_ruleset(EnforcementSettings(), ["192.0.2.53"], 100)
    staged, chains, sets = replay.for_staging(document, "ramfw", "ramfw-stage-1")
    assert all("table" not in next(iter(c.values())) for c in staged["nftables"])
    assert all(next(iter(next(iter(c.values())).values()))["table"] == "ramfw-stage-1" for c in staged["nftables"])
    assert chains == {"output", "forward", "registry", "tls", "tls_syn", "tls_input"}, "the DNS, own_traffic and tls_queue " \
        "chains are swapped apart"
    assert sets == {"resolvers4", "resolvers6"}, "the learned sets are never flushed by an apply"
    assert document["nftables"][0] == {"add": {"table": {"family": "inet", "name": "ramfw"}}}, "not changed"


def _set(name: str, flags: int) -> list:
    return [(1, b"ramfw-stage-1\0"), (2, name.encode() + b"\0"), (3, struct.pack("!I", flags)),
            (16, b"\0" * 8), (19, b"hash\0"), (20, struct.pack("!I", 0))]


def test_steps_copy_only_what_a_new_message_accepts_in_the_order_the_kernel_needs():
    snapshot = replay.Snapshot(
        sets=[_set("resolvers4", 0), _set("__set0", replay.NFT_SET_ANONYMOUS), _set("allow4", 0x10)],
        elements={"resolvers4": [nl.attr(1 | nl.NLA_F_NESTED, nl.attr(1, b"\xc0\0\2\x35"))],
                  "__set0": [nl.attr(1 | nl.NLA_F_NESTED, nl.attr(1, b"\0\x06"))], "allow4": []},
        chains=[[(1, b"ramfw-stage-1\0"), (2, b"\0" * 8), (3, b"output\0"), (6, b"\0" * 4)]],
        rules=[[(1, b"ramfw-stage-1\0"), (2, b"output\0"), (3, b"\0" * 8), (4 | nl.NLA_F_NESTED, b""), (6, b"\0" * 8)]],
        objects=[[(1, b"ramfw-stage-1\0"), (2, b"blocked\0"), (3, struct.pack("!I", 1)), (6, b"\0" * 8)]])
    steps = replay.steps(snapshot, "ramfw", {"output"}, {"resolvers4"})
    kinds = [(m, replay.name(replay.attrs(a), 2)) for m, _, _, a in steps]
    assert kinds == [(nl.NFT_MSG_NEWOBJ, "blocked"), (nl.NFT_MSG_NEWSET, "resolvers4"),
                     (nl.NFT_MSG_DELSETELEM, "resolvers4"), (nl.NFT_MSG_NEWSETELEM, "resolvers4"),
                     (nl.NFT_MSG_NEWSET, "allow4"), (nl.NFT_MSG_NEWCHAIN, ""), (nl.NFT_MSG_DELRULE, "output"),
                     (nl.NFT_MSG_NEWSET, "__set0"), (nl.NFT_MSG_NEWSETELEM, "__set0"), (nl.NFT_MSG_NEWRULE, "output")]
    for message, _, _, attributes in steps:
        items = replay.attrs(attributes)
        assert replay.name(items, 1) == "ramfw", "every object names the owned table"
        if message == nl.NFT_MSG_NEWSET:
            assert {k & 0x3FFF for k, _ in items} == {1, 2, 3, replay.NFTA_SET_ID}, "no handle, type or count"
        if message == nl.NFT_MSG_NEWRULE:
            assert {k & 0x3FFF for k, _ in items} == {1, 2, 4}, "no handle, no position"
        if message == nl.NFT_MSG_NEWCHAIN:
            assert {k & 0x3FFF for k, _ in items} == {1, 3}, "no handle, no use count"
    ids = [replay.value(replay.attrs(a), replay.NFTA_SET_ID) for m, _, _, a in steps if m == nl.NFT_MSG_NEWSET]
    assert len(set(ids)) == len(ids) == 3


def test_many_elements_are_cut_into_messages_whose_attributes_fit():
    elements = [nl.attr(1 | nl.NLA_F_NESTED, nl.attr(1, struct.pack("!I", i))) + nl.attr(6, b"x" * 120)
                for i in range(5000)]
    steps = replay.element_steps("ramfw", "allow4", elements, replay.LEARNED_KEEP)
    assert len(steps) > 1 and all(len(a) < 65535 for _, _, _, a in steps)
    assert sum(len(replay.elements_of(a)) for _, _, _, a in steps) == 5000
