"""Which DNS servers ramfw trusts: the configured ones, else the nameservers resolv.conf names.

Nothing is trusted for being well known: an address like 127.0.0.11 (Docker's embedded DNS,
which lives in each container's namespace, not the VM's) or 10.255.255.254 (WSL2's DNS
tunnel) could be bound by a local process or given to a container, and would then teach.
A loopback stub (systemd-resolved's 127.0.0.53, WSL2's tunnel) is trusted when resolv.conf
names it, which is when the VM's lookups go to it.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

RESOLV_CONF = Path("/etc/resolv.conf")


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
    """The configured resolvers; by default the nameservers resolv.conf names now."""
    return [address for address, _ in with_origins(configured, resolv_conf)]


def with_origins(configured: tuple[str, ...], resolv_conf: Path = RESOLV_CONF) -> list[tuple[str, str]]:
    """(address, where it came from) of each trusted resolver."""
    if configured:
        return [(str(ipaddress.ip_address(r)), "dns.trusted_resolvers") for r in configured]
    try:
        text = resolv_conf.read_text()
    except OSError:
        text = ""
    return [(address, str(resolv_conf)) for address in dict.fromkeys(from_resolv_conf(text))]


class Follower:
    """The default trusted set, read again when resolv.conf changes (its mtime, or the file a
    symbolic link points to); the configured set never changes."""

    def __init__(self, configured: tuple[str, ...], resolv_conf: Path = RESOLV_CONF):
        self.configured, self.path = configured, resolv_conf
        self.mtime = self._mtime()

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0

    def changed(self) -> list[str] | None:
        """The trusted set if resolv.conf changed since last asked, else None."""
        if self.configured:
            return None
        mtime = self._mtime()
        if mtime == self.mtime:
            return None
        self.mtime = mtime
        return trusted((), self.path)
