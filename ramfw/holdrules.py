"""The DNS hold rules that libnftables' JSON cannot express, built as raw nf_tables netlink.

libnftables can apply native ``queue`` rules from JSON, but not the xt NFQUEUE target (nft
compat), which is all some kernels have (this lab's, for one), nor the xt ``bpf`` match
that runs the DNS prefilter (``dnsfilter``). This module appends those rules, in one batch,
to a chain of ramfw's own table:

    tcp sport 53                         -> queue (DNS over TCP is always held: it is reassembled)
    udp sport 53  [bpf prefilter match]  -> queue
    udp sport 53  (prefilter only)       -> log to the snoop group (a copy, not held)

The queue is the xt NFQUEUE target or the native queue expression, both with bypass.
"""

from __future__ import annotations

import socket
import struct

from .netlink import (NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, attr, message, nested,
                      open_socket, string, u32, wait_acks)

NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFPROTO = {"ip": 2, "ip6": 10, "inet": 1}
NFTA_RULE_TABLE, NFTA_RULE_CHAIN, NFTA_RULE_EXPRESSIONS = 1, 2, 4
NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFT_REG_1 = 1
NFT_META_L4PROTO = 16
NFT_PAYLOAD_TRANSPORT_HEADER = 2
NFT_CMP_EQ = 0
NFQ_FLAG_BYPASS = 0x01
XT_BPF_MODE_FD_ELF = 2
XT_BPF_INFO_V1_SIZE = 528  # mode, count, fd, a 512-byte union, the kernel's pointer


def _expr(name: str, *data: bytes) -> bytes:
    return nested(NFTA_LIST_ELEM, string(NFTA_EXPR_NAME, name), nested(NFTA_EXPR_DATA, *data))


def _cmp_eq(value: bytes) -> bytes:
    return _expr("cmp", u32(1, NFT_REG_1), u32(2, NFT_CMP_EQ), nested(3, attr(1, value)))


def _from_dns(l4proto: int) -> list[bytes]:
    """meta l4proto == l4proto; th sport == 53."""
    return [
        _expr("meta", u32(2, NFT_META_L4PROTO), u32(1, NFT_REG_1)),
        _cmp_eq(bytes([l4proto])),
        _expr("payload", u32(1, NFT_REG_1), u32(2, NFT_PAYLOAD_TRANSPORT_HEADER), u32(3, 0), u32(4, 2)),
        _cmp_eq(struct.pack("!H", 53)),
    ]


def bpf_match(prog_fd: int) -> bytes:
    """xt bpf match, revision 1, the program given by file descriptor (struct xt_bpf_info_v1)."""
    info = struct.pack("=HHi", XT_BPF_MODE_FD_ELF, 0, prog_fd).ljust(XT_BPF_INFO_V1_SIZE, b"\0")
    return _expr("match", string(1, "bpf"), u32(2, 1), attr(3, info))


def _queue(queue_num: int, native: bool) -> bytes:
    if native:
        return _expr("queue", attr(1, struct.pack("!H", queue_num)), attr(2, struct.pack("!H", 1)),
                     attr(3, struct.pack("!H", NFQ_FLAG_BYPASS)))
    # struct xt_NFQ_info_v3 { u16 queuenum; u16 queues_total; u16 flags; } (host order)
    return _expr("target", string(1, "NFQUEUE"), u32(2, 3),
                 attr(3, struct.pack("=HHH", queue_num, 1, NFQ_FLAG_BYPASS) + b"\0\0"))


def hold_rules(queue_num: int, native: bool, prefilter_fd: int | None, snoop_group: int) -> list[bytes]:
    """The expressions of each rule, in order (see the module's docstring)."""
    tcp, udp = socket.IPPROTO_TCP, socket.IPPROTO_UDP
    rules = [b"".join(_from_dns(tcp) + [_queue(queue_num, native)])]
    if prefilter_fd is None:
        rules.append(b"".join(_from_dns(udp) + [_queue(queue_num, native)]))
    else:
        rules.append(b"".join(_from_dns(udp) + [bpf_match(prefilter_fd), _queue(queue_num, native)]))
        rules.append(b"".join(_from_dns(udp) + [_expr("log", attr(1, struct.pack("!H", snoop_group)))]))
    return rules


def build_batch(family: str, table: str, chain: str, rules: list[bytes], seq: int = 1,
                replace: bool = False) -> bytes:
    """One nf_tables batch appending ``rules`` to ``chain``; with ``replace``, the chain's
    old rules are deleted in the same transaction (a rule deletion naming only the chain)."""
    messages = [message(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b"")]
    if replace:
        messages.append(message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE, NLM_F_REQUEST | NLM_F_ACK, seq,
                                NFPROTO[family], 0, string(NFTA_RULE_TABLE, table) + string(NFTA_RULE_CHAIN, chain)))
    for offset, expressions in enumerate(rules, start=1):
        attrs = (string(NFTA_RULE_TABLE, table) + string(NFTA_RULE_CHAIN, chain)
                 + nested(NFTA_RULE_EXPRESSIONS, expressions))
        messages.append(message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE,
                                NLM_F_REQUEST | NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK,
                                seq + offset, NFPROTO[family], 0, attrs))
    messages.append(message(NFNL_MSG_BATCH_END, NLM_F_REQUEST, seq + len(rules) + 1, 0, NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(messages)


def add_rules(family: str, table: str, chain: str, rules: list[bytes], replace: bool = False) -> None:
    """Append (or with ``replace``, swap in) rules in one transaction; raise OSError with the
    kernel's errno when refused."""
    with open_socket() as sock:
        sock.send(build_batch(family, table, chain, rules, replace=replace))
        wait_acks(sock, len(rules) + replace, "DNS hold rule")


def add_queue_rules(family: str, table: str, chain: str, queue_num: int) -> None:
    """The plain xt NFQUEUE rules (UDP and TCP), with no prefilter."""
    add_rules(family, table, chain, hold_rules(queue_num, False, None, 0))
