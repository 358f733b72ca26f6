"""When the policy URL is polled (issue #12): jitter, backoff, Retry-After, staleness — pure,
with the random draw and the time as parameters."""

import random
import statistics

from ramfw.policy import schedule


def test_a_fleet_started_together_spreads_over_the_interval():
    """Issue #12: every VM started from one image polled in lockstep every 300 s."""
    rng = random.Random(1)
    firsts = [schedule.first_delay(300, rng.random()) for _ in range(10_000)]
    assert min(firsts) >= schedule.MIN_DELAY and max(firsts) <= 300
    # uniform over the interval: each 30 s slice gets about a tenth
    counts = [sum(1 for f in firsts if i * 30 <= f < (i + 1) * 30) for i in range(10)]
    assert all(900 < c < 1100 for c in counts), counts
    assert 140 < statistics.mean(firsts) < 160


def test_each_later_poll_is_the_interval_plus_or_minus_the_jitter():
    assert schedule.next_delay(300, 0.1, 0.0) == 270
    assert schedule.next_delay(300, 0.1, 0.5) == 300
    assert abs(schedule.next_delay(300, 0.1, 0.999999) - 330) < 0.01
    assert schedule.next_delay(300, 0.0, 0.9) == 300
    rng = random.Random(2)
    delays = [schedule.next_delay(300, 0.1, rng.random()) for _ in range(10_000)]
    assert 270 <= min(delays) < 272 and 328 < max(delays) <= 330
    assert statistics.pstdev(delays) > 15  # uniform: 60 / sqrt(12) = 17.3


def test_failures_back_off_exponentially_up_to_the_cap():
    got = [schedule.next_delay(60, 0.0, 0.5, failures=n, max_backoff=600) for n in range(7)]
    assert got == [60, 60, 120, 240, 480, 600, 600]
    # the cap is never below the interval
    assert schedule.next_delay(900, 0.0, 0.5, failures=5, max_backoff=600) == 900


def test_retry_after_is_honoured_up_to_the_cap():
    assert schedule.next_delay(60, 0.0, 0.5, failures=1, retry_after=500) == 500
    assert schedule.next_delay(60, 0.0, 0.5, failures=1, retry_after=10) == 60
    assert schedule.next_delay(60, 0.0, 0.5, failures=1, retry_after=99_999, max_backoff=3600) == 3600


def test_retry_after_seconds_or_http_date():
    now = 1_800_000_000.0
    assert schedule.retry_after("120", now) == 120
    date = "Fri, 15 Jan 2027 08:02:00 GMT"
    base = 1800000120.0  # that date as a Unix time
    assert schedule.retry_after(date, 0) == base
    assert schedule.retry_after(date, base - 90) == 90
    assert schedule.retry_after(date, base + 90) == 0
    assert schedule.retry_after("soon", now) is None and schedule.retry_after(None, now) is None


def test_staleness_turns_red_after_the_maximum():
    assert schedule.staleness(1000.0, 1000.0 + 86400, 86400) == ""
    assert "has not answered for 86401 s" in schedule.staleness(1000.0, 1000.0 + 86401, 86400)
    assert "never answered" in schedule.staleness(None, 5.0, 86400)
    assert schedule.staleness(None, 5.0, 0) == ""
