"""Per-key policy on a Clock: token windows, concurrency places, priority head starts, and their
effect in the gate's line and in a fleet's order of making room."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock

from llamad.keys.apikey import ApiKey
from llamad.fleet.gate import AdmissionQueue
from llamad.keys.policy import DAY, Policy, TokenWindow


def key(key_id: str = "k", **policy) -> ApiKey:
    return ApiKey(key_id, key_id.encode().ljust(32, b"."), **policy)


# --- token windows ------------------------------------------------------------------------------


def test_a_minute_window_forgets_tokens_a_minute_old():
    w = TokenWindow(60, 1)
    w.add(10.2, 100)
    w.add(30.5, 50)
    assert w.used(30.5) == 150
    assert w.used(70.9) == 150  # the bucket [10, 11) is not all a minute old yet
    assert w.used(71.0) == 50
    assert w.used(91.0) == 0


def test_free_in_says_when_the_window_drops_under_the_limit():
    w = TokenWindow(60, 1)
    w.add(0, 80)
    w.add(20, 40)
    assert w.free_in(20, 200) == 0  # under the limit now
    assert w.free_in(20, 100) == pytest.approx(41)  # the first 80 leave at 61 s: 40 < 100
    assert w.free_in(20, 30) == pytest.approx(61)  # all of it must leave


def test_a_day_window_keeps_bounded_buckets():
    w = TokenWindow(DAY, 60)
    for second in range(0, 3600, 1):
        w.add(second, 1)
    assert len(w.buckets) == 60 and w.used(3600) == 3600


# --- token quotas ---------------------------------------------------------------------------------


def test_a_quota_used_up_refuses_with_retry_after_until_the_window_frees():
    clock = Clock()
    policy = Policy(clock)
    k = key(tokens_per_minute=100)
    assert policy.quota_refusal(k) is None
    policy.record("k", 60)
    assert policy.quota_refusal(k) is None  # 60 < 100: the next request may run (and cross it)
    clock.advance(10)
    policy.record("k", 70)  # a stream that crossed the quota was not cut: 130 counted
    refusal = policy.quota_refusal(k)
    assert refusal is not None and refusal.status == 429 and refusal.code == "token_quota_exceeded"
    assert refusal.headers[b"retry-after"] == b"51"  # the first 60 leave at 61 s: 70 < 100
    clock.advance(51)
    assert policy.quota_refusal(k) is None


def test_the_day_quota_counts_across_minutes():
    clock = Clock()
    policy = Policy(clock)
    k = key(tokens_per_day=1000, tokens_per_minute=600)
    for _ in range(4):
        policy.record("k", 300)
        clock.advance(120)
    refusal = policy.quota_refusal(k)
    assert refusal is not None and "per day" in refusal.message
    assert int(refusal.headers[b"retry-after"]) > 80000  # the first 300 leave a day after they came


def test_counters_survive_a_reload_and_follow_the_new_limits():
    clock = Clock()
    policy = Policy(clock)
    policy.record("k", 500)
    policy.reloaded({"k": key(tokens_per_minute=400)})
    assert policy.quota_refusal(key(tokens_per_minute=400)) is not None
    assert policy.tokens_used("k") == (500, 500)


def test_token_windows_outlive_the_process_through_their_state():
    clock = Clock()
    clock.advance(1_000_000)
    before = Policy(clock)
    day = key(tokens_per_day=1000)
    for _ in range(4):
        before.record("k", 300)
        clock.advance(120)
    before.record("other", 5)
    state = before.token_state()
    assert set(state) == {"k", "other"} and [tokens for _, tokens in state["k"]["day"]] == [300] * 4
    clock.advance(30)  # the restart
    after = Policy(clock)
    after.restore_tokens(state)
    assert after.tokens_used("k") == before.tokens_used("k") == (0, 1200)
    assert after.quota_refusal(day) is not None
    assert after.quota_refusal(day).headers == before.quota_refusal(day).headers  # the same Retry-After
    clock.advance(DAY)
    assert after.tokens_used("k") == (0, 0) and after.token_state() == {}


def test_restored_buckets_merge_with_counts_already_made_and_old_ones_are_dropped():
    w = TokenWindow(60, 1)
    w.add(100.5, 10)
    w.restore([[39.0, 7], [99.0, 3], [100.0, 4], [500.0, 9]], 100.5)  # too old; in; same bucket; future
    assert list(w.buckets) == [[99.0, 3], [100.0, 14]] and w.used(100.5) == 17
    w.add(100.7, 1)  # the newest bucket still takes the next adds
    assert w.used(100.7) == 18 and len(w.buckets) == 2


# --- concurrency ----------------------------------------------------------------------------------


def test_max_concurrent_places_go_to_waiters_in_order():
    policy = Policy(Clock())
    k = key(max_concurrent=2)
    assert policy.enter(k) and policy.enter(k)
    assert not policy.enter(k)
    first, second = policy.wait(k), policy.wait(k)
    got: list[str] = []
    first.addCallback(lambda _: got.append("first"))
    second.addCallback(lambda _: got.append("second"))
    policy.leave(k)
    assert got == ["first"] and policy.uses["k"].in_flight == 2
    policy.leave(k)
    assert got == ["first", "second"]


def test_a_cancelled_waiter_leaves_the_line_without_a_place():
    policy = Policy(Clock())
    k = key(max_concurrent=1)
    assert policy.enter(k)
    d = policy.wait(k)
    d.addErrback(lambda f: f.trap(defer.CancelledError))
    d.cancel()
    policy.leave(k)
    assert policy.uses["k"].in_flight == 0 and not policy.uses["k"].waiters


def test_a_reload_that_raises_the_limit_lets_waiters_go():
    policy = Policy(Clock())
    k = key(max_concurrent=1)
    assert policy.enter(k)
    d = policy.wait(k)
    policy.reloaded({"k": key(max_concurrent=2)})
    assert d.called and policy.uses["k"].in_flight == 2


def test_keys_without_a_limit_are_only_counted():
    policy = Policy(Clock())
    k = key()
    assert all(policy.enter(k) for _ in range(100))


# --- priority -------------------------------------------------------------------------------------


def test_head_start_is_the_class_level_times_the_ageing():
    policy = Policy(Clock(), {"interactive": 2, "batch": 0}, ageing=30)
    assert policy.head_start(key(priority="interactive")) == 60
    assert policy.head_start(key(priority="batch")) == 0
    assert policy.head_start(key()) == 0 and policy.head_start(None) == 0


def test_the_line_serves_higher_classes_first_and_fifo_within_one():
    q: AdmissionQueue[str] = AdmissionQueue(limit=1, max_queue=10)
    q.arrive("running")
    for name, arrival, head_start in [("batch-1", 0, 0), ("batch-2", 1, 0), ("high-1", 2, 60), ("high-2", 3, 60)]:
        q.arrive(name, arrival - head_start)
    assert [q.release() for _ in range(4)] == ["high-1", "high-2", "batch-1", "batch-2"]


def test_ageing_lets_a_long_wait_go_before_a_newer_higher_class():
    """Level 1 with 30 s of ageing: a batch request queued 31 s before an interactive one goes first."""
    policy = Policy(Clock(), {"interactive": 1}, ageing=30)
    q: AdmissionQueue[str] = AdmissionQueue(limit=1, max_queue=10)
    q.arrive("running")
    q.arrive("batch-old", 0.0 - policy.head_start(key(priority="")))
    q.arrive("interactive-new", 31.0 - policy.head_start(key(priority="interactive")))
    assert q.release() == "batch-old"


def test_no_class_starves_under_a_steady_stream_of_higher_ones():
    """One slot, a request every 10 s of the higher class (level 1, ageing 30 s), each taking 10 s:
    the low one queued at 0 is served within 30 s plus one request's time."""
    q: AdmissionQueue[str] = AdmissionQueue(limit=1, max_queue=100)
    q.arrive("running")
    q.arrive("low", 0.0)
    served_at = None
    for t in range(10, 200, 10):
        q.arrive(f"high@{t}", t - 30.0)
        if q.release() == "low":
            served_at = t
            break
    assert served_at is not None and served_at <= 40
