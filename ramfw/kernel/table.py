"""The kernel side of ramfw's table (``inet ramfw``): the only code that writes it.

The table itself goes through libnftables as one JSON transaction (``ruleset``); the DNS hold
rules and the allowed sets' elements go as raw netlink transactions (``nft``), because JSON
cannot express the xt target and match they need, and because a held reply waits while its
elements are programmed.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from typing import Iterable, Iterator

from ..errors import NftablesError
from ..snoop.snooper import Element
from . import netlink, nft
from .ruleset import (CONTAINER_BRIDGES, DNS_CHAINS, FAMILY, OWN_CHAIN, RESOLVERS, Learned, TableState,
                      build_container_bridges, build_delete_elements, build_remove, build_replace_allowed,
                      build_resolvers, parse_state)

CACHE_BYTES = 16 << 20  # the element batches kept for replies seen again


class Table:
    """ramfw's table, in the calling thread's network namespace."""

    def __init__(self, name: str = "ramfw"):
        import nftables  # Debian's python3-nftables; imported here so the pure core needs none

        self.name = name
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._sock = None
        self._batches: dict[tuple, list[bytes]] = {}
        self._cached = 0
        self.written: dict[str, str] | None = None  # the table as this object last left it (``verify``)

    # -- the table and its rules -------------------------------------------------------------
    def run(self, document: dict) -> dict:
        rc, output, error = self._nft.json_cmd(document)
        if rc != 0:
            raise NftablesError(f"nftables refused the transaction: {error.strip() or rc}")
        return output or {}

    def apply(self, ruleset: dict, dns_rules: dict[str, list[bytes]], rebuild: bool = False) -> None:
        """The table (one JSON transaction), then each DNS chain's rules (``nft.dns_chain_rules``)
        swapped in one netlink transaction: a chain is never empty between its old rules and its new ones. With
        ``rebuild``, the old table is deleted in the same transaction (what someone else made of
        it, a set redefined, a chain added, is gone); its learned elements too."""
        self.run({"nftables": build_remove(self.name)["nftables"] + ruleset["nftables"]} if rebuild else ruleset)
        for chain in DNS_CHAINS:
            try:
                self._swap(chain, dns_rules.get(chain, []))
            except OSError as err:
                raise NftablesError(f"cannot add the DNS hold rules: {err.strerror}") from None
        self.remember()

    def set_own_traffic(self, rules: list[bytes]) -> None:
        """The rules that let ramfw's own connections pass host scope (``nft.own_traffic_rules``);
        OSError when the kernel refuses them (the socket cgroupv2 match needs Linux 5.13)."""
        self._swap(OWN_CHAIN, rules)
        self.remember()

    def swap_rules(self, chain: str, rules: list[bytes]) -> None:
        """Replace a chain's rules with ``rules`` in one transaction; OSError with the kernel's
        errno when refused."""
        self._swap(chain, rules)
        self.remember()

    def _swap(self, chain: str, rules: list[bytes]) -> None:
        with netlink.open_socket() as sock:
            sock.send(nft.build_rules_batch(FAMILY, self.name, chain, rules, replace=True))
            netlink.wait_acks(sock, len(rules) + 1, "DNS hold rule")

    def _snapshot(self) -> dict[str, str] | None:
        """Every chain's rules and every set (its definition; the elements of the small ones,
        not of the allowed and pending sets, which hold what the daemon learns), as text to
        compare; None if the table is gone."""
        import nftables

        terse = nftables.Nftables()
        terse.set_json_output(True)
        terse.set_terse_output(True)  # no set elements: 100,000 of them would cost hundreds of MB
        rc, output, _ = terse.json_cmd({"nftables": [{"list": {"table": {"family": FAMILY, "name": self.name}}}]})
        if rc != 0:
            return None
        parts: dict[str, list] = {}
        for item in (output or {}).get("nftables", []):
            for kind in ("chain", "rule", "set"):
                if kind in item:
                    body = {k: v for k, v in item[kind].items() if k != "handle"}
                    owner = body["chain"] if kind == "rule" else body["name"]
                    parts.setdefault(f"{'set' if kind == 'set' else 'chain'} {owner}", []).append(body)
        for name in (*RESOLVERS.values(), CONTAINER_BRIDGES):
            rc, output, _ = self._nft.json_cmd({"nftables": [{"list": {"set": {"family": FAMILY, "table": self.name,
                                                                               "name": name}}}]})
            parts.setdefault(f"set {name}", []).append(output if rc == 0 else None)
        return {key: json.dumps(value, sort_keys=True) for key, value in parts.items()}

    def replace_allowed(self, elements: Iterable[Element]) -> None:
        """The allowed sets hold exactly ``elements``, the pending sets nothing (one transaction)."""
        self.run(build_replace_allowed(self.name, elements))

    def remember(self) -> None:
        """The table as it is now is what ``verify`` compares with."""
        self.written = self._snapshot()

    def verify(self) -> list[str]:
        """What differs between the kernel's table and what this object last left there: its
        chains' rules, its sets, the small sets' elements. [] when nothing does."""
        if self.written is None:
            return []
        now = self._snapshot()
        if now is None:
            return [f"the table inet {self.name} is gone"]
        return [f"{part} changed" for part in sorted(set(self.written) | set(now))
                if self.written.get(part) != now.get(part)]

    def set_container_bridges(self, names: Iterable[str]) -> None:
        self.run(build_container_bridges(self.name, names))
        self.remember()

    def set_resolvers(self, resolvers: Iterable[str]) -> None:
        self.run(build_resolvers(self.name, resolvers))
        self.remember()

    def remove(self) -> None:
        self.run(build_remove(self.name))
        self.written = None

    # -- the allowed sets ----------------------------------------------------------------------
    def add_elements(self, elements: Iterable[Element], kernel_refreshes_timeout: bool = True,
                     clear_pending: bool = False, check: bool = True) -> None:
        """Program elements in raw netlink batches. With ``check``, raise NftablesError if the
        kernel refused; without (the hold path), refusals wait for ``refusals()``."""
        key = (tuple(elements), kernel_refreshes_timeout, clear_pending)
        batches = self._batches.get(key)
        if batches is None:  # replies re-arm the same elements again and again: build once
            batches = nft.build_elements_batches(self.name, key[0], kernel_refreshes_timeout, clear_pending)
            size = sum(map(len, batches))
            if len(self._batches) >= 4096 or self._cached + size > CACHE_BYTES:
                self._batches.clear()
                self._cached = 0
            self._batches[key] = batches
            self._cached += size
        for batch in batches:  # all before the caller releases the reply
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

    def delete_elements(self, addresses: Iterable[str]) -> None:
        """Forget addresses at once (a reload that removed their names), missing ones included."""
        document = build_delete_elements(self.name, addresses)
        if document["nftables"]:
            self.run(document)

    def learned(self) -> Iterator[Learned]:
        """The allowed sets' elements, streamed from a netlink dump; nothing when the table
        does not exist."""
        with netlink.open_socket() as sock:
            yield from nft.dump_all(sock, self.name)

    # -- reading it back -------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        rc, output, _ = self._nft.json_cmd({"nftables": [{"list": {"counters": {"family": FAMILY}}}]})
        found = {}
        for item in (output or {}).get("nftables", []) if rc == 0 else []:
            c = item.get("counter")
            if c and c.get("table") == self.name:
                found[c["name"]] = c.get("packets", 0)
        return found

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
