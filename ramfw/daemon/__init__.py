"""The root daemon: holds DNS replies, programs the allowed sets, names what it blocks.

``loop`` is the daemon and its handlers; ``control`` the control protocol (server and client);
``status`` the status document; ``blocks`` what is said about blocked connections; ``engine``
engine scope's attachment; ``guard`` tamper detection and repair.
"""

from __future__ import annotations

import logging
import os
import socket

from ..config import Config

log = logging.getLogger("ramfw")


def main(config: Config, policy_path: str | None = None, log_format: str | None = None) -> int:
    from . import logs
    from .loop import Daemon

    d = config.daemon
    logs.setup(log_format or d.log_format, d.log_file, d.log_max_bytes)
    daemon = Daemon(config, policy_path)
    try:
        daemon.start()
    except BaseException:
        daemon.close()
        raise
    notify_ready(f"enforcing {daemon.policy.organization}, scope {', '.join(daemon.scope) or 'none'}")
    daemon.run()
    log.info("ramfw daemon stopped; enforcement stays in place until `ramfw down`", extra=logs.event("stopped"))
    return 0


def notify_ready(status: str) -> None:
    """systemd's Type=notify: tell the service manager the ruleset is in force (only then do
    units ordered after ramfw, such as docker.service, start). Nothing without NOTIFY_SOCKET."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(f"READY=1\nSTATUS={status}\n".encode(), address)
        except OSError as err:
            log.warning("could not tell systemd the daemon is ready (%s): %s", os.environ["NOTIFY_SOCKET"], err)
