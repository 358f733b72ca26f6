"""The organization policy: which registries the organization allows.

This package is the policy's room: entries and matching (``names``), the registries' redirect
domains (``profiles``), and where the policy comes from (``source``: a file, a URL, the cache).
The file has Docker RAM's shape. It is validated whole at load: any broken rule rejects the
file, with a message naming the entry and the rule, and the policy already in force stays.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass, field
from pathlib import Path

from . import hosting, profiles
from ..errors import PolicyError
from .names import InvalidName, Matcher, Pattern, parse_entry

DEFAULT_MAX_REGISTRIES = 100

_TOP_KEYS = {"organizations", "version", "expires"}
_ORG_KEYS = {"name", "registryAccess"}
_ACCESS_KEYS = {"enabled", "allowDockerHub", "registries"}
_REGISTRY_KEYS = {"address", "nickname"}


@dataclass(frozen=True)
class Registry:
    address: str
    nickname: str
    pattern: Pattern


@dataclass(frozen=True)
class Policy:
    """The first organization's registry access policy, normalised."""

    organization: str
    enabled: bool
    allow_docker_hub: bool
    registries: tuple[Registry, ...]
    notes: tuple[str, ...] = ()
    version: int = 0  # monotonic, set by whoever publishes the policy; 0: unversioned
    expires: float | None = None  # a Unix time after which the policy is refused as new
    signer: str = ""  # the minisign key id that signed it ("": not verified)
    matcher: Matcher = field(repr=False, compare=False, default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.matcher is None:
            object.__setattr__(self, "matcher", Matcher(self.patterns()))

    def patterns(self) -> list[Pattern]:
        hub = [Pattern(host) for host in profiles.DOCKER_HUB_HOSTS] if self.allow_docker_hub else []
        return [registry.pattern for registry in self.registries] + hub

    def allows(self, name: str) -> Pattern | None:
        """The entry that allows the canonical host name ``name``; None if it is not allowed."""
        return self.matcher.match(name)

    def gaps(self) -> list[profiles.Gap]:
        return profiles.gaps([r.pattern for r in self.registries], self.matcher)

    def summary(self) -> dict:
        return {
            "organization": self.organization,
            "enabled": self.enabled,
            "allowDockerHub": self.allow_docker_hub,
            "registries": [r.pattern.to_text() for r in self.registries],
            "entries": len(self.matcher),
            "version": self.version,
            "expires": self.expires,
            "signer": self.signer,
        }


def _fail(where: str, rule: str) -> PolicyError:
    return PolicyError(f"{where}: {rule}")


def _expect(value: object, kind: type, where: str, what: str) -> None:
    if not isinstance(value, kind):
        raise _fail(where, f"{what} must be {_KIND_NAMES[kind]}, not {_type_name(value)}")


_KIND_NAMES = {dict: "an object", list: "a list", str: "a string", bool: "true or false"}


def _type_name(value: object) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _check_keys(obj: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise _fail(where, f"unknown field {unknown[0]!r}; the fields here are {', '.join(sorted(allowed))}")


def from_data(data: object, max_registries: int = DEFAULT_MAX_REGISTRIES, source: str = "policy") -> Policy:
    """Validate a decoded policy document; raise PolicyError naming the first broken rule."""
    _expect(data, dict, source, "the policy")
    _check_keys(data, _TOP_KEYS, source)
    if "organizations" not in data:
        raise _fail(source, 'the policy needs an "organizations" list')
    orgs = data["organizations"]
    _expect(orgs, list, f"{source}: organizations", "organizations")
    if not orgs:
        raise _fail(f"{source}: organizations", "the list is empty; name at least one organization")
    notes = []
    names = []
    for index, org in enumerate(orgs):
        where = f"{source}: organizations[{index}]"
        _expect(org, dict, where, "an organization")
        _check_keys(org, _ORG_KEYS, where)
        name = org.get("name", f"organization #{index + 1}")
        _expect(name, str, f"{where}.name", "the name")
        names.append(name)
    if len(orgs) > 1:
        notes.append(
            f"only the first organization ({names[0]}) is enforced; ignored: {', '.join(names[1:])}"
        )
    # Every organization is validated, so a broken file is rejected whatever its order.
    parsed = [_organization(org, names[i], f"{source}: organizations[{i}]", max_registries)
              for i, org in enumerate(orgs)]
    enabled, hub, registries, org_notes = parsed[0]
    version, expires = _freshness(data, source)
    return Policy(names[0], enabled, hub, tuple(registries), tuple(notes + org_notes), version, expires)


def _freshness(data: dict, source: str) -> tuple[int, float | None]:
    """``version`` (a positive integer, raised with every new policy: ramfw refuses one older
    than it has accepted) and ``expires`` (RFC 3339 with a time zone, ``2026-12-31T00:00:00Z``)."""
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 2 ** 63:
        if "version" in data:
            raise _fail(f"{source}: version", f"must be a positive whole number, not {version!r}")
    expires = data.get("expires")
    if expires is None:
        return version, None
    _expect(expires, str, f"{source}: expires", "expires")
    try:
        when = datetime.datetime.fromisoformat(expires.replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise _fail(f"{source}: expires", f"{expires!r} is not a time with a time zone, like 2026-12-31T00:00:00Z")
    return version, when.timestamp()


def _organization(org: dict, name: str, where: str, max_registries: int):
    if "registryAccess" not in org:
        raise _fail(where, 'an organization needs a "registryAccess" object')
    access = org["registryAccess"]
    where = f"{where}.registryAccess"
    _expect(access, dict, where, "registryAccess")
    _check_keys(access, _ACCESS_KEYS, where)
    enabled = access.get("enabled", True)
    _expect(enabled, bool, f"{where}.enabled", "enabled")
    hub = access.get("allowDockerHub", True)
    _expect(hub, bool, f"{where}.allowDockerHub", "allowDockerHub")
    entries = access.get("registries", [])
    _expect(entries, list, f"{where}.registries", "registries")
    if len(entries) > max_registries:
        raise _fail(
            f"{where}.registries",
            f"{len(entries)} registries, more than the cap of {max_registries} "
            "(raise policy.max_registries in the local configuration)",
        )
    registries: list[Registry] = []
    notes: list[str] = []
    seen: dict[Pattern, int] = {}
    for index, entry in enumerate(entries):
        here = f"{where}.registries[{index}]"
        _expect(entry, dict, here, "a registry")
        _check_keys(entry, _REGISTRY_KEYS, here)
        if "address" not in entry:
            raise _fail(here, 'a registry needs an "address"')
        address = entry["address"]
        nickname = entry.get("nickname", "")
        _expect(nickname, str, f"{here}.nickname", "the nickname")
        try:
            parsed = parse_entry(address)
        except InvalidName as err:
            raise _fail(f"{here} {address!r}" if isinstance(address, str) else here, str(err)) from None
        if parsed.pattern in seen:
            raise _fail(
                f"{here} {address!r}",
                f"duplicate of registries[{seen[parsed.pattern]}]; list each registry once",
            )
        seen[parsed.pattern] = index
        if parsed.port is not None:
            notes.append(
                f"{name}: {address}: port {parsed.port} ignored, filtering is by host name"
            )
        registries.append(Registry(address, nickname, parsed.pattern))
    return enabled, hub, registries, notes


def from_text(text: str, max_registries: int = DEFAULT_MAX_REGISTRIES, source: str = "policy") -> Policy:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise _fail(source, f"not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    return from_data(data, max_registries, source)


def from_file(path: str | Path, max_registries: int = DEFAULT_MAX_REGISTRIES) -> Policy:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise PolicyError(f"{path}: cannot read the policy: {getattr(err, 'strerror', None) or err}") from None
    return from_text(text, max_registries, str(path))


def from_summary(summary: dict) -> Policy:
    """The policy a ``Policy.summary()`` describes (what the daemon's status and the record of
    ``up`` carry), for matching: the entries in force, the same matcher."""
    registries = tuple(Registry(text, "", parse_entry(text).pattern) for text in summary.get("registries", []))
    return Policy(summary.get("organization", ""), bool(summary.get("enabled", True)),
                  bool(summary.get("allowDockerHub", True)), registries, version=summary.get("version") or 0,
                  expires=summary.get("expires"), signer=summary.get("signer") or "")


def default() -> Policy:
    """With no policy configured: Docker Hub only, as Docker RAM starts."""
    return Policy("default", True, True, ())


def lint(policy: Policy) -> list[str]:
    """Warnings for a valid policy: ignored parts, redirect domains missing, redundant entries."""
    warnings = list(policy.notes)
    if not policy.enabled:
        warnings.append(f"{policy.organization}: registry access is not enabled, nothing is restricted")
    warnings.extend(gap.to_text() for gap in policy.gaps())
    for registry in policy.registries:
        wider = policy.matcher.wider(registry.pattern)
        if wider is not None:
            warnings.append(f"{registry.address} is already allowed by {wider.to_text()}")
        shared = hosting.shared(registry.pattern)
        if shared:
            warnings.append(shared)
    if not hosting.available():
        warnings.append(f"shared hosting is not checked: the Public Suffix List ({hosting.PSL_FILE}) or "
                        "python3-publicsuffix2 is missing (apt-get install publicsuffix python3-publicsuffix2)")
    return warnings
