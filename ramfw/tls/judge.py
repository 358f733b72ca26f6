"""A server name against the allowlist, and against what its destination was learned for.

The allowlist's grammar is the DNS entries' own (``policy.names``): ``x.com`` covers ``x.com``
and its subdomains, label-aligned; ``*.x.com`` its subdomains only. A name the allowlist allows
is not enough: the address it goes to must have been learned (from a held DNS reply) for a name
under the same entry. An edge that serves many tenants was learned for one of them; a ClientHello
naming another tenant's host at that address is refused, even when that host is also allowed
under another entry, since that entry's DNS never pointed there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from ..policy.names import Pattern

EntryOf = Callable[[str], Pattern | None]  # ``Policy.allows``


@dataclass(frozen=True)
class Verdict:
    allow: bool
    name: str  # what the client asked for ("" when it named nothing)
    message: str = ""  # a refusal, as the block log says it
    reason: str = ""  # a refusal's, as the block event's ``reason`` says it (a stable word)


def refused_unread(address: str, reason: str) -> Verdict:
    """A first flight that names nothing ramfw can check."""
    return Verdict(False, "", f"registry access to {address} is not allowed: a TLS first flight that cannot be "
                              f"checked ({reason})", "tls_unreadable")


def refused_share(address: str, reason: str) -> Verdict:
    """A new flow of a client whose share of the check is used up (``flows.SHARE_LIMITS``)."""
    return Verdict(False, "", f"registry access to {address} is not allowed: {reason} (its share of the TLS "
                              "check)", "share_exceeded")


def judge(name: str, address: str, entry_of: EntryOf, learned_for: Iterable[str]) -> Verdict:
    """A ClientHello's server name ``name`` sent to ``address``, which was learned for the
    names ``learned_for`` (unexpired)."""
    entry = entry_of(name)
    if entry is None:
        return Verdict(False, name, f"registry access to {name} is not allowed (its TLS server name, at {address})",
                       "not_allowlisted")
    names = sorted(set(learned_for))
    if any(entry_of(other) == entry for other in names):
        return Verdict(True, name)
    why = f"learned for {', '.join(names[:3])}" if names else "not learned for any name"
    return Verdict(False, name, f"registry access to {name} at {address} is not allowed: {address} was {why}, "
                                f"not for a name under {entry.to_text()}", "server_name_not_learned_there")


def judge_connect(name: str, address: str, entry_of: EntryOf) -> Verdict:
    """A CONNECT request's host, through the proxy at ``address`` (which resolves it itself)."""
    if entry_of(name) is None:
        return Verdict(False, name, f"registry access to {name} is not allowed (CONNECT through the proxy {address})",
                       "not_allowlisted")
    return Verdict(True, name)


def judge_tunnel(name: str, connect: str, address: str, entry_of: EntryOf) -> Verdict:
    """The ClientHello sent through a CONNECT tunnel to ``connect``: its server name must fall
    under the same entry as the CONNECT host."""
    entry = entry_of(name)
    if entry is not None and entry == entry_of(connect):
        return Verdict(True, name)
    return Verdict(False, name, f"registry access to {name} is not allowed (its TLS server name, through a CONNECT "
                                f"tunnel to {connect} at the proxy {address})", "tunnel_not_under_connect_entry")


class Addresses:
    """Which names each learned address was learned for, and until when: the allowed sets'
    elements as the daemon programmed them. Bounded: past ``cap`` pairs, the expired go first,
    then the oldest-learned."""

    def __init__(self, cap: int = 200_000):
        self.cap = cap
        self._names: dict[str, dict[str, float]] = {}
        self._pairs = 0

    def add(self, address: str, name: str, expiry: float, now: float) -> None:
        names = self._names.setdefault(address, {})
        if name not in names:
            self._pairs += 1
        names[name] = max(expiry, names.get(name, 0.0))
        if self._pairs > self.cap:
            self.sweep(now)
            while self._pairs > self.cap and self._names:
                self._pairs -= len(self._names.pop(next(iter(self._names))))

    def names(self, address: str, now: float) -> list[str]:
        return [name for name, expiry in self._names.get(address, {}).items() if expiry > now]

    def sweep(self, now: float) -> None:
        for address in list(self._names):
            names = self._names[address]
            for name in [n for n, expiry in names.items() if expiry <= now]:
                del names[name]
                self._pairs -= 1
            if not names:
                del self._names[address]

    def __len__(self) -> int:
        return self._pairs
