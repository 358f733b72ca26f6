"""The nftables table ramfw owns (``inet ramfw``), rendered as libnftables JSON: pure data.

``table.Table`` is the only code that applies it (and the DNS hold rules ``nft`` builds) to
the kernel. Enforcement stays in the kernel when the process that applied it exits or dies
(registry egress fails closed): where the table is owned, it is also ``persist``; only
``ramfw down`` removes it.

Layout::

    output   (hook output)   loopback (not redirected), container bridges -> accept; flows the peer
                             opened, in scope -> registry; established/related -> accept;
                             own_traffic; in scope -> registry
    own_traffic              ramfw's own connections (its cgroup, by id) -> accept; its rules
                             are ``nft.own_traffic_rules``, swapped in like the DNS chains'.
    forward  (hook forward)  container bridges -> accept; flows the peer opened, in scope -> registry;
                             established/related -> accept; in scope -> registry
    registry                 DNS to trusted resolvers, @allow4/@allow6 -> accept;
                             otherwise log to NFLOG, count, reject (enforce) or accept (audit)
    tls, tls_syn, tls_queue  the TLS server name check (``tlsrules``): SYNs to TLS ports of learned
    tls_input (hook input)   addresses copied and their flows marked; their first data segments
                             queued (the queue rule is raw netlink, swapped in like the DNS chains'),
                             the server's packets copied until the daemon clears the mark
    dns_input, dns_forward,  (hooks input, forward, output, priority -150) the DNS hold rules and
    dns_output               the query copies, which ``nft`` builds and ``table.Table`` swaps in
                             a netlink transaction per chain
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import Enum
from typing import Iterable

from ..config import EnforcementSettings, split_proxy
from .nftexpr import (ALLOW, CONTAINER_BRIDGES, FAMILY, LOG_BURST, LOG_RATE, LOG_SNAPLEN, ORIGINAL, REPLY, SYN_ONLY,
                      match, meta, payload)
from .tlsrules import TLS_CHAIN, TLS_INPUT, TLS_QUEUE, TLS_SYN, tls_rules

PENDING = {4: "pending4", 6: "pending6"}
PENDING_TIMEOUT = 3  # seconds: covers one SYN retransmission (1 s) with room to spare
RESOLVERS = {4: "resolvers4", 6: "resolvers6"}
UNSOLICITED = "unsolicited"  # DNS replies that answer no query of ours: counted, never read
COUNTERS = ("blocked", "audited", "accepted", "deferred", UNSOLICITED, "tls_refused", "quic_refused")
LOG_PREFIX = "ramfw "
SET_TYPES = {4: "ipv4_addr", 6: "ipv6_addr"}


class Hold(Enum):
    """How DNS replies reach the daemon."""

    NFT_QUEUE = "nft-queue"  # held in a netfilter queue by the native nft queue expression
    XT_NFQUEUE = "xt-nfqueue"  # held in a netfilter queue by the xt NFQUEUE target (nft compat)
    PASSIVE = "passive"  # copied to an NFLOG group, not held: the kernel cannot queue
    NONE = "none"  # not seen at all (``ramfw up`` with no daemon)

    @property
    def holds(self) -> bool:
        return self in (Hold.NFT_QUEUE, Hold.XT_NFQUEUE)


@dataclass(frozen=True)
class Learned:
    """An element of the allowed sets as the kernel reports it (seconds)."""

    address: str
    expires: int
    timeout: int
    name: str


@dataclass(frozen=True)
class TableState:
    exists: bool
    mode: str = ""
    counters: dict | None = None
    learned: tuple[Learned, ...] = ()
    resolvers: tuple[str, ...] = ()


_ESTABLISHED = match({"ct": {"key": "state"}}, ["established", "related"], "in")
_TCP_UDP = match(meta("l4proto"), {"set": ["tcp", "udp"]})
_TO_CONTAINERS = [match(meta("oifname"), "@" + CONTAINER_BRIDGES), {"accept": None}]  # stays on this VM
_ACCEPT = {"accept": None}
# A loopback connection that a NAT rule redirected (a transparent proxy on 127.0.0.1) is not
# local traffic: it goes on to the scope rules, judged by its original destination.
_NOT_REDIRECTED = {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "dnat"}}


# Every transport with ports where TCP and UDP have them: a scope by port covers them all
# (UDP-Lite to a never-learned address passed when only TCP and UDP were matched).
_PORTED = match(meta("l4proto"), {"set": ["tcp", "udp", "udplite", "sctp", "dccp"]})


def _ports(ports: Iterable[int]) -> list[dict]:
    return [_PORTED, match(payload("th", "dport"), {"set": sorted(ports)})]




def _peer_first_rules(settings: EnforcementSettings, hook: str) -> list[list[dict]]:
    """Flows the peer opened: our packets are their reply direction, which the established rule
    would accept unchecked. A peer that sends first (or a forged first packet that made the
    kernel track the flow that way) must not open a way out: an in-scope TCP SYN without ACK in
    the reply direction (a simultaneous open: no server sends one) and in-scope UDP to a
    registry port in the reply direction are judged like a new connection. Inbound services on
    the VM are untouched: their answers go to the client's port, a SYN-ACK or data, never a
    bare SYN, and a client's port is not a registry port."""
    udp_to_registry = [match(meta("l4proto"), {"set": ["udp", "udplite"]}),
                       match(payload("th", "dport"), {"set": sorted(settings.registry_ports)})]
    rules = []
    for scope_rule in _in_scope_rules(settings, hook):
        rules.append([REPLY, match(meta("l4proto"), "tcp"), SYN_ONLY] + scope_rule)
        rules.append([REPLY] + udp_to_registry + scope_rule)
        # A bare SYN on an entry conntrack calls established: the tuple used again after the server
        # reset its last connection (conntrack keeps the entry, and its mark). It is a new
        # connection: judged as one (its address, and the TLS check from its first byte).
        rules.append([ORIGINAL, match({"ct": {"key": "state"}}, "established", "in"), match(meta("l4proto"), "tcp"),
                      SYN_ONLY] + scope_rule)
    return rules


def _in_scope_rules(settings: EnforcementSettings, hook: str) -> list[list[dict]]:
    """The matches that send a packet of this hook into the registry chain."""
    jump = {"jump": {"target": "registry"}}
    rules = []
    if hook == "output":
        if "engine" in settings.scope:
            marked = match({"&": [meta("mark"), settings.mark_mask]}, settings.mark)
            rules.append([marked, jump])
        if "host" in settings.scope:
            rules.append(_ports(settings.registry_ports) + [jump])
    elif "containers" in settings.scope:
        rules.append(_ports(settings.registry_ports) + [jump])
    return rules


def _proxy_rules(proxies: Iterable[str]) -> list[list[dict]]:
    """The explicit HTTP(S) proxies the engine is configured with: reachable on their port."""
    rules = []
    for entry in proxies:
        address, port = split_proxy(entry)
        proto = "ip" if address.version == 4 else "ip6"
        rules.append([match(meta("l4proto"), "tcp"), match(payload(proto, "daddr"), str(address)),
                      match(payload("tcp", "dport"), port), {"counter": "accepted"}, _ACCEPT])
    return rules




def _verdict_rules(settings: EnforcementSettings, hold: Hold) -> list[list[dict]]:
    # Blocked packets go to the daemon (to be named in status and the log) at a bounded rate and
    # cut to their headers: a client retrying a blocked address in a loop costs the daemon
    # nothing more. The counters and the verdict see every packet.
    log = [{"limit": {"rate": LOG_RATE, "per": "second", "burst": LOG_BURST}},
           {"log": {"prefix": LOG_PREFIX + settings.mode, "group": settings.nflog_group, "snaplen": LOG_SNAPLEN}}]
    if settings.mode == "audit":
        return [log, [{"counter": "audited"}, _ACCEPT]]
    grace = []
    if hold is Hold.PASSIVE:
        # Replies are only copied, so the daemon may learn an address just after the client
        # connects. A first SYN to an unknown address is dropped and remembered for a few
        # seconds: its retransmission passes if the address was learned meanwhile, and is
        # rejected otherwise. Blocked connections then fail after about one second.
        syn = match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "syn")
        for version, proto in ((4, "ip"), (6, "ip6")):
            daddr = payload(proto, "daddr")
            grace.append([match(meta("nfproto"), "ipv4" if version == 4 else "ipv6"),
                          match(daddr, "@" + PENDING[version], "!="), syn,
                          {"set": {"op": "add", "elem": daddr, "set": "@" + PENDING[version]}},
                          {"counter": "deferred"}, {"drop": None}])
    return grace + [
        log,
        [{"counter": "blocked"}, match(meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}],
        [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}],
    ]


DNS_CHAINS = {"dns_input": "input", "dns_forward": "forward", "dns_output": "output"}
RAW_CHAINS = (*DNS_CHAINS, TLS_QUEUE)  # their rules are raw netlink (``nft``), swapped in by ``table``
OWN_CHAIN = "own_traffic"
DNS_PRIORITY = -150  # mangle: before anything that could accept the reply


def build_ruleset(settings: EnforcementSettings, resolvers: Iterable[str], max_addresses: int,
                  hold: Hold = Hold.NONE) -> dict:
    """The whole table as one transaction, but for the DNS chains' rules.

    Sets are added, never deleted, so re-applying keeps every learned address; chains are
    flushed and refilled so the rules are exactly these, whatever was there before. The DNS
    chains are created here and left as they are: their rules (``nft.hold_rules``) are swapped
    in a netlink transaction of their own (flush and add together), so no reply passes unheld
    in between. ``hold`` matters here only for the passive grace rules. The TLS check's chains
    exist whether or not it is on (``tls_rules``).
    """
    t = {"family": FAMILY, "table": settings.table}
    cmds: list[dict] = [{"add": {"table": {"family": FAMILY, "name": settings.table}}}]
    for version in (4, 6):
        cmds.append({"add": {"set": {**t, "name": ALLOW[version], "type": SET_TYPES[version],
                                     "flags": ["timeout"], "size": max_addresses}}})
        cmds.append({"add": {"set": {**t, "name": RESOLVERS[version], "type": SET_TYPES[version]}}})
        cmds.append({"add": {"set": {**t, "name": PENDING[version], "type": SET_TYPES[version],
                                     "flags": ["timeout"], "timeout": PENDING_TIMEOUT,
                                     "size": 65536}}})
    cmds.append({"add": {"set": {**t, "name": CONTAINER_BRIDGES, "type": "ifname"}}})
    cmds += build_resolvers(settings.table, resolvers)["nftables"]
    for counter in COUNTERS:
        cmds.append({"add": {"counter": {**t, "name": counter}}})
    for hook in ("output", "forward"):
        cmds.append({"add": {"chain": {**t, "name": hook, "type": "filter", "hook": hook,
                                       "prio": 0, "policy": "accept"}}})
    cmds.append({"add": {"chain": {**t, "name": "registry"}}})
    cmds.append({"add": {"chain": {**t, "name": OWN_CHAIN}}})
    for chain in (TLS_CHAIN, TLS_SYN, TLS_QUEUE):
        cmds.append({"add": {"chain": {**t, "name": chain}}})
    cmds.append({"add": {"chain": {**t, "name": TLS_INPUT, "type": "filter", "hook": "input", "prio": 0,
                                   "policy": "accept"}}})
    checks = tls_rules(settings)
    for chain, hook in DNS_CHAINS.items():
        cmds.append({"add": {"chain": {**t, "name": chain, "type": "filter", "hook": hook,
                                       "prio": DNS_PRIORITY, "policy": "accept"}}})
    rules: dict[str, list[list[dict]]] = {
        "output": checks.get("guard", []) + [[match(meta("oif"), "lo"), _NOT_REDIRECTED, _ACCEPT], _TO_CONTAINERS]
        + _peer_first_rules(settings, "output") + [[_ESTABLISHED, _ACCEPT], [{"jump": {"target": OWN_CHAIN}}]]
        + _in_scope_rules(settings, "output"),
        "forward": checks.get("forward_guard", []) + checks.get("guard", []) + [_TO_CONTAINERS] + _peer_first_rules(settings, "forward") + [[_ESTABLISHED, _ACCEPT]]
        + _in_scope_rules(settings, "forward"),
        "registry": [
            [_TCP_UDP, match(payload("th", "dport"), 53),
             match(payload("ip", "daddr"), "@" + RESOLVERS[4]), _ACCEPT],
            [_TCP_UDP, match(payload("th", "dport"), 53),
             match(payload("ip6", "daddr"), "@" + RESOLVERS[6]), _ACCEPT],
            *checks.get("registry", []),
            [match(payload("ip", "daddr"), "@" + ALLOW[4]), {"counter": "accepted"}, _ACCEPT],
            [match(payload("ip6", "daddr"), "@" + ALLOW[6]), {"counter": "accepted"}, _ACCEPT],
            # redirected (DNAT) to a local or other address: judged by where the client was going
            [match({"ct": {"key": "ip daddr", "dir": "original"}}, "@" + ALLOW[4]), {"counter": "accepted"}, _ACCEPT],
            [match({"ct": {"key": "ip6 daddr", "dir": "original"}}, "@" + ALLOW[6]), {"counter": "accepted"},
             _ACCEPT],
        ] + _proxy_rules(settings.proxies) + _verdict_rules(settings, hold),
        TLS_CHAIN: checks.get(TLS_CHAIN, []),
        TLS_SYN: checks.get(TLS_SYN, []),
        TLS_INPUT: checks.get("input", []),
    }
    for chain, chain_rules in rules.items():
        cmds.append({"flush": {"chain": {**t, "name": chain}}})
        for expr in chain_rules:
            cmds.append({"add": {"rule": {**t, "chain": chain, "expr": expr}}})
    return {"nftables": cmds}


def build_resolvers(table: str, resolvers: Iterable[str]) -> dict:
    """Replace the trusted resolvers (DNS to them stays open for in-scope traffic)."""
    t = {"family": FAMILY, "table": table}
    cmds: list[dict] = [{"flush": {"set": {**t, "name": RESOLVERS[v]}}} for v in (4, 6)]
    for version, addresses in _by_version(sorted(set(resolvers))).items():
        if addresses:
            cmds.append({"add": {"element": {**t, "name": RESOLVERS[version], "elem": addresses}}})
    return {"nftables": cmds}


def _by_version(addresses: Iterable[str]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {4: [], 6: []}
    for address in addresses:
        found[ipaddress.ip_address(address).version].append(address)
    return found


def parse_state(listing: dict) -> TableState:
    """Read counters, learned elements and the mode back from ``nft -j list table``."""
    counters, learned, resolvers, mode = {}, [], [], "enforce"
    saw_verdict = False
    for item in listing.get("nftables", []):
        if "counter" in item:
            c = item["counter"]
            counters[c["name"]] = {"packets": c.get("packets", 0), "bytes": c.get("bytes", 0)}
        elif "set" in item:
            s = item["set"]
            for elem in s.get("elem", []):
                if s["name"] in ALLOW.values():
                    e = elem.get("elem", {}) if isinstance(elem, dict) else {}
                    learned.append(Learned(str(e.get("val", elem)), int(e.get("expires", 0)),
                                           int(e.get("timeout", 0)), e.get("comment", "")))
                elif s["name"] in RESOLVERS.values():
                    resolvers.append(str(elem))
        elif "rule" in item and item["rule"].get("chain") == "registry":
            for expr in item["rule"].get("expr", []):
                if "log" in expr:
                    saw_verdict = True
                    mode = expr["log"].get("prefix", "").removeprefix(LOG_PREFIX) or mode
    return TableState(True, mode if saw_verdict else "unknown", counters,
                      tuple(sorted(learned, key=lambda x: (x.name, x.address))), tuple(resolvers))
