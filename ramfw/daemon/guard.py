"""Tamper: detect at once, repair, say who (``kernel.tamper`` reads the notifications).

Root in the VM can always remove ramfw (docs/design.md, the threat model); what the daemon
can do is notice, put everything back and say who did it. A change another process commits to
ramfw's table (``nft flush ruleset`` from Debian's nftables service, a provisioning script, a
hand) is announced by the kernel as it is committed: the daemon applies the whole table again,
sets the allowed sets' elements back to what it learned (an element added by hand is gone with
it), and logs a WARNING naming the process. Lost notifications and a verification every few
seconds (the chains' rule counts and the sets against what was applied) back it up.
"""

from __future__ import annotations

import logging
import time

from ..errors import RamfwError
from ..kernel.tamper import Change, TableWatch
from ..snoop.snooper import Element
from . import logs
from .blocks import Throttle

VERIFY_EVERY = 5.0  # seconds between two full verifications


class Guard:
    def __init__(self, daemon):
        self.daemon = daemon
        self.watch = TableWatch(daemon.config.enforcement.table)
        self.repairs: list[dict] = []  # for status: when, who, what differed
        self._next_verify = 0.0
        self._log = Throttle()  # a process that changes the table again and again: a line per 10 s

    def on_notifications(self) -> None:
        """In the loop: the notifications waiting; repair if someone else changed the table, or
        if notifications were lost (what they said is unknown, so everything is put back)."""
        changes = self.watch.receive()
        if changes:
            self.repair(next((c for c in reversed(changes) if c.pid), changes[-1]), self.daemon.table.verify())

    def verify(self) -> None:
        """In housekeeping, every VERIFY_EVERY seconds: the chains' rules, the sets, the small
        sets' elements against what the daemon last wrote."""
        if time.monotonic() < self._next_verify or not self.daemon.policy.enabled:
            return
        self._next_verify = time.monotonic() + VERIFY_EVERY
        differences = self.daemon.table.verify()
        if differences:
            self.repair(Change(0, "unknown: found by the periodic verification"), differences)

    def repair(self, cause: Change, differences: list[str]) -> None:
        """Apply the whole table again (its rules, the resolvers and container bridges sets) and
        set the allowed sets to what was learned: whatever was changed, nothing else is left."""
        daemon = self.daemon
        if not daemon.policy.enabled:
            return
        self._log.log(logging.WARNING, cause.process, f"ramfw's table was changed by {cause}"
                      + (f" ({'; '.join(differences)})" if differences else "") + ": putting it back",
                      logs.event("tamper_repair", by=str(cause), differences=differences))
        try:
            self._put_back(rebuild=False)
            left = daemon.table.verify()
        except RamfwError as err:
            left = [str(err)]
        if left:  # what an in-place apply cannot undo (a set redefined, a chain added): start afresh
            self._put_back(rebuild=True)
            left = daemon.table.verify()
        self.repairs = (self.repairs + [{"at": time.time(), "by": str(cause), "found": differences}])[-20:]
        if left:
            daemon._error(f"ramfw's table could not be put back: {'; '.join(left)}")

    def _put_back(self, rebuild: bool) -> None:
        daemon = self.daemon
        daemon.apply(rebuild)
        now = time.time()
        daemon.table.replace_allowed([Element(address, int(expiry - now), name)
                                      for name, addresses in daemon.snooper.learned.items()
                                      for address, expiry in addresses.items() if expiry - now >= 1])

    def close(self) -> None:
        self.watch.close()
