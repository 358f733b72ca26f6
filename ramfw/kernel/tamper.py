"""Who changed ramfw's table: nf_tables change notifications (NFNLGRP_NFTABLES), read as they
come.

Every nf_tables transaction in the namespace is announced, message by message, then closed by
a NEWGEN message that names the process that committed it (pid and name). A transaction that
touched ramfw's table (any message whose table attribute names it, in the inet family: a rule,
a chain, a set, the table itself, and ``nft flush ruleset``'s deletion of it) and was not
committed by this process is a change someone else made. Set elements count only when the
transaction leaves one added: an address taken out of the allowed sets only blocks more (it is
learned again from the next reply), one put in opens a way. Lost notifications (a full socket
buffer) are a change of unknown origin. The daemon repairs on any (``table``'s ``verify`` says
what differs). A transaction of another process that changed another table's rules, chains or
the table itself (not its set elements) sets ``others_changed``: the TLS check reads the ruleset
again for rules that write its conntrack mark bits (``ctmarks``).
"""

from __future__ import annotations

import errno
import os
import select
import socket
import struct
import time
from dataclasses import dataclass

from . import netlink as nl

NFNLGRP_NFTABLES = 7
NFT_MSG_NEWGEN = 15
NFTA_GEN_PROC_PID, NFTA_GEN_PROC_NAME = 2, 3
TABLE_NAME = 1  # NFTA_TABLE_NAME, NFTA_CHAIN_TABLE, NFTA_RULE_TABLE, NFTA_SET_TABLE, ...: always attribute 1


NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE, NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 0, 2, 12, 14
NFTA_SET_ELEM_LIST_ELEMENTS, NFTA_LIST_ELEM, NFTA_SET_ELEM_KEY, NFTA_DATA_VALUE = 3, 1, 1, 1


@dataclass(frozen=True)
class Change:
    pid: int  # 0: unknown (notifications were lost)
    process: str

    def __str__(self) -> str:
        return f"pid {self.pid} ({self.process})" if self.pid else self.process


class TableWatch:
    """Changes others make to one table, from the namespace's nf_tables notifications."""

    def __init__(self, table: str, family: str = "inet"):
        self.table, self.family = table.encode() + b"\0", nl.NFPROTO[family]
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, nl.NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self.sock.bind((0, 1 << (NFNLGRP_NFTABLES - 1)))
        except BaseException:
            self.sock.close()
            raise
        self.sock.setblocking(False)
        self._touched = False  # the transaction being read touched the table's structure
        self._others = False  # ... or another table's (not its elements)
        self.others_changed = False  # another process changed another table: the reader clears it
        # ... and its element messages, (added?, attributes): read only if the transaction was
        # someone else's (the daemon's own batches, one per learned reply, are never parsed)
        self._elements: list[tuple[bool, dict[int, bytes]]] = []
        self.own_pid = self._calibrate()

    def _calibrate(self) -> int:
        """The pid the kernel gives this thread's commits (NEWGEN's is the pid in the initial
        pid namespace: in a private one, a WSL2 distribution's, it is not ``os.getpid()``).
        Commit an empty table of a unique name, made and deleted in one transaction, and read
        which pid the kernel names for it. Call from the thread that writes the table."""
        marker = f"ramfw_self_{os.getpid()}_{id(self) & 0xFFFF}"
        ref = nl.string(1, marker)  # NFTA_TABLE_NAME
        with nl.open_socket() as sock:
            sock.send(nl.batch([(NFT_MSG_NEWTABLE, nl.NLM_F_CREATE | nl.NLM_F_ACK, self.family, ref),
                                (NFT_MSG_DELTABLE, nl.NLM_F_ACK, self.family, ref)]))
            nl.wait_acks(sock, 2, "ramfw's own-commit marker")
        seen, deadline = False, time.monotonic() + 5
        while time.monotonic() < deadline:
            if not select.select([self.sock], [], [], max(0.0, deadline - time.monotonic()))[0]:
                break
            data = self.sock.recv(1 << 17)
            for msg_type, start, end in nl.messages(data):
                attrs = nl.parse_attrs(data, start + nl.NFGEN.size, end)
                if msg_type & 0xFF == NFT_MSG_NEWTABLE and attrs.get(TABLE_NAME) == marker.encode() + b"\0":
                    seen = True
                elif msg_type & 0xFF == NFT_MSG_NEWGEN and seen:
                    return _gen_pid(attrs) or os.getpid()
        return os.getpid()

    def receive(self, bursts: int = 64) -> list[Change]:
        """Foreign changes whose notifications wait; [] at once when none do."""
        changes = []
        for _ in range(bursts):
            try:
                data = self.sock.recv(1 << 17)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno != errno.ENOBUFS:
                    raise
                self._touched, self._others, self._elements, self.others_changed = False, False, [], True
                changes.append(Change(0, "unknown: nf_tables notifications were lost"))
                continue
            changes += self._parse(data)
        return changes

    def _parse(self, data: bytes) -> list[Change]:
        changes = []
        for msg_type, start, end in nl.messages(data):
            if msg_type >> 8 != nl.NFNL_SUBSYS_NFTABLES or start + nl.NFGEN.size > end:
                continue
            attrs = nl.parse_attrs(data, start + nl.NFGEN.size, end)
            kind = msg_type & 0xFF
            if kind == NFT_MSG_NEWGEN:
                pid = _gen_pid(attrs)
                if pid != self.own_pid and (self._touched or _net_added(self._elements)):
                    name = attrs.get(NFTA_GEN_PROC_NAME, b"?").rstrip(b"\0").decode(errors="replace")
                    changes.append(Change(pid, name))
                self.others_changed |= pid != self.own_pid and self._others
                self._touched, self._others, self._elements = False, False, []
            elif data[start] != self.family or attrs.get(TABLE_NAME) != self.table:
                self._others |= kind not in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM)
            elif kind in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM):
                self._elements.append((kind == NFT_MSG_NEWSETELEM, attrs))
            else:
                self._touched = True
        return changes

    def close(self) -> None:
        self.sock.close()


def _gen_pid(attrs: dict[int, bytes]) -> int:
    value = attrs.get(NFTA_GEN_PROC_PID, b"")
    return struct.unpack("!I", value)[0] if len(value) == 4 else 0


def _net_added(elements: list[tuple[bool, dict[int, bytes]]]) -> bool:
    """Whether a transaction's element messages, in order, leave an element added."""
    added: set[bytes] = set()
    for adds, attrs in elements:
        added = added | _keys(attrs) if adds else added - _keys(attrs)
    return bool(added)


def _keys(attrs: dict[int, bytes]) -> set[bytes]:
    """The set and key of each element of a NEWSETELEM or DELSETELEM message."""
    set_name = attrs.get(2, b"")  # NFTA_SET_ELEM_LIST_SET
    keys = set()
    for kind, element in nl.iter_attrs(attrs.get(NFTA_SET_ELEM_LIST_ELEMENTS, b"")):
        if kind == NFTA_LIST_ELEM:
            key = nl.parse_attrs(nl.parse_attrs(element).get(NFTA_SET_ELEM_KEY, b"")).get(NFTA_DATA_VALUE, b"")
            keys.add(set_name + b"/" + key)
    return keys
