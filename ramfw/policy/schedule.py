"""When to poll a policy URL next (pure: the random draw and the time are parameters).

A fleet started from one image must not poll in lockstep, and must not hammer an origin
that fails: the first poll after start comes at a random phase of the interval, every later
one after the interval times 1 +/- ``jitter``; consecutive failures double the wait up to
``max_backoff``; an origin's ``Retry-After`` is honoured (up to ``max_backoff``, so a
misconfigured origin cannot silence the polls for good).
"""

from __future__ import annotations

import email.utils

MIN_DELAY = 1.0


def first_delay(interval: float, u: float) -> float:
    """After start-up (which fetched already): a random phase in the interval, ``u`` in [0, 1)."""
    return max(MIN_DELAY, interval * u)


def next_delay(interval: float, jitter: float, u: float, failures: int = 0, max_backoff: float = 3600.0,
               retry_after: float | None = None) -> float:
    """Seconds until the next poll. ``failures``: consecutive polls that got no answer (or an
    HTTP error); ``u`` in [0, 1); ``retry_after``: seconds the origin asked for."""
    cap = max(max_backoff, interval)
    base = interval if failures <= 0 else min(cap, interval * 2.0 ** min(failures - 1, 40))  # no overflow
    delay = base * (1.0 + jitter * (2.0 * u - 1.0))
    if retry_after is not None:
        delay = max(delay, min(retry_after, cap))
    return max(MIN_DELAY, delay)


def retry_after(value: str | None, now: float) -> float | None:
    """``Retry-After``: seconds, or an HTTP date; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment is None or moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now)


def staleness(checked_at: float | None, now: float, max_staleness: float) -> str:
    """Why a URL source is stale (status turns red), or ""."""
    if not max_staleness:
        return ""
    if checked_at is None:
        return "the policy source has never answered: the policy in force may be out of date"
    if now - checked_at > max_staleness:
        return (f"the policy source has not answered for {int(now - checked_at)} s (policy.max_staleness "
                f"{int(max_staleness)} s): the policy in force may be out of date")
    return ""
