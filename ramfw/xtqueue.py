"""Rules that hand DNS replies to the netfilter queue, for kernels without native nft ``queue``.

libnftables can apply native ``queue`` rules from JSON, but cannot create the xt NFQUEUE
target (nft compat), which is all some kernels have (this lab's, for one). So this module
builds that one kind of rule as raw nf_tables netlink messages, in one batch, into a chain
of ramfw's own table: the rule is ``meta l4proto P  th sport 53  xt NFQUEUE num N bypass``.
Everything else about the table stays with ``ruleset``.
"""

from __future__ import annotations

import socket
import struct

from .netlink import (NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, attr, message, nested,
                      open_socket, string, u32, wait_acks)

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWRULE = 6
NFPROTO = {"ip": 2, "ip6": 10, "inet": 1}
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFT_REG_1 = 1
NFT_META_L4PROTO = 16
NFT_PAYLOAD_TRANSPORT_HEADER = 2
NFT_CMP_EQ = 0
NFQ_FLAG_BYPASS = 0x01


def _expr(name: str, *data: bytes) -> bytes:
    return nested(NFTA_LIST_ELEM, string(NFTA_EXPR_NAME, name), nested(NFTA_EXPR_DATA, *data))


def _cmp_eq(value: bytes) -> bytes:
    return _expr("cmp", u32(1, NFT_REG_1), u32(2, NFT_CMP_EQ), nested(3, attr(1, value)))


def queue_rule_expressions(l4proto: int, queue_num: int) -> bytes:
    """meta l4proto == l4proto; th sport == 53; xt NFQUEUE v3 num queue_num, bypass."""
    return b"".join([
        _expr("meta", u32(2, NFT_META_L4PROTO), u32(1, NFT_REG_1)),
        _cmp_eq(bytes([l4proto])),
        _expr("payload", u32(1, NFT_REG_1), u32(2, NFT_PAYLOAD_TRANSPORT_HEADER), u32(3, 0), u32(4, 2)),
        _cmp_eq(struct.pack("!H", 53)),
        # struct xt_NFQ_info_v3 { u16 queuenum; u16 queues_total; u16 flags; } (host order)
        _expr("target", string(1, "NFQUEUE"), u32(2, 3),
              attr(3, struct.pack("=HHH", queue_num, 1, NFQ_FLAG_BYPASS) + b"\0\0")),
    ])


def build_batch(family: str, table: str, chain: str, queue_num: int, seq: int = 1) -> bytes:
    """One nf_tables batch appending the UDP and TCP queue rules to ``chain``."""
    messages = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b"")]
    for offset, l4proto in enumerate((socket.IPPROTO_UDP, socket.IPPROTO_TCP), start=1):
        attrs = (string(NFTA_RULE_TABLE, table) + string(NFTA_RULE_CHAIN, chain)
                 + nested(NFTA_RULE_EXPRESSIONS, queue_rule_expressions(l4proto, queue_num)))
        messages.append(message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                                 NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
                                 seq + offset, NFPROTO[family], 0, attrs))
    messages.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + 3, 0, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(messages)


def add_queue_rules(family: str, table: str, chain: str, queue_num: int) -> None:
    """Append the xt NFQUEUE rules; raise OSError with the kernel's errno when refused."""
    with open_socket() as sock:
        sock.send(build_batch(family, table, chain, queue_num))
        wait_acks(sock, 2, "xt NFQUEUE rule")
