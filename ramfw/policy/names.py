"""Host names: normalising allowlist entries once, and matching DNS names against them.

An entry ``example.com`` allows the name and every subdomain (label-aligned:
``badexample.com`` does not match); ``*.example.com`` allows subdomains only. Matching walks
the labels of the queried name and looks each suffix up in a dict, so its cost depends on the
length of the name, never on the number of entries.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable

import idna

MAX_NAME = 253
MAX_LABEL = 63
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\Z")
_HOST_PORT = re.compile(r"(?P<host>[^:\[\]]+):(?P<port>[0-9]+)\Z")


class InvalidName(ValueError):
    """An entry is not a valid host name or domain; the message states the rule."""


@dataclass(frozen=True)
class Pattern:
    """A normalised allowlist entry: ``domain`` in ASCII lower case, without trailing dot."""

    domain: str
    subdomains_only: bool = False

    def to_text(self) -> str:
        return f"*.{self.domain}" if self.subdomains_only else self.domain


@dataclass(frozen=True)
class ParsedEntry:
    pattern: Pattern
    port: int | None


def _reject(rule: str) -> InvalidName:
    return InvalidName(rule)


def parse_entry(text: object) -> ParsedEntry:
    """Parse one registry address as written in a policy; raise InvalidName naming the rule."""
    if not isinstance(text, str):
        raise _reject(f"registry addresses are strings, not {type(text).__name__}")
    value = text.strip()
    if not value:
        raise _reject("registry addresses must not be empty")
    if value != text:
        raise _reject("registry addresses must not have leading or trailing white space")
    if "://" in value:
        raise _reject("registry addresses are host names or domains, not URLs: drop the scheme")
    if "/" in value:
        raise _reject("registry addresses are host names or domains: drop the path")
    if _is_ip(value):
        raise _reject(
            "registry addresses are host names or domains, not IP addresses "
            "(filtering is by host name, as in Docker RAM)"
        )
    port = None
    host_port = _HOST_PORT.match(value)
    if host_port:
        port = int(host_port["port"])
        if not 1 <= port <= 65535:
            raise _reject(f"port {port} is out of range 1-65535")
        value = host_port["host"]
        if _is_ip(value):
            raise _reject(
                "registry addresses are host names or domains, not IP addresses "
                "(filtering is by host name, as in Docker RAM)"
            )
    subdomains_only = value.startswith("*.")
    if subdomains_only:
        value = value[2:]
    if "*" in value:
        raise _reject("a wildcard is allowed only as the whole first label, as in *.example.com")
    domain = normalise_domain(value)
    if "." not in domain and subdomains_only:
        raise _reject("*.<top-level domain> would allow a whole top-level domain")
    return ParsedEntry(Pattern(domain, subdomains_only), port)


def normalise_domain(value: str) -> str:
    """Lower case, trailing dot removed, IDNA-encoded, every label checked."""
    if value.endswith("."):
        value = value[:-1]
    if not value:
        raise _reject("registry addresses must not be empty")
    if not value.isascii():
        try:
            value = idna.encode(value, uts46=True).decode("ascii")
        except idna.IDNAError as err:
            raise _reject(f"not a valid internationalized domain name ({err})") from None
    value = value.lower()
    if len(value) > MAX_NAME:
        raise _reject(f"names are at most {MAX_NAME} characters long, this one has {len(value)}")
    labels = value.split(".")
    for label in labels:
        if not label:
            raise _reject("empty label (two dots in a row, or a leading dot)")
        if len(label) > MAX_LABEL:
            raise _reject(f'label "{label[:20]}..." is longer than {MAX_LABEL} characters')
        if not _LDH_LABEL.match(label):
            raise _reject(
                f'label "{label}" has invalid characters: use letters, digits and inner hyphens'
            )
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError as err:
                raise _reject(f'label "{label}" is not valid punycode ({err})') from None
    if labels[-1].isdigit():
        raise _reject("the last label is numeric: this looks like an IP address, not a name")
    return value


def is_address(host: str) -> bool:
    """An IP address, which no policy entry can allow (a registry host, a TLS server name)."""
    if ":" not in host and not host.replace(".", "").isdigit():  # a host name: no parse (and no raise)
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_ip(value: str) -> bool:
    candidate = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        ipaddress.ip_address(candidate)
    except ValueError:
        return bool(re.match(r"\[[0-9a-fA-F:.]+\](:[0-9]+)?\Z", value))
    return True


def canonical(name: str) -> str:
    """The form DNS names are compared in: lower case, no trailing dot."""
    name = name.lower()
    return name[:-1] if name.endswith(".") else name


class Matcher:
    """Answers which allowlist entry, if any, allows a host name."""

    def __init__(self, patterns: Iterable[Pattern]):
        self._domains: dict[str, Pattern] = {}
        self._wildcards: dict[str, Pattern] = {}
        for pattern in patterns:
            table = self._wildcards if pattern.subdomains_only else self._domains
            table.setdefault(pattern.domain, pattern)

    def __len__(self) -> int:
        return len(self._domains) + len(self._wildcards)

    def match(self, name: str) -> Pattern | None:
        """The entry that allows ``name`` (already canonical), or None.

        A DNS name read from the wire is in dnspython's text form (``snoop.wire``), where an
        escape stands for a byte no host name has: ``\\.`` a dot inside a label (no label
        boundary), ``\\DDD`` a space or a non-ASCII byte, ``\\\\`` a backslash. Such a name
        is never allowed, not even under an entry.
        """
        if "\\" in name:
            return None
        found = self._domains.get(name)
        if found is not None:
            return found
        dot = name.find(".")
        while dot >= 0:
            suffix = name[dot + 1 :]
            found = self._domains.get(suffix) or self._wildcards.get(suffix)
            if found is not None:
                return found
            dot = name.find(".", dot + 1)
        return None

    def covers(self, pattern: Pattern) -> Pattern | None:
        """The entry that allows everything ``pattern`` allows, or None."""
        if not pattern.subdomains_only:
            return self.match(pattern.domain)
        suffix = pattern.domain
        while True:
            found = self._wildcards.get(suffix) or self._domains.get(suffix)
            if found is not None:
                return found
            dot = suffix.find(".")
            if dot < 0:
                return None
            suffix = suffix[dot + 1 :]

    def wider(self, pattern: Pattern) -> Pattern | None:
        """Another entry that allows everything ``pattern`` allows, or None."""
        if pattern.subdomains_only:
            found = self._domains.get(pattern.domain)
            if found is not None:
                return found
        suffix = pattern.domain
        dot = suffix.find(".")
        while dot >= 0:
            suffix = suffix[dot + 1 :]
            found = self._domains.get(suffix) or self._wildcards.get(suffix)
            if found is not None:
                return found
            dot = suffix.find(".")
        return None
