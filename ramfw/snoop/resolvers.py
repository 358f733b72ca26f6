"""Which DNS servers ramfw trusts: the ones in resolv.conf plus the well-known loopback stubs."""

from __future__ import annotations

import ipaddress
from pathlib import Path

RESOLV_CONF = Path("/etc/resolv.conf")
# systemd-resolved, Docker's embedded DNS, WSL2 DNS tunnelling (current and earlier address).
LOOPBACK_STUBS = ("127.0.0.53", "127.0.0.11", "10.255.255.254", "127.0.0.42")


def from_resolv_conf(text: str) -> list[str]:
    """The nameserver addresses in a resolv.conf, in order, malformed lines ignored."""
    found = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            address = parts[1].split("%", 1)[0]
            try:
                found.append(str(ipaddress.ip_address(address)))
            except ValueError:
                continue
    return found


def trusted(configured: tuple[str, ...], resolv_conf: Path = RESOLV_CONF) -> list[str]:
    """The configured resolvers; by default resolv.conf's nameservers and the loopback stubs."""
    if configured:
        return [str(ipaddress.ip_address(r)) for r in configured]
    try:
        text = resolv_conf.read_text()
    except OSError:
        text = ""
    return list(dict.fromkeys(from_resolv_conf(text) + list(LOOPBACK_STUBS)))
