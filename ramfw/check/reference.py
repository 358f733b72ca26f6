"""Image references, parsed and normalised as the engine does (distribution's ``reference``
package: ``ParseNormalizedNamed``).

``alpine`` is ``docker.io/library/alpine:latest``; the first path component is a registry only
if it has a dot or a colon, or is ``localhost``, or has an upper-case letter (a repository
cannot); ``index.docker.io`` is ``docker.io``, whose API lives at ``registry-1.docker.io``.
Debian's python3-docker splits references too, but adds no ``library/``, validates nothing and
reads ``name:tag@digest`` as a name with a tag: so this small parser follows the grammar.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from ..errors import InvalidReference
from ..policy.names import is_address

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_LEGACY_HUB = "index.docker.io"
MAX_NAME = 255  # distribution's NameTotalLengthMax

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_PATH = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*\Z")
_DOMAIN_LABEL = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?P<host>{_DOMAIN_LABEL}(?:\.{_DOMAIN_LABEL})*|\[[0-9a-fA-F:.]+\])(?::(?P<port>[0-9]+))?\Z")
_TAG = re.compile(r"[\w][\w.-]{0,127}\Z")
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}\Z")
_IDENTIFIER = re.compile(r"[a-f0-9]{64}\Z")


@dataclass(frozen=True)
class Reference:
    """A normalised reference. ``domain`` as written (``docker.io`` for Docker Hub); ``host``
    and ``port`` where its API answers; ``digest`` wins over ``tag`` when both are given, as
    in a pull."""

    domain: str
    host: str
    port: int
    repository: str
    tag: str
    digest: str = ""

    @property
    def manifest(self) -> str:
        """What the manifest is fetched by."""
        return self.digest or self.tag

    def to_text(self) -> str:
        return f"{self.domain}/{self.repository}" + (f":{self.tag}" if self.tag else "") + (
            f"@{self.digest}" if self.digest else "")

    @property
    def is_address(self) -> bool:
        """The registry is named by an IP address, which no policy entry can allow."""
        return is_address(self.host)


def _reject(text: str, rule: str) -> InvalidReference:
    return InvalidReference(f"image reference {text!r}: {rule}")


def parse(text: str) -> Reference:
    """Parse one reference as ``docker pull`` takes it; InvalidReference names the rule."""
    if not text or text != text.strip():
        raise _reject(text, "must not be empty or have white space around it")
    if "://" in text:
        raise _reject(text, "a reference names no scheme: write registry.example.com/repository:tag")
    if _IDENTIFIER.match(text):
        raise _reject(text, "a 64-character hexadecimal string is an image ID, not a name to pull")
    if len(text) > MAX_NAME + 200:
        raise _reject(text, "too long")
    rest, digest = text, ""
    if "@" in rest:
        rest, _, digest = rest.partition("@")
        if not _DIGEST.match(digest):
            raise _reject(text, f"{digest!r} is not a digest (algorithm:hex, like sha256:<64 hex digits>)")
    name, tag = rest, ""
    colon, slash = rest.rfind(":"), rest.rfind("/")
    if colon > slash:
        name, tag = rest[:colon], rest[colon + 1:]
        if not _TAG.match(tag):
            raise _reject(text, f"tag {tag!r}: letters, digits, _ . and -, at most 128, not starting with . or -")
    domain, path = _split_domain(text, name)
    if len(f"{domain}/{path}") > MAX_NAME:
        raise _reject(text, f"the name is longer than {MAX_NAME} characters")
    if not _PATH.match(path):
        raise _reject(text, "the repository is lower-case letters and digits in components separated by /, "
                            "with . _ __ or - inside a component")
    found = _DOMAIN.match(domain)
    if not found:
        raise _reject(text, f"{domain!r} is not a registry host[:port]")
    host, port = found["host"].lower(), int(found["port"] or 443)
    if host.startswith("["):
        try:
            host = str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise _reject(text, f"{found['host']!r} is not an IPv6 address") from None
    if not 0 < port < 65536:
        raise _reject(text, f"port {port} is out of range 1-65535")
    if domain == DOCKER_HUB:
        host = DOCKER_HUB_API
    return Reference(domain, host, port, path, tag or ("" if digest else "latest"), digest)


def _split_domain(text: str, name: str) -> tuple[str, str]:
    """(domain, repository): distribution's ``splitDockerDomain``."""
    first, slash, remainder = name.partition("/")
    if not slash or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        domain, remainder = DOCKER_HUB, name
    else:
        domain = first
    if not remainder:
        raise _reject(text, "no repository after the registry")
    if domain == _LEGACY_HUB:
        domain = DOCKER_HUB
    if domain == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    return domain, remainder
