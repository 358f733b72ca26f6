"""The policy URL's poller: a thread beside the loop, polling when ``policy.schedule`` says.

One poll at a time (a lock): the background polls and ``ramfw reload``, which fetches in the
control client's thread before the loop applies what it got — the loop itself never waits
for the network. A new accepted policy wakes the loop to reload it; the reload that follows
does not poll again (that was the tight loop against an origin without ETag: every 200 a
reload, every reload a poll).
"""

from __future__ import annotations

import random
import threading
import time
from typing import Callable

from ..policy import schedule, trust
from ..policy.source import UrlSource


def describe(policy) -> str:
    """``acme, version 7 signed by 4468A2580D9A982B``: what a reload applied."""
    version = f"version {policy.version}" if policy.version else "unversioned"
    return f"{policy.organization}, {version}, " + (f"signed by {policy.signer}" if policy.signer else "unsigned")


def refused(fetched, policy) -> str:
    """Why ``ramfw reload`` applies nothing: its fetch (``Poller.fetch_now``, or what it raised)
    got no policy to apply. "" when it did, or when there was no fetch (a file source)."""
    if fetched is None or (not isinstance(fetched, BaseException) and fetched[0]):
        return ""
    why = fetched if isinstance(fetched, BaseException) else fetched[1]
    return f"reload refused, the policy in force stays ({describe(policy)}): {why}"


START_FETCH_SECONDS = 15.0  # what the daemon's start waits for the policy URL at most


def fetch_at_start(source: UrlSource, log) -> None:
    """The start-up fetch, before the table exists: bounded in time, and whatever it meets
    (a reset, a trickling origin, an answer no one can read) leaves the cached policy, or Docker
    Hub only, to be enforced; the poller tries again. The daemon must never stop here: a VM
    would boot with no table."""
    def attempt():
        try:
            source.refresh()
        except Exception as err:  # noqa: BLE001 - see above
            source.last_error = f"policy source: the start-up fetch failed, the cached policy stays: {err!r}"

    worker = threading.Thread(target=attempt, name="policy-start-fetch", daemon=True)
    worker.start()
    worker.join(START_FETCH_SECONDS)
    if worker.is_alive():
        source.last_error = f"policy source: no answer within {START_FETCH_SECONDS:g} s at start, the cached policy stays"
    if source.last_error:
        log.warning("%s", source.last_error)


class Poller:
    def __init__(self, source: UrlSource, on_new: Callable[[], None], on_error: Callable[[str], None],
                 rand: Callable[[], float] | None = None):
        self.source, self.on_new, self.on_error = source, on_new, on_error
        self.settings = source.settings
        self.rand = rand or random.SystemRandom().random  # per VM: never seeded alike by one image
        self.lock = threading.Lock()
        self.failures = 0
        self.next_poll: float | None = None  # Unix time
        self.stopping = False
        self._wake = threading.Event()
        self._said = ""

    def start(self) -> None:
        threading.Thread(target=self._run, name="policy-poller", daemon=True).start()

    def poll_soon(self) -> None:
        """SIGHUP: poll now, in the poller's thread (the loop does not wait for it)."""
        self._wake.set()

    def close(self) -> None:
        self.stopping = True
        self._wake.set()

    def _run(self) -> None:
        delay = schedule.first_delay(self.settings.refresh_interval, self.rand())
        while not self.stopping:
            self.next_poll = time.time() + delay
            self._wake.wait(delay)
            self._wake.clear()
            if self.stopping:
                return
            if self.poll():
                self.on_new()
            delay = self.delay()

    def delay(self) -> float:
        s = self.settings
        return schedule.next_delay(s.refresh_interval, s.refresh_jitter, self.rand(), self.failures,
                                   s.max_backoff, self.source.retry_after)

    def poll(self) -> bool:
        """One poll; True when a new policy was accepted (the caller reloads it). Whatever a poll
        meets is a failed poll, never the poller's end: it keeps polling (and backing off)."""
        with self.lock:
            try:
                changed = self.source.refresh()
            except Exception as err:  # noqa: BLE001 - an origin's answer must not stop the polls
                changed, self.source.failed = False, True
                self.source.last_error = f"policy source: polling failed, the cached policy stays: {err!r}"
            self.failures = self.failures + 1 if self.source.failed else 0
        if self.source.last_error and self.source.last_error != self._said:
            self.on_error(self.source.last_error)  # once per new error, not once per poll
        self._said = self.source.last_error
        return changed

    def fetch_now(self) -> tuple[bool, str]:
        """For ``ramfw reload``: poll now, in the caller's thread. (ok, what happened)."""
        self.poll()
        return not self.source.last_error, self.source.outcome

    def state(self, now: float) -> dict:
        """Status fields: when the origin last answered, the age of that, the next poll."""
        checked = self.source.checked_at
        return {"fetched_at": checked, "age": None if checked is None else int(now - checked),
                "next_poll": self.next_poll, "next_poll_in": None if self.next_poll is None else
                max(0, int(self.next_poll - now)), "last_poll": self.source.outcome,
                "failures": self.failures, "stale": self.source.stale(now)}


def status_fields(daemon, now: float) -> dict:
    """What status adds to its ``policy`` section: when the policy was fetched, its age, the
    next poll, and ``stale``: why status is red (expired, or no answer for max_staleness)."""
    poller = getattr(daemon, "poller", None)
    fields = poller.state(now) if poller is not None else {
        "fetched_at": daemon.policy_loaded, "age": int(now - daemon.policy_loaded), "next_poll": None, "stale": ""}
    fields["stale"] = "; ".join(filter(None, (trust.expired(daemon.policy, now), fields["stale"])))
    return fields
