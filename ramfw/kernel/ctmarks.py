"""Other tables' writes to the conntrack mark bits the TLS check keeps its state in.

The check keeps a flow's state in two bits of its conntrack mark (``enforcement.tls_ct_mark``:
being read, and the next bit up: refused) and writes only those. Another table that writes the
whole mark (wg-quick's ``ct mark set meta mark``, ``ct mark set 0x1``, a map) or a masked part
that covers them clears the first bit (the flow's ClientHello is never read: it passes on its
address alone) or sets the second (the flow is reset). ``mark_writers`` finds those rules in the
ruleset as libnftables lists it (pure); ``listed`` reads it, and only reads; ``find`` does both.
What cannot be read counts as a writer: a value of a shape not known here, and iptables-nft's
CONNMARK target (an ``xt`` statement, whose mask libnftables does not show).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import NftablesError

FULL = 0xFFFFFFFF
CT_MARK = {"ct": {"key": "mark"}}
BITWISE = ("&", "|", "^")


@dataclass(frozen=True)
class MarkWriter:
    """A rule of another table that may change a bit of the mask."""

    family: str
    table: str
    chain: str
    handle: int
    statement: str

    def __str__(self) -> str:
        return f"table {self.family} {self.table} chain {self.chain} rule handle {self.handle} ({self.statement})"


def mark_writers(ruleset: dict, mask: int, own_table: str) -> list[MarkWriter]:
    """The rules outside ``inet own_table`` that may change a bit of ``mask`` in the conntrack
    mark, in the ruleset's order."""
    found = []
    for item in ruleset.get("nftables", []):
        rule = item.get("rule") if isinstance(item, dict) else None
        if not isinstance(rule, dict) or (rule.get("family"), rule.get("table")) == ("inet", own_table):
            continue
        for statement in rule.get("expr") or []:
            text = _writes(statement, mask)
            if text is not None:
                found.append(MarkWriter(str(rule.get("family")), str(rule.get("table")), str(rule.get("chain")),
                                        int(rule.get("handle", 0)), text))
    return found


def _writes(statement, mask: int) -> str | None:
    """A short text of ``statement`` if it may change a bit of ``mask``, else None."""
    if not isinstance(statement, dict):
        return None
    xt = statement.get("xt")
    if isinstance(xt, dict) and xt.get("type") == "target" and xt.get("name") == "CONNMARK":
        return "iptables CONNMARK, not inspectable"
    mangle = statement.get("mangle")
    if not isinstance(mangle, dict) or mangle.get("key") != CT_MARK:
        return None
    value = mangle.get("value")
    return None if mask & ~kept_bits(value) == 0 else f"ct mark set {_text(value)}"


def kept_bits(value) -> int:
    """The bits of the conntrack mark that ``value``, written back into it, leaves as they were:
    ``ct mark & K`` keeps K's, ``ct mark | V`` and ``ct mark ^ V`` the bits V has not, and so on
    down nested operations; 0 for anything else (a constant, the packet mark, a map, a hash, a
    shape not known here)."""
    if value == CT_MARK:
        return FULL
    if not (isinstance(value, dict) and len(value) == 1):
        return 0
    (op, operands), = value.items()
    if op not in BITWISE or not (isinstance(operands, list) and len(operands) == 2):
        return 0
    left, right = operands
    if _number(right) and not _number(left):
        kept, constant = kept_bits(left), right & FULL
    elif _number(left) and not _number(right):
        kept, constant = kept_bits(right), left & FULL
    else:
        return 0
    return kept & constant if op == "&" else kept & ~constant & FULL


def _number(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _text(value) -> str:
    """Close to how ``nft list`` writes it, for the shapes most written; the operation's name for
    the others."""
    if _number(value):
        return f"{value:#x}"
    if isinstance(value, dict) and len(value) == 1:
        (op, operands), = value.items()
        if op in BITWISE + ("<<", ">>") and isinstance(operands, list) and len(operands) == 2:
            left, right = operands
            return f"{_text(left)} {op} {_text(right) if op in BITWISE else right}"
        if op in ("ct", "meta") and isinstance(operands, dict) and "key" in operands:
            return f"{op} {operands['key']}"
        if op == "payload" and isinstance(operands, dict) and "field" in operands:
            return f"{operands.get('protocol', '')} {operands['field']}".strip()
        if op == "map" and isinstance(operands, dict):
            data = operands.get("data")
            return f"{_text(operands.get('key'))} map {data if isinstance(data, str) else '{ ... }'}"
        return f"{op} ..."  # a hash, a number generator: their name says enough here
    return json.dumps(value, separators=(",", ":"))[:60]


def listed() -> dict:
    """The network namespace's ruleset, every table's: rules with their handles, without set
    elements (100,000 of them would cost megabytes for nothing here)."""
    import nftables  # Debian's python3-nftables; imported here so the pure part needs none

    nft = nftables.Nftables()
    for option in (nft.set_json_output, nft.set_handle_output, nft.set_terse_output, nft.set_stateless_output):
        option(True)
    rc, output, error = nft.json_cmd({"nftables": [{"list": {"ruleset": None}}]})
    if rc != 0:
        raise NftablesError(f"nftables could not list the ruleset: {error.strip() or rc}")
    return output or {}


def find(settings) -> list[MarkWriter]:
    """The rules of this network namespace, outside ramfw's table, that may change the TLS
    check's mark bits (``settings``: the enforcement settings)."""
    return mark_writers(listed(), settings.tls_mark_mask, settings.table)
