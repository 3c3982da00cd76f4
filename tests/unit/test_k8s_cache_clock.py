"""ListWatchCache's error backoff on a Clock: exact retry times, jitter bounds, the cap, and stop.

tests/integration/test_k8s_cache.py checks over real HTTP that a rejected
token is retried without spinning; the timing lives here.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from llamad.k8s.cache import BACKOFF_INITIAL, BACKOFF_MAX, ListWatchCache
from llamad.k8s.client import ApiStatusError

PATH = "/apis/apps/v1/deployments"


class ScriptedKube:
    """Lists fail with 401 ``failures`` times, then succeed; watches stay open unless ``watch_errors`` says fail."""

    def __init__(self, clock: Clock, failures: int = 10**6, watch_errors: int = 0) -> None:
        self.clock = clock
        self.failures = failures
        self.watch_errors = watch_errors
        self.lists: list[float] = []  # when each list was attempted
        self.watches: list[float] = []
        self.open_watches: list[defer.Deferred[None]] = []

    def request(self, method: str, path: str, params: Any = None, body: Any = None,
                content_type: str = "") -> defer.Deferred[dict[str, Any]]:
        assert (method, path) == ("GET", PATH)
        self.lists.append(self.clock.seconds())
        if len(self.lists) <= self.failures:
            return defer.fail(ApiStatusError(401, "Unauthorized"))
        items = [{"metadata": {"namespace": "models", "name": "a"}}]
        return defer.succeed({"metadata": {"resourceVersion": "5"}, "items": items})

    def watch(self, path: str, rv: str, on_event: Callable[[str, dict[str, Any]], None]) -> defer.Deferred[None]:
        self.watches.append(self.clock.seconds())
        if len(self.watches) <= self.watch_errors:
            return defer.fail(ConnectionError("connection reset"))
        d: defer.Deferred[None] = defer.Deferred()
        self.open_watches.append(d)
        return d


def cache_on(kube: ScriptedKube, random: float, troubles: list[tuple[str, str]] | None = None) -> ListWatchCache:
    """The cache with a fixed jitter: each retry waits ``delay * (0.5 + 0.5 * random)``."""
    seen = troubles if troubles is not None else []
    return ListWatchCache(kube.clock, kube, PATH, random=lambda: random,  # type: ignore[arg-type]
                          on_trouble=lambda what, why: seen.append((what, why)))


STEP = 0.001


def run_for(clock: Clock, seconds: float) -> None:
    """Advance in 1 ms steps, as a reactor would: Clock schedules a retry from the moment the previous one ran,
    so one big ``advance`` would run a single retry late instead of the whole chain on time."""
    for _ in range(round(seconds / STEP)):
        clock.advance(STEP)


def retry_times(random: float, count: int) -> list[float]:
    """When attempt 1..count starts: delays from BACKOFF_INITIAL doubling to BACKOFF_MAX, scaled by the jitter."""
    times, t, delay = [0.0], 0.0, BACKOFF_INITIAL
    while len(times) < count:
        t += delay * (0.5 + 0.5 * random)
        times.append(t)
        delay = min(BACKOFF_MAX, delay * 2)
    return times


def test_the_schedule_this_file_assumes():
    assert (BACKOFF_INITIAL, BACKOFF_MAX) == (0.1, 10.0)
    assert retry_times(1.0, 10) == pytest.approx([0, 0.1, 0.3, 0.7, 1.5, 3.1, 6.3, 12.7, 22.7, 32.7])


@pytest.mark.parametrize("random", [1.0, 0.0, 0.37])
def test_errors_back_off_doubling_to_the_cap(random: float):
    clock = Clock()
    kube = ScriptedKube(clock)
    troubles: list[tuple[str, str]] = []
    cache = cache_on(kube, random, troubles)
    cache.startService()
    run_for(clock, 33)
    expected = [t for t in retry_times(random, 40) if t <= 33]
    assert kube.lists == pytest.approx(expected, abs=len(expected) * STEP)  # each retry is up to a step late
    assert cache.errors == len(expected) and not cache.synced and kube.watches == []
    assert [what for what, _ in troubles] == ["error"] * len(expected) and "401" in troubles[0][1]
    cache.stopService()


@pytest.mark.parametrize("random, errors", [(0.0, 4), (0.5, 3), (0.999, 3)])
def test_half_a_second_of_a_rejected_token_is_a_few_tries_not_a_spin(random: float, errors: int):
    """What the integration test used to count in a wall-clock window, here exact for each jitter."""
    clock = Clock()
    kube = ScriptedKube(clock)
    cache = cache_on(kube, random)
    cache.startService()
    run_for(clock, 0.5)
    assert cache.errors == len(kube.lists) == errors and not cache.synced
    cache.stopService()


def test_stop_during_backoff_cancels_the_retry():
    clock = Clock()
    kube = ScriptedKube(clock)
    cache = cache_on(kube, 1.0)
    cache.startService()
    clock.advance(0.1)
    assert len(kube.lists) == 2 and len(clock.getDelayedCalls()) == 1
    cache.stopService()
    assert clock.getDelayedCalls() == []
    clock.advance(100)
    assert len(kube.lists) == 2 and cache.errors == 2


def test_success_after_errors_syncs_and_watches():
    clock = Clock()
    kube = ScriptedKube(clock, failures=3)
    cache = cache_on(kube, 1.0)
    cache.startService()
    run_for(clock, 0.69)
    assert not cache.synced and cache.errors == 3 and kube.watches == []
    run_for(clock, 0.02)
    assert cache.synced and list(cache.objects) == [("models", "a")]
    assert kube.lists == pytest.approx([0, 0.1, 0.3, 0.7], abs=0.005) and kube.watches == [kube.lists[-1]]
    assert cache.errors == 3 and cache.lists == 1 and cache.resource_version == "5"
    clock.advance(100)
    assert len(kube.lists) == 4  # the open watch keeps it: no polling
    cache.stopService()


def test_a_failed_watch_backs_off_then_lists_again():
    clock = Clock()
    kube = ScriptedKube(clock, failures=0, watch_errors=2)
    cache = cache_on(kube, 1.0)
    cache.startService()
    assert kube.lists == [0] and kube.watches == [0] and cache.errors == 1
    clock.advance(0.099)
    assert len(kube.lists) == 1
    clock.advance(0.001)
    # The watch may have missed events: list again, not resume from the old resourceVersion.
    assert kube.lists == pytest.approx([0, 0.1]) and cache.errors == 2
    clock.advance(0.2)
    assert kube.lists == pytest.approx([0, 0.1, 0.3]) and kube.watches == kube.lists
    assert cache.errors == 2 and cache.lists == 3 and cache.synced
    cache.stopService()
