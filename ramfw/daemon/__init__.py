"""The root daemon: holds DNS replies, programs the allowed sets, names what it blocks.

``loop`` is the daemon and its handlers; ``control`` the control protocol (server and client);
``status`` the status document; ``blocks`` what is said about blocked connections; ``engine``
engine scope's attachment.
"""

from __future__ import annotations

import logging

from ..config import Config

log = logging.getLogger("ramfw")


def main(config: Config, policy_path: str | None = None) -> int:
    from .loop import Daemon

    logging.basicConfig(level=logging.INFO, format="ramfw[%(process)d]: %(levelname)s: %(message)s")
    daemon = Daemon(config, policy_path)
    try:
        daemon.start()
    except BaseException:
        daemon.close()
        raise
    daemon.run()
    log.info("ramfw daemon stopped; enforcement stays in place until `ramfw down`")
    return 0
