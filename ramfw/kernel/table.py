"""The kernel side of ramfw's table (``inet ramfw``): the only code that writes it.

Every write goes through one long-lived netlink socket. Where the kernel can (Linux 6.9,
probed as ``table_owner``) the table is made with ``owner`` and ``persist``: only that socket
may change it (others get EPERM, ``nft flush ruleset`` passes it by), and it outlives the
daemon (an orphan, which a new daemon takes back). The JSON document of the table is then built
by libnftables in a dormant staging table and replayed from the owner's socket (``replay``).
Elsewhere the table is unowned and the document goes through libnftables as one JSON
transaction, as before. The DNS hold rules and the sets' elements always go as raw netlink
transactions (``nft``): JSON cannot express the xt target and match they need, and a held
reply waits while its elements are programmed.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import struct
from dataclasses import dataclass
from typing import Iterable, Iterator

from ..errors import NftablesError
from ..snoop.snooper import Element
from . import netlink, nft, replay
from .ruleset import (ALLOW, CONTAINER_BRIDGES, FAMILY, OWN_CHAIN, PENDING, RAW_CHAINS, RESOLVERS, Learned,
                      TableState, parse_state)

CACHE_BYTES = 16 << 20  # the element batches kept for replies seen again
INET = netlink.NFPROTO[FAMILY]
log = logging.getLogger("ramfw")


@dataclass(frozen=True)
class KernelView:
    """The table as the kernel describes it: its flags and the netlink port that owns it."""

    exists: bool
    flags: int = 0
    owner: int | None = None

    @property
    def persist(self) -> bool:
        return bool(self.flags & netlink.NFT_TABLE_F_PERSIST)


class Table:
    """ramfw's table, in the calling thread's network namespace. ``owned``: make it (or take it
    back) with owner and persist; only where the kernel accepts persist (``table_owner``)."""

    def __init__(self, name: str = "ramfw", owned: bool = False):
        import nftables  # Debian's python3-nftables; imported here so the pure core needs none

        self.name = name
        self.owned = owned
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        self._sock = None  # the one socket every write goes through: the owner, when owned
        self._seq = 1 << 20  # transactions' sequence numbers; the element batches' are small
        self._refused: list[str] = []
        self._batches: dict[tuple, list[bytes]] = {}
        self._cached = 0
        self.written: dict[str, str] | None = None  # the table as this object last left it (``verify``)

    # -- the writer's socket -----------------------------------------------------------------
    def _socket(self) -> socket.socket:
        """Opened once, closed only by ``close``: closing the owner orphans the table. Python
        makes it close-on-exec, so no child can inherit the ownership."""
        if self._sock is None:
            sock = netlink.open_socket(rcvbuf=8 << 20)
            try:  # a rebuild carries the learned elements in one transaction: megabytes
                sock.setsockopt(socket.SOL_SOCKET, netlink.SO_SNDBUFFORCE, 64 << 20)
            except OSError:
                pass
            sock.setsockopt(netlink.SOL_NETLINK, netlink.NETLINK_CAP_ACK, 1)  # refusals without our message
            self._sock = sock
        return self._sock

    @property
    def portid(self) -> int | None:
        """The netlink port the kernel names as the owner when this object owns the table."""
        return self._sock.getsockname()[0] if self._sock is not None else None

    def _transact(self, steps: list, what: str) -> None:
        """One acknowledged transaction through the writer's socket (``netlink.transact``)."""
        self._seq += len(steps) + 2
        netlink.transact(self._socket(), steps, self._seq - len(steps) - 2, what, self._refused)

    def kernel_view(self) -> KernelView:
        with netlink.open_socket(rcvbuf=1 << 16) as sock:
            try:
                found = next(netlink.dump(sock, netlink.NFT_MSG_GETTABLE, INET,
                                          netlink.string(netlink.NFTA_TABLE_NAME, self.name), 1, single=True))
            except (OSError, StopIteration):
                return KernelView(False)
        items = netlink.parse_attrs(found)
        flags, owner = items.get(netlink.NFTA_TABLE_FLAGS), items.get(netlink.NFTA_TABLE_OWNER)
        return KernelView(True, struct.unpack("!I", flags)[0] if flags else 0,
                          struct.unpack("!I", owner)[0] if owner else None)

    # -- the table and its rules -------------------------------------------------------------
    def run(self, document: dict) -> dict:
        rc, output, error = self._nft.json_cmd(document)
        if rc != 0:
            raise NftablesError(f"nftables refused the transaction: {error.strip() or rc}")
        return output or {}

    def apply(self, ruleset: dict, dns_rules: dict[str, list[bytes]], rebuild: bool = False) -> None:
        """The table, then each raw chain's rules (``nft.dns_chain_rules``, the TLS queue's) swapped (a chain is
        never empty between its old rules and its new ones). With ``rebuild``, the old table is deleted in the same
        transaction (what someone else made of it, a set redefined, a chain added, is gone);
        its learned elements too where it is unowned (the guard puts back what it learned)."""
        view = self.kernel_view()
        if self.owned:
            self._apply_owned(ruleset, dns_rules, rebuild, view)
        else:
            if view.persist:  # owned before (ownership turned off, or a newer kernel booted before)
                log.info("ramfw's table inet %s was made with owner and persist: making it afresh unowned", self.name)
            ref = {"table": {"family": FAMILY, "name": self.name}}
            # add-then-delete: safe whether or not it exists; but `add table` on a persist table is refused
            drop = [{"delete": ref}] if view.persist else [{"add": ref}, {"delete": ref}] if rebuild else []
            self.run({"nftables": drop + ruleset["nftables"]})
            for chain in RAW_CHAINS:
                self._swap(chain, dns_rules.get(chain, []), "cannot add the DNS hold rules")
        self.remember()

    def _apply_owned(self, ruleset: dict, dns_rules: dict[str, list[bytes]], rebuild: bool, view: KernelView) -> None:
        """Stage, dump, replay from the owner in one transaction (``replay``); an unowned table
        an older ramfw made is rebuilt owned, its learned elements kept."""
        migrate = view.exists and not view.persist
        stage = f"{self.name}-stage-{os.getpid()}"
        ref = netlink.string(netlink.NFTA_TABLE_NAME, stage)
        document, chains, sets = replay.for_staging(ruleset, self.name, stage)
        try:
            try:
                self._transact([(netlink.NFT_MSG_DESTROYTABLE, 0, INET, ref),
                                (netlink.NFT_MSG_NEWTABLE, netlink.NLM_F_CREATE, INET,
                                 ref + netlink.u32(netlink.NFTA_TABLE_FLAGS, netlink.NFT_TABLE_F_DORMANT))],
                               "the staging table")
            except OSError as err:
                raise NftablesError(f"nftables refused the staging table: {err.strerror}") from None
            self.run(document)
            snapshot = self._read(stage)
            learned, count = self._read_learned() if (rebuild or migrate) and view.exists else ([], 0)
            me = netlink.string(netlink.NFTA_TABLE_NAME, self.name)
            head = [(netlink.NFT_MSG_DELTABLE, 0, INET, me)] if (rebuild or migrate) and view.exists else []
            head.append((netlink.NFT_MSG_NEWTABLE, netlink.NLM_F_CREATE, INET, me + netlink.u32(
                netlink.NFTA_TABLE_FLAGS, netlink.NFT_TABLE_F_OWNER | netlink.NFT_TABLE_F_PERSIST)))
            body = replay.steps(snapshot, self.name, chains, sets)
            for chain in RAW_CHAINS:
                body += nft.rules_steps(FAMILY, self.name, chain, dns_rules.get(chain, []), replace=True)
            tail = [(netlink.NFT_MSG_DELTABLE, 0, INET, ref)]
            try:
                self._transact(head + body + learned + tail, "ramfw's table")
            except OSError as err:
                if not learned:
                    raise NftablesError(self._refused_because(err)) from None
                # a learned element the new sets refuse (the table was remade while unowned)
                log.warning("ramfw's table: its learned elements could not be carried over (%s)", err.strerror)
                try:
                    self._transact(head + body + tail, "ramfw's table")
                except OSError as err2:
                    raise NftablesError(self._refused_because(err2)) from None
                count = 0
            if migrate:
                log.info("ramfw's table inet %s was unowned (made by an earlier ramfw, or while ownership was "
                         "off): made afresh owned by this process in one transaction, its %d learned addresses "
                         "kept", self.name, count)
        finally:
            try:
                self._transact([(netlink.NFT_MSG_DESTROYTABLE, 0, INET, ref)], "the staging table")
            except OSError:
                pass

    def _refused_because(self, err: OSError) -> str:
        if err.errno == errno.EPERM:
            view = self.kernel_view()
            if view.owner is not None and view.owner != self.portid:
                return (f"the table inet {self.name} is owned by another process (netlink port {view.owner}; "
                        f"`nft list table inet {self.name}` names it): only that process may change it")
        return f"nftables refused the transaction: {err.strerror}"

    def _read(self, table: str) -> replay.Snapshot:
        with netlink.open_socket() as sock:  # reads need no owner
            return replay.read(sock, table, 1)

    def _read_learned(self) -> tuple[list, int]:
        """The allowed sets' elements, as steps that put them in the table made afresh; how many."""
        steps, count = [], 0
        with netlink.open_socket() as sock:
            for seq, set_name in enumerate(ALLOW.values(), start=1):
                where = netlink.string(replay.TABLE, self.name) + netlink.string(
                    replay.NFTA_SET_ELEM_LIST_SET, set_name)
                try:
                    found = [e for m in netlink.dump(sock, netlink.NFT_MSG_GETSETELEM, INET, where, seq)
                             for e in replay.elements_of(m)]
                except OSError:
                    continue
                steps += replay.element_steps(self.name, set_name, found, replay.LEARNED_KEEP)
                count += len(found)
        return steps, count

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

    def _swap(self, chain: str, rules: list[bytes], refused: str = "") -> None:
        try:
            self._transact(nft.rules_steps(FAMILY, self.name, chain, rules, replace=True), f"rules of {chain}")
        except OSError as err:
            if refused:
                raise NftablesError(f"{refused}: {err.strerror}") from None
            raise

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
        by_version: dict[int, list[bytes]] = {4: [], 6: []}
        for element in elements:
            by_version[6 if ":" in element.address else 4].append(nft.element_attrs(element))
        steps = [replay.flush_set(self.name, s) for s in (*ALLOW.values(), *PENDING.values())]
        for version, found in by_version.items():
            steps += replay.element_steps(self.name, ALLOW[version], found)
        self._write(steps, "programming the allowed sets")

    def remember(self) -> None:
        """The table as it is now is what ``verify`` compares with."""
        self.written = self._snapshot()

    def verify(self) -> list[str]:
        """What differs between the kernel's table and what this object last left there: its
        chains' rules, its sets, the small sets' elements, its owner. [] when nothing does."""
        if self.written is None:
            return []
        now = self._snapshot()
        if now is None:
            return [f"the table inet {self.name} is gone"]
        owner = self.kernel_view().owner if self.owned else self.portid
        return [f"{part} changed" for part in sorted(set(self.written) | set(now))
                if self.written.get(part) != now.get(part)] + \
            ([] if owner == self.portid else [f"the table is not owned by this process (owner: {owner})"])

    def set_container_bridges(self, names: Iterable[str]) -> None:
        """Replace the container bridges: traffic routed onto them stays on this VM."""
        keys = [nft.ifname_key(n) for n in sorted(set(names))]
        self._write([replay.flush_set(self.name, CONTAINER_BRIDGES)]
                    + replay.element_steps(self.name, CONTAINER_BRIDGES, keys), "setting the container bridges")
        self.remember()

    def set_resolvers(self, resolvers: Iterable[str]) -> None:
        """Replace the trusted resolvers (DNS to them stays open for in-scope traffic)."""
        steps = [replay.flush_set(self.name, s) for s in RESOLVERS.values()]
        for version, set_name in RESOLVERS.items():
            keys = [nft.address_key(a) for a in sorted(set(resolvers)) if (":" in a) == (version == 6)]
            steps += replay.element_steps(self.name, set_name, keys)
        self._write(steps, "setting the trusted resolvers")
        self.remember()

    def remove(self) -> None:
        """Delete the table, owned by this object, orphaned or unowned; safe to repeat."""
        try:
            self._transact([(netlink.NFT_MSG_DELTABLE, 0, INET, netlink.string(netlink.NFTA_TABLE_NAME, self.name))],
                           "removing the table")
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise NftablesError(self._refused_because(err)) from None
        self.written = None

    def _write(self, steps: list, what: str) -> None:
        try:
            self._transact(steps, what)
        except OSError as err:
            raise NftablesError(f"{what} failed: {self._refused_because(err)}") from None

    def close(self) -> None:
        """Close the writer's socket: an owned table becomes an orphan (it stays, unprotected)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

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
        if batch:
            self._socket().send(batch)

    def refusals(self) -> list[str]:
        """What the kernel refused of the batches sent so far (it answers inside ``send``)."""
        found, self._refused = self._refused, []
        while self._sock is not None:
            try:
                data = self._sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for msg_type, start, _ in netlink.messages(data):
                if msg_type == netlink.NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", data, start)
                    if code:
                        found.append(_describe(code))
        return found

    def delete_elements(self, addresses: Iterable[str]) -> None:
        """Forget addresses at once (a reload that removed their names), missing ones included:
        each is added bare first so the delete cannot fail."""
        steps = []
        for version, set_name in ALLOW.items():
            keys = [nft.address_key(a) for a in addresses if (":" in a) == (version == 6)]
            steps += replay.element_steps(self.name, set_name, keys)
            steps += replay.element_steps(self.name, set_name, keys, msg_type=netlink.NFT_MSG_DELSETELEM)
        if steps:
            self._write(steps, "forgetting addresses")

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


def _describe(code: int) -> str:
    return f"{os.strerror(-code)} ({errno.errorcode.get(-code, code)})"
