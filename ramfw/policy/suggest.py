"""A policy from what was seen: audit mode's refusals turned into an allowlist.

Only exact host names are added, never a wildcard: what the clients were seen to need, not
what a domain might also serve (``*.cloudfront.net`` would open every CloudFront customer).
A host a registry profile names as a registry's redirect domain is listed with that
registry; a host under a shared-hosting suffix is added, exactly, with a warning; addresses
no reply named cannot be allowlisted and are said so.
"""

from __future__ import annotations

from . import Policy, hosting, profiles
from .names import Matcher, Pattern, parse_entry


def suggest(policy: Policy, refused: dict[str, dict]) -> tuple[dict, list[str], list[str]]:
    """(the new policy's data, the entries added, notes for the admin). ``refused`` is
    ``seen.Seen.refused``: host name (or "address <a>") -> count, ports, ..."""
    notes: list[str] = []
    unnamed = sorted(key.split(" ", 1)[1] for key in refused if key.startswith("address "))
    if unnamed:
        notes.append(f"{len(unnamed)} refused address(es) no trusted reply named cannot be allowlisted: "
                     + ", ".join(unnamed[:10]) + (" ..." if len(unnamed) > 10 else ""))
    added: list[str] = []
    for host in sorted(h for h in refused if not h.startswith("address ")):
        try:
            entry = parse_entry(host)
        except ValueError as err:
            notes.append(f"{host!r} is not a host name an entry can hold ({err}): left out")
            continue
        if policy.matcher.match(entry.pattern.domain) is None:
            added.append(entry.pattern.to_text())
            shared = hosting.shared(entry.pattern)
            parent = entry.pattern.domain.partition(".")[2]
            if shared:
                notes.append(f"{host}: {shared}; only this exact host is suggested")
            elif parent and hosting.shared(Pattern(parent)):
                notes.append(f"{host} is one tenant of {parent}, where anyone can host: only this exact host is "
                             "suggested, never *." + parent)
    everything = [r.pattern for r in policy.registries] + [parse_entry(a).pattern for a in added]
    for host in added:
        for profile in profiles.PROFILES:
            for registry in everything:
                needed = profile.needed(registry.domain)
                if any(parse_entry(n).pattern.domain == host or _covers(n, host) for n in needed):
                    notes.append(f"{host}: {profile.name}'s redirect domain for {registry.to_text()}")
    for gap in profiles.gaps(everything, Matcher(everything)):
        notes.append(f"not seen, but the profiles say: {gap.to_text()}")
    return _data(policy, [r.address for r in policy.registries] + added), added, notes


def _covers(needed: str, host: str) -> bool:
    return needed.startswith("*.") and host.endswith(needed[1:])


def _data(policy: Policy, addresses: list[str]) -> dict:
    access = {"enabled": True, "allowDockerHub": policy.allow_docker_hub,
              "registries": [{"address": address} for address in addresses]}
    data: dict = {"organizations": [{"name": policy.organization, "registryAccess": access}]}
    if policy.version:
        data["version"] = policy.version + 1  # a published policy's version must go up
    return data


__all__ = ["suggest"]
