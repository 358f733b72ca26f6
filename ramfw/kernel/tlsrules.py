"""The TLS server name check's rules (issue #13), rendered as libnftables JSON: pure data, which
``ruleset.build_ruleset`` puts in the table (``tls``, ``tls_syn``, ``tls_queue``, ``tls_input``,
and rules in ``output``, ``forward`` and ``registry``).
"""

from __future__ import annotations

from ..config import EnforcementSettings, split_proxy
from .nftexpr import (ALLOW, CONTAINER_BRIDGES, LOG_BURST, LOG_RATE, LOG_SNAPLEN, REPLY, SYN_ONLY, ct_mark, match,
                      meta, payload)

TLS_CHAIN, TLS_SYN, TLS_QUEUE, TLS_INPUT = "tls", "tls_syn", "tls_queue", "tls_input"


def with_payload(then: list[dict]) -> list[list[dict]]:
    """Rules applying ``then`` to TCP segments that carry data. nftables cannot subtract the
    headers' lengths from the packet's: one rule per TCP header length (IPv4 with options, and
    IPv6 extension headers, always count as data: they only cost a look). An IPv6 payload length
    of 0 (a jumbogram's) counts too: Linux takes such a packet behind a hop-by-hop header at its
    real length."""
    doff = payload("tcp", "doff")
    ipv4, ipv6 = match(meta("nfproto"), "ipv4"), match(meta("nfproto"), "ipv6")
    rules = [[ipv4, match(payload("ip", "hdrlength"), 5, "!=")] + then,
             [ipv6, match(payload("ip6", "length"), 0)] + then]
    for words in range(5, 16):
        rules.append([ipv4, match(payload("ip", "hdrlength"), 5), match(doff, words),
                      match(payload("ip", "length"), 20 + 4 * words, ">")] + then)
        rules.append([ipv6, match(doff, words), match(payload("ip6", "length"), 4 * words, ">")] + then)
    return rules


def tls_rules(settings: EnforcementSettings) -> dict[str, list[list[dict]]]:
    """The TLS server name check's rules: ``guard`` (first in output and forward), ``registry``
    (before its accepts), and the chains ``tls`` and ``tls_syn``. A SYN to a TLS port of a learned
    address (or to a configured proxy) is copied to ``tls_syn_group`` (its sequence number is
    where the stream begins) and its flow marked ``tls_ct_mark``; a SYN that carries data (TCP Fast
    Open) is dropped (the client sends it again without). The flow's segments that carry data go
    to the queue (and set both bits: its first flight went there) until the daemon sets the
    mark: cleared (allowed: nothing of it is looked at again but the guard's one comparison) or
    the next bit up alone (refused: every packet reset).
    UDP to the TLS ports (QUIC) is refused, copied (at a bounded rate) to be named."""
    if not settings.tls_check:
        return {}
    mask, pending, refused = settings.tls_mark_mask, settings.tls_ct_mark, settings.tls_ct_mark << 1
    ports = {"set": sorted(settings.tls_ports)}
    log = {"log": {"group": settings.tls_syn_group, "snaplen": LOG_SNAPLEN}}
    mark = {"mangle": {"key": ct_mark(), "value": {"|": [{"&": [ct_mark(), ~mask & 0xFFFFFFFF]}, pending]}}}
    syn = [match(meta("l4proto"), "tcp"), SYN_ONLY]
    quic = [match(meta("l4proto"), {"set": ["udp", "udplite"]}), match(payload("th", "dport"), ports)]
    registry = [quic + [{"limit": {"rate": LOG_RATE, "per": "second", "burst": LOG_BURST}}, log]]
    if settings.mode == "enforce":
        to_tls = [match(meta("l4proto"), "tcp"), match(payload("tcp", "dport"), ports)]
        drop = [{"counter": "tls_refused"}, {"drop": None}]
        registry += [
            quic + [{"counter": "quic_refused"}, {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}],
            # Conntrack has no flow (or no longer one) for these: invalid (a reset the server would
            # ignore can end a flow in conntrack alone), or new yet no SYN. They would pass unread.
            to_tls + [match({"ct": {"key": "state"}}, "invalid", "in")] + drop,
            to_tls + [match({"ct": {"key": "state"}}, "new", "in"), match({"&": [payload("tcp", "flags"), "syn"]}, 0)]
            + drop,
        ]
    registry.append(syn + [match(payload("tcp", "dport"), ports), {"jump": {"target": TLS_SYN}}])
    # a simultaneous open (our SYN in the flow's reply direction): no registry client makes one, and
    # its client would be in the direction the check takes for the server's
    tls_syn = [[match({"ct": {"key": "direction"}}, "reply"), {"counter": "tls_refused"}, {"drop": None}]]
    tls_syn += with_payload([{"counter": "tls_refused"}, {"drop": None}])
    for version, proto in ((4, "ip"), (6, "ip6")):
        tls_syn.append([match(payload(proto, "daddr"), "@" + ALLOW[version]), log, mark])
        tls_syn.append([match({"ct": {"key": "status"}}, "dnat", "in"),  # redirected: where the client was going
                        match({"ct": {"key": f"{proto} daddr", "dir": "original"}}, "@" + ALLOW[version]), log, mark])
    for entry in settings.proxies:
        address, port = split_proxy(entry)
        to_proxy = [match(payload("ip" if address.version == 4 else "ip6", "daddr"), str(address)),
                    match(payload("tcp", "dport"), port)]
        registry.append(syn + to_proxy + [{"jump": {"target": TLS_SYN}}])
        tls_syn.append(to_proxy + [log, mark])
    is_refused = match({"&": [ct_mark(), mask]}, refused)
    # The server's packets of a flow being read: copied (not held), for the daemon to see it
    # acknowledge the first flight it let through (not its SYN-ACK: the copy would wake the daemon
    # just as the ClientHello comes). Only where a server's packets arrive: at the input hook from
    # an interface the source is routed through, not loopback, and forwarded from outside the
    # container bridges. A packet a local process (CAP_NET_RAW) forges in the server's name, made
    # to be dropped by the local TCP, would otherwise end the check before the real flight (review).
    being_read = match({"&": [ct_mark(), pending]}, pending)  # its SYN marked it; its flight may be queued
    server = [REPLY, match(meta("l4proto"), "tcp"), match({"&": [payload("tcp", "flags"), "syn"]}, 0)]
    routed_back = match({"fib": {"result": "oif", "flags": ["saddr", "iif"]}}, True)
    return {
        "input": [[being_read, match(meta("iif"), "lo", "!="), routed_back] + server + [log]],
        "guard": [[match({"&": [ct_mark(), mask]}, 0, "!="), {"jump": {"target": TLS_CHAIN}}]],
        "forward_guard": [[being_read, match(meta("iifname"), "@" + CONTAINER_BRIDGES, "!="), routed_back]
                          + server + [log]],
        "registry": registry,
        TLS_SYN: tls_syn,
        # a reset passes (the one the refusal sends back among them); refused flows get one for each
        # packet; the server's direction passes on (copied above where it is the server's)
        TLS_CHAIN: [[match(payload("tcp", "flags"), "rst", "in"), {"return": None}],
                    [is_refused, {"counter": "tls_refused"}, match(meta("l4proto"), "tcp"),
                     {"reject": {"type": "tcp reset"}}], [is_refused, {"drop": None}], [REPLY, {"return": None}]]
        # both bits: its first flight has gone to the queue (read, or let pass while no daemon ran)
        + with_payload([{"mangle": {"key": ct_mark(), "value": {"|": [ct_mark(), mask]}}},
                         {"jump": {"target": TLS_QUEUE}}]),
    }
