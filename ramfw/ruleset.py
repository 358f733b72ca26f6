"""The nftables table ramfw owns (``inet ramfw``): rendered whole as data, applied in one transaction.

``build_*`` functions are pure and return libnftables JSON; ``Table`` is the only code that
talks to the kernel about this table. The table has no ``owner`` flag on purpose: enforcement
stays in the kernel when the process that applied it exits or dies (registry egress fails
closed), and only ``ramfw down`` removes it.

Layout::

    output   (hook output)   established/related, loopback -> accept; in scope -> registry
    forward  (hook forward)  established/related -> accept; in scope -> registry
    registry                 DNS to trusted resolvers, @allow4/@allow6 -> accept;
                             otherwise log to NFLOG, count, reject (enforce) or accept (audit)
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

from . import netlink
from .config import EnforcementSettings
from .errors import NftablesError

FAMILY = "inet"
ALLOW = {4: "allow4", 6: "allow6"}
PENDING = {4: "pending4", 6: "pending6"}
PENDING_TIMEOUT = 3  # seconds: covers one SYN retransmission (1 s) with room to spare
RESOLVERS = {4: "resolvers4", 6: "resolvers6"}
COUNTERS = ("blocked", "audited", "accepted", "deferred")
LOG_PREFIX = "ramfw "
SET_TYPES = {4: "ipv4_addr", 6: "ipv6_addr"}


@dataclass(frozen=True)
class Element:
    """An address to allow for ``timeout`` seconds; ``name`` is kept as the element's comment."""

    address: str
    timeout: int
    name: str = ""


def _match(left: dict, right: object, op: str = "==") -> dict:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> dict:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict:
    return {"payload": {"protocol": protocol, "field": field}}


_ESTABLISHED = _match({"ct": {"key": "state"}}, ["established", "related"], "in")
_TCP_UDP = _match(_meta("l4proto"), {"set": ["tcp", "udp"]})
_ACCEPT = {"accept": None}


def _ports(ports: Iterable[int]) -> list[dict]:
    return [_TCP_UDP, _match(_payload("th", "dport"), {"set": sorted(ports)})]


def _in_scope_rules(settings: EnforcementSettings, hook: str) -> list[list[dict]]:
    """The matches that send a packet of this hook into the registry chain."""
    jump = {"jump": {"target": "registry"}}
    rules = []
    if hook == "output":
        if "engine" in settings.scope:
            marked = _match({"&": [_meta("mark"), settings.mark_mask]}, settings.mark)
            rules.append([marked, jump])
        if "host" in settings.scope:
            rules.append(_ports(settings.registry_ports) + [jump])
    elif "containers" in settings.scope:
        rules.append(_ports(settings.registry_ports) + [jump])
    return rules


def _verdict_rules(settings: EnforcementSettings, hold: str) -> list[list[dict]]:
    log = {"log": {"prefix": LOG_PREFIX + settings.mode, "group": settings.nflog_group}}
    if settings.mode == "audit":
        return [[log, {"counter": "audited"}, _ACCEPT]]
    grace = []
    if hold == "passive":
        # Replies are only copied, so the daemon may learn an address just after the client
        # connects. A first SYN to an unknown address is dropped and remembered for a few
        # seconds: its retransmission passes if the address was learned meanwhile, and is
        # rejected otherwise. Blocked connections then fail after about one second.
        syn = _match({"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]}, "syn")
        for version, proto in ((4, "ip"), (6, "ip6")):
            daddr = _payload(proto, "daddr")
            grace.append([_match(_meta("nfproto"), "ipv4" if version == 4 else "ipv6"),
                          _match(daddr, "@" + PENDING[version], "!="), syn,
                          {"set": {"op": "add", "elem": daddr, "set": "@" + PENDING[version]}},
                          {"counter": "deferred"}, {"drop": None}])
    return grace + [
        [log, {"counter": "blocked"}, _match(_meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}],
        [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}],
    ]


DNS_CHAINS = {"dns_input": "input", "dns_forward": "forward"}
DNS_PRIORITY = -150  # mangle: before anything that could accept the reply


def _dns_rules(hold: str, queue_num: int, snoop_group: int) -> list[list[dict]]:
    """How DNS replies reach the daemon: held in the queue, or copied to it (passive)."""
    from_dns = [_TCP_UDP, _match(_payload("th", "sport"), 53)]
    if hold == "nft-queue":
        return [from_dns + [{"queue": {"num": queue_num, "flags": ["bypass"]}}]]
    if hold == "passive":
        return [from_dns + [{"log": {"group": snoop_group}}]]
    return []  # none: DNS is not held (ramfw up alone)


def build_ruleset(settings: EnforcementSettings, resolvers: Iterable[str], max_addresses: int,
                  hold: str = "none", queue_num: int = 0, snoop_group: int = 0) -> dict:
    """The whole table as one transaction.

    Sets are added, never deleted, so re-applying keeps every learned address; chains are
    flushed and refilled so the rules are exactly these, whatever was there before.
    ``hold`` says how the daemon sees DNS replies; ``ramfw up`` alone uses none. With
    ``netlink`` the DNS chains are left as they are: ``holdrules`` replaces their rules in a
    transaction of its own (flush and add together), so no reply passes unheld in between.
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
    cmds += build_resolvers(settings.table, resolvers)["nftables"]
    for counter in COUNTERS:
        cmds.append({"add": {"counter": {**t, "name": counter}}})
    for hook in ("output", "forward"):
        cmds.append({"add": {"chain": {**t, "name": hook, "type": "filter", "hook": hook,
                                       "prio": 0, "policy": "accept"}}})
    cmds.append({"add": {"chain": {**t, "name": "registry"}}})
    for chain, hook in DNS_CHAINS.items():
        cmds.append({"add": {"chain": {**t, "name": chain, "type": "filter", "hook": hook,
                                       "prio": DNS_PRIORITY, "policy": "accept"}}})
    rules: dict[str, list[list[dict]]] = {
        "output": [[_ESTABLISHED, _ACCEPT], [_match(_meta("oif"), "lo"), _ACCEPT]]
        + _in_scope_rules(settings, "output"),
        "forward": [[_ESTABLISHED, _ACCEPT]] + _in_scope_rules(settings, "forward"),
        "registry": [
            [_TCP_UDP, _match(_payload("th", "dport"), 53),
             _match(_payload("ip", "daddr"), "@" + RESOLVERS[4]), _ACCEPT],
            [_TCP_UDP, _match(_payload("th", "dport"), 53),
             _match(_payload("ip6", "daddr"), "@" + RESOLVERS[6]), _ACCEPT],
            [_match(_payload("ip", "daddr"), "@" + ALLOW[4]), {"counter": "accepted"}, _ACCEPT],
            [_match(_payload("ip6", "daddr"), "@" + ALLOW[6]), {"counter": "accepted"}, _ACCEPT],
        ] + _verdict_rules(settings, hold),
        **{chain: _dns_rules(hold, queue_num, snoop_group) for chain in DNS_CHAINS},
    }
    for chain, chain_rules in rules.items():
        if hold == "netlink" and chain in DNS_CHAINS:
            continue
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


def build_remove(table: str) -> dict:
    """Add-then-delete: removes the table whether or not it exists, so it is safe to repeat."""
    ref = {"family": FAMILY, "name": table}
    return {"nftables": [{"add": {"table": ref}}, {"delete": {"table": ref}}]}


def _by_version(addresses: Iterable[str]) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {4: [], 6: []}
    for address in addresses:
        found[ipaddress.ip_address(address).version].append(address)
    return found


def build_delete_elements(table: str, addresses: Iterable[str]) -> dict:
    """Remove addresses, present or not: each is added bare first so the delete cannot fail."""
    cmds = []
    for version, bare in _by_version(addresses).items():
        if bare:
            ref = {"family": FAMILY, "table": table, "name": ALLOW[version]}
            cmds += [{"add": {"element": {**ref, "elem": bare}}}, {"delete": {"element": {**ref, "elem": bare}}}]
    return {"nftables": cmds}


NFNL_SUBSYS_NFTABLES = 10
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 0x10, 0x11
NFT_MSG_NEWSETELEM, NFT_MSG_GETSETELEM, NFT_MSG_DELSETELEM = 12, 13, 14
NFTA_SET_ELEM_EXPIRATION = 5
NFPROTO_INET = 1
NFTA_SET_ELEM_LIST_TABLE, NFTA_SET_ELEM_LIST_SET, NFTA_SET_ELEM_LIST_ELEMENTS = 1, 2, 3
NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_USERDATA = 1, 1, 4, 6
NFTA_DATA_VALUE = 1
NFTNL_UDATA_SET_ELEM_COMMENT = 0
BATCH_ELEMENTS = 1000  # keeps one batch well under the socket's send buffer


def _netlink_elements(elements: list[Element], with_data: bool) -> bytes:
    parts = []
    for element in elements:
        packed = socket.inet_pton(socket.AF_INET6 if ":" in element.address else socket.AF_INET, element.address)
        attrs = netlink.nested(NFTA_SET_ELEM_KEY, netlink.attr(NFTA_DATA_VALUE, packed))
        if with_data:
            attrs += netlink.attr(NFTA_SET_ELEM_TIMEOUT, struct.pack("!Q", element.timeout * 1000))
            if element.name:
                comment = element.name[:127].encode() + b"\0"
                attrs += netlink.attr(NFTA_SET_ELEM_USERDATA,
                                      bytes([NFTNL_UDATA_SET_ELEM_COMMENT, len(comment)]) + comment)
        parts.append(netlink.nested(NFTA_LIST_ELEM, attrs))
    return b"".join(parts)


def build_elements_batch(table: str, elements: Iterable[Element], refresh_by_readd: bool, seq: int = 1,
                         clear_pending: bool = False) -> bytes:
    """Add (or re-arm) elements in one raw nf_tables netlink batch.

    This is the hold path: a reply waits while it runs, so it skips libnftables' JSON round
    trip. The kernel commits the batch inside ``send``, before the reply is released.
    Kernels that do not refresh a timeout when an element is added again get add, delete,
    add: the first add makes the delete safe, the last sets the new timeout, and since it is
    one transaction no packet sees the address missing. ``clear_pending`` (passive hold)
    also takes the addresses out of the pending sets, so their next first SYN is deferred again.
    """
    by_version: dict[int, list[Element]] = {4: [], 6: []}
    for element in elements:
        by_version[6 if ":" in element.address else 4].append(element)
    steps = []
    for version, items in by_version.items():
        if not items:
            continue
        head = netlink.string(NFTA_SET_ELEM_LIST_TABLE, table) + netlink.string(NFTA_SET_ELEM_LIST_SET, ALLOW[version])
        if not refresh_by_readd:
            bare = netlink.nested(NFTA_SET_ELEM_LIST_ELEMENTS, _netlink_elements(items, False))
            steps += [(NFT_MSG_NEWSETELEM, head + bare), (NFT_MSG_DELSETELEM, head + bare)]
        steps.append((NFT_MSG_NEWSETELEM, head + netlink.nested(NFTA_SET_ELEM_LIST_ELEMENTS,
                                                                 _netlink_elements(items, True))))
        if clear_pending:
            pending = (netlink.string(NFTA_SET_ELEM_LIST_TABLE, table) + netlink.string(NFTA_SET_ELEM_LIST_SET, PENDING[version])
                       + netlink.nested(NFTA_SET_ELEM_LIST_ELEMENTS, _netlink_elements(items, False)))
            steps += [(NFT_MSG_NEWSETELEM, pending), (NFT_MSG_DELSETELEM, pending)]
    if not steps:
        return b""
    messages = [netlink.message(NFNL_MSG_BATCH_BEGIN, netlink.NLM_F_REQUEST, seq, 0, NFNL_SUBSYS_NFTABLES, b"")]
    for offset, (msg_type, attrs) in enumerate(steps, start=1):
        flags = netlink.NLM_F_REQUEST | (netlink.NLM_F_CREATE if msg_type == NFT_MSG_NEWSETELEM else 0)
        messages.append(netlink.message((NFNL_SUBSYS_NFTABLES << 8) | msg_type, flags, seq + offset,
                                        NFPROTO_INET, 0, attrs))
    messages.append(netlink.message(NFNL_MSG_BATCH_END, netlink.NLM_F_REQUEST, seq + len(steps) + 1, 0,
                                    NFNL_SUBSYS_NFTABLES, b""))
    return b"".join(messages)


@dataclass(frozen=True)
class Learned:
    address: str
    expires: int
    timeout: int
    name: str


def _read_dump(sock: socket.socket, family: int) -> Iterator[Learned]:
    while True:
        data = sock.recv(1 << 20)
        for msg_type, start, end in netlink.messages(data):
            if msg_type in (netlink.NLMSG_DONE, netlink.NLMSG_ERROR):
                return
            attrs = netlink.parse_attrs(data, start + netlink.NFGEN.size, end)
            for _, elem in netlink.iter_attrs(attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
                e = netlink.parse_attrs(elem)
                key = netlink.parse_attrs(e.get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE, b"")
                try:
                    address = socket.inet_ntop(family, key)
                except (ValueError, OSError):
                    continue
                timeout = struct.unpack("!Q", e[NFTA_SET_ELEM_TIMEOUT])[0] // 1000 if NFTA_SET_ELEM_TIMEOUT in e else 0
                expires = struct.unpack("!Q", e[NFTA_SET_ELEM_EXPIRATION])[0] // 1000 if NFTA_SET_ELEM_EXPIRATION in e else 0
                udata = e.get(NFTA_SET_ELEM_USERDATA, b"")
                name = ""
                if len(udata) >= 2 and udata[0] == NFTNL_UDATA_SET_ELEM_COMMENT:
                    name = udata[2 : 2 + udata[1]].rstrip(b"\0").decode(errors="replace")
                yield Learned(address, expires, timeout, name)


@dataclass(frozen=True)
class TableState:
    exists: bool
    mode: str = ""
    counters: dict | None = None
    learned: tuple[Learned, ...] = ()
    resolvers: tuple[str, ...] = ()


class Table:
    """The kernel side of ramfw's table, in the calling thread's network namespace."""

    def __init__(self, name: str = "ramfw"):
        import nftables  # Debian's python3-nftables; imported here so the pure core needs none

        self.name = name
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._sock = None
        self._batches: dict[tuple, bytes] = {}

    def run(self, document: dict) -> dict:
        rc, output, error = self._nft.json_cmd(document)
        if rc != 0:
            raise NftablesError(f"nftables refused the transaction: {error.strip() or rc}")
        return output or {}

    def apply(self, ruleset: dict) -> None:
        self.run(ruleset)

    def remove(self) -> None:
        self.run(build_remove(self.name))

    def add_elements(self, elements: Iterable[Element], refresh_by_readd: bool = True,
                     clear_pending: bool = False, check: bool = True) -> None:
        """Program elements in raw netlink batches. With ``check``, raise NftablesError if the
        kernel refused; without (the hold path), refusals wait for ``refusals()``."""
        elements = tuple(elements)
        for start in range(0, len(elements), BATCH_ELEMENTS):
            chunk = elements[start : start + BATCH_ELEMENTS]
            key = (chunk, refresh_by_readd, clear_pending)
            batch = self._batches.get(key)
            if batch is None:  # replies re-arm the same elements again and again: build once
                if len(self._batches) >= 4096:
                    self._batches.clear()
                batch = self._batches[key] = build_elements_batch(self.name, chunk, refresh_by_readd,
                                                                  clear_pending=clear_pending)
            self._send(batch)
        if check:
            refused = self.refusals()
            if refused:
                raise NftablesError(f"programming the allowed sets failed: {refused[0]}")

    def _send(self, batch: bytes) -> None:
        if not batch:
            return
        if self._sock is None:
            self._sock = netlink.open_socket(rcvbuf=1 << 20)
        self._sock.send(batch)

    def refusals(self) -> list[str]:
        """What the kernel refused of the batches sent so far (it answers inside ``send``)."""
        found = []
        while self._sock is not None:
            try:
                data = self._sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for msg_type, start, _ in netlink.messages(data):
                if msg_type == netlink.NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, start)
                    if code:
                        found.append(f"{os.strerror(-code)} ({errno.errorcode.get(-code, code)})")
        return found

    def learned(self) -> Iterator[Learned]:
        """The allowed sets' elements, streamed from a netlink dump (a JSON listing of 100,000
        elements costs hundreds of MB); nothing when the table does not exist."""
        with netlink.open_socket() as sock:
            for version, set_name in ALLOW.items():
                head = netlink.string(NFTA_SET_ELEM_LIST_TABLE, self.name) + netlink.string(NFTA_SET_ELEM_LIST_SET, set_name)
                sock.send(netlink.message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM,
                                          netlink.NLM_F_REQUEST | netlink.NLM_F_DUMP, version, NFPROTO_INET, 0, head))
                yield from _read_dump(sock, socket.AF_INET if version == 4 else socket.AF_INET6)

    def counters(self) -> dict[str, int]:
        rc, output, _ = self._nft.json_cmd({"nftables": [{"list": {"counters": {"family": FAMILY}}}]})
        found = {}
        for item in (output or {}).get("nftables", []) if rc == 0 else []:
            c = item.get("counter")
            if c and c.get("table") == self.name:
                found[c["name"]] = c.get("packets", 0)
        return found

    def delete_elements(self, addresses: Iterable[str]) -> None:
        """Forget addresses at once (a reload that removed their names), missing ones included."""
        document = build_delete_elements(self.name, addresses)
        if document["nftables"]:
            self.run(document)

    def state(self) -> TableState:
        """The table's state, without listing the allowed sets as JSON (100,000 elements would
        cost hundreds of MB): their elements come from a netlink dump."""
        t = {"family": FAMILY, "table": self.name}
        items: list[dict] = []
        for listing in ({"chain": {**t, "name": "registry"}}, {"set": {**t, "name": RESOLVERS[4]}},
                        {"set": {**t, "name": RESOLVERS[6]}}, {"counters": {"family": FAMILY}}):
            rc, output, _ = self._nft.json_cmd({"nftables": [{"list": listing}]})
            if rc != 0:
                if "chain" in listing:
                    return TableState(exists=False)
                continue
            items += [i for i in (output or {}).get("nftables", [])
                      if i.get("counter", {}).get("table", self.name) == self.name]
        found = parse_state({"nftables": items})
        learned = tuple(sorted(self.learned(), key=lambda x: (x.name, x.address)))
        return TableState(True, found.mode, found.counters, learned, found.resolvers)


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
