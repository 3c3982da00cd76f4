"""Placement decisions on plain values: which models to stop and which to start."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamad.placement import (
    GiB, MiB, ModelView, Plan, format_bytes, held_bytes, held_count, place,
)

NOW = 100.0


def gib(n: float) -> int:
    return int(n * GiB)


def loaded(id: str, need: float, last_used: float = 0.0, loaded_at: float | None = 0.0, **kw) -> ModelView:
    return ModelView(id, gib(need), "loaded", last_used=last_used, loaded_at=loaded_at, **kw)


def waiting(id: str, need: float, since: float, state: str = "unloaded") -> ModelView:
    return ModelView(id, gib(need), state, waiting_since=since)  # type: ignore[arg-type]


def plan(models, budget: float | None = 16, max_loaded: int = 0, min_resident: float = 0.0, now: float = NOW) -> Plan:
    return place(models, None if budget is None else gib(budget), max_loaded, min_resident, now)


# --- fitting and evicting ---------------------------------------------------------------------


def test_fits_without_eviction() -> None:
    p = plan([loaded("a", 6), waiting("b", 6, since=90)])
    assert p == Plan(start=("b",))


def test_nothing_waiting_nothing_to_do() -> None:
    assert plan([loaded("a", 6), loaded("b", 6), ModelView("c", gib(20), "unloaded")]) == Plan()


def test_evicts_the_least_recently_used_idle_model() -> None:
    models = [loaded("a", 5, last_used=50), loaded("b", 5, last_used=10), loaded("c", 5, last_used=30),
              waiting("d", 5, since=90)]
    p = plan(models)
    assert p.stop == ("b",)
    assert p.evicted_for == {"b": "d"}
    # The stopped child holds its memory until it has exited: d starts on a later call.
    assert p.start == ()
    assert p.blocked == {"d": "waiting for b to stop (needs 5.0 GiB)"}


def test_starts_once_the_evicted_model_has_stopped() -> None:
    models = [loaded("a", 5, last_used=50), ModelView("b", gib(5), "stopping"), loaded("c", 5, last_used=30),
              waiting("d", 5, since=90)]
    assert plan(models).start == ()  # still stopping: nothing more is stopped for d
    assert plan(models).stop == ()
    models[1] = ModelView("b", gib(5), "unloaded")
    assert plan(models) == Plan(start=("d",))


@pytest.mark.parametrize("holder", [
    loaded("x", 10, pinned=True),
    loaded("x", 10, in_flight=1),
    loaded("x", 10, queued=3),
    ModelView("x", gib(10), "loading"),
    ModelView("x", gib(10), "stopping"),
], ids=["pinned", "in-flight", "queued", "loading", "stopping"])
def test_never_evicts_pinned_busy_loading_or_stopping(holder: ModelView) -> None:
    p = plan([holder, waiting("w", 10, since=90)])
    assert p.stop == ()
    assert p.start == ()
    assert "w" in p.blocked


def test_blocked_with_the_numbers_when_nothing_can_go() -> None:
    models = [loaded("qwen", 7.5, in_flight=2), loaded("gemma", 6, pinned=True), waiting("llama", 6, since=90)]
    p = plan(models)
    assert p.stop == () and p.start == ()
    assert p.blocked == {"llama": "needs 6.0 GiB, 2.5 GiB free of 16.0 GiB; busy: qwen (2 in flight); pinned: gemma"}


def test_no_partial_eviction() -> None:
    """Stopping the idle model would not be enough: it stays, and the waiter is blocked."""
    models = [loaded("idle", 4), loaded("busy", 10, in_flight=1), waiting("big", 8, since=90)]
    p = plan(models)
    assert p.stop == () and p.start == ()
    assert p.blocked["big"] == "needs 8.0 GiB, 2.0 GiB free of 16.0 GiB; busy: busy (1 in flight); idle: idle"


def test_evicts_several_small_models_lru_first_and_only_as_many_as_needed() -> None:
    models = [loaded("s1", 3, last_used=40), loaded("s2", 3, last_used=10), loaded("s3", 3, last_used=20),
              loaded("s4", 3, last_used=30), waiting("big", 10, since=90)]
    p = plan(models)  # 4 GiB free: 6 more needed, the two least recently used
    assert p.stop == ("s2", "s3")
    assert p.evicted_for == {"s2": "big", "s3": "big"}


def test_a_later_larger_eviction_spares_the_earlier_ones() -> None:
    """LRU order, but no stop that a larger later one made unnecessary."""
    models = [loaded("tiny", 1, last_used=10), loaded("small", 2, last_used=20), loaded("large", 13, last_used=30),
              waiting("big", 12, since=90)]
    assert plan(models).stop == ("large",)


def test_waits_for_a_stopping_model_rather_than_evicting_another() -> None:
    models = [ModelView("old", gib(8), "stopping"), loaded("idle", 4), waiting("w", 10, since=90)]
    p = plan(models)
    assert p.stop == ()
    assert p.blocked == {"w": "waiting for old to stop (needs 10.0 GiB)"}


def test_loading_models_hold_their_memory() -> None:
    models = [ModelView("l", gib(10), "loading"), waiting("w", 8, since=90)]
    p = plan(models)
    assert p.start == () and p.stop == ()
    assert p.blocked["w"] == "needs 8.0 GiB, 6.0 GiB free of 16.0 GiB; loading: l"


def test_failed_model_restarts_when_waiting() -> None:
    assert plan([waiting("f", 4, since=90, state="failed")]) == Plan(start=("f",))


@pytest.mark.parametrize("state", ["loaded", "loading", "stopping"])
def test_never_starts_a_model_that_has_a_child(state: str) -> None:
    m = ModelView("m", gib(4), state, waiting_since=90, loaded_at=0.0)  # type: ignore[arg-type]
    assert plan([m]) == Plan()


# --- arrival order and backfill ---------------------------------------------------------------


def test_older_waiter_first_even_when_listed_later() -> None:
    models = [waiting("young", 10, since=95), waiting("old", 10, since=90)]
    p = plan(models)
    assert p.start == ("old",)
    assert p.blocked["young"].startswith("needs 10.0 GiB, 6.0 GiB free of 16.0 GiB; loading: old")


def test_older_waiter_gets_the_evicted_memory() -> None:
    models = [loaded("a", 8, last_used=10), loaded("b", 8, last_used=20),
              waiting("young", 8, since=95), waiting("old", 8, since=90)]
    p = plan(models)
    assert p.stop == ("a", "b")
    assert p.evicted_for == {"a": "old", "b": "young"}
    assert p.blocked == {"old": "waiting for a to stop (needs 8.0 GiB)",
                         "young": "waiting for b to stop (needs 8.0 GiB)"}


def test_ties_in_arrival_are_broken_by_id() -> None:
    p = plan([waiting("b", 10, since=90), waiting("a", 10, since=90)])
    assert p.start == ("a",)
    assert "b" in p.blocked


def test_backfill_a_small_model_while_a_big_one_is_blocked() -> None:
    models = [loaded("busy", 10, in_flight=1), loaded("idle", 2, last_used=5),
              waiting("big", 12, since=90), waiting("small", 3, since=95)]
    p = plan(models)
    assert p.start == ("small",)  # fits in the 4 GiB free
    assert p.stop == ()  # the idle model is kept for the big one
    assert "big" in p.blocked


def test_younger_waiter_does_not_evict_while_an_older_one_is_blocked() -> None:
    models = [loaded("busy", 10, in_flight=1), loaded("idle", 4, last_used=5),
              waiting("big", 12, since=90), waiting("mid", 4, since=95)]
    p = plan(models)  # mid would fit by evicting idle, but big has first claim on it
    assert p.stop == () and p.start == ()
    assert p.blocked["mid"].endswith("after: big (waiting longer)")


def test_a_waiter_with_claimed_memory_leaves_free_memory_to_younger_ones() -> None:
    models = [ModelView("going", gib(8), "stopping"), loaded("busy", 4, in_flight=1),
              waiting("old", 8, since=90), waiting("young", 4, since=95)]
    p = plan(models)  # old claims what 'going' gives back; the 4 GiB free now are young's
    assert p.start == ("young",)
    assert p.blocked == {"old": "waiting for going to stop (needs 8.0 GiB)"}


def test_a_waiter_reserves_free_memory_it_will_need() -> None:
    models = [ModelView("going", gib(4), "stopping"), loaded("busy", 8, in_flight=1),
              waiting("old", 8, since=90), waiting("young", 4, since=95)]
    p = plan(models)  # old needs going's 4 GiB and the 4 GiB free: young must not take them
    assert p.start == ()
    assert p.blocked["old"] == "waiting for going to stop (needs 8.0 GiB)"
    assert p.blocked["young"].startswith("needs 4.0 GiB, 0 B free of 16.0 GiB")


# --- minimum residency --------------------------------------------------------------------------


def test_min_resident_protects_a_just_loaded_model_from_a_younger_waiter() -> None:
    models = [loaded("a", 10, loaded_at=0.0, last_used=0.5), waiting("b", 10, since=1.0)]
    p = plan(models, min_resident=30, now=1.0)
    assert p.stop == ()
    assert p.blocked == {"b": "needs 10.0 GiB, 6.0 GiB free of 16.0 GiB; just loaded: a (stays 29s more)"}
    assert p.wake == 30.0
    later = plan(models, min_resident=30, now=31.0)
    assert later.stop == ("a",)
    assert later.wake is None


def test_min_resident_yields_to_an_older_waiter() -> None:
    """b waited since before a finished loading: a's residency does not outrank b."""
    models = [loaded("a", 10, loaded_at=10.0, last_used=11.0), waiting("b", 10, since=5.0)]
    assert plan(models, min_resident=30, now=12.0).stop == ("a",)


def test_min_resident_is_measured_from_loaded_at() -> None:
    models = [loaded("a", 10, loaded_at=0.0), waiting("b", 10, since=1.0)]
    assert plan(models, min_resident=30, now=29.9).stop == ()
    assert plan(models, min_resident=30, now=30.0).stop == ("a",)


def test_two_models_alternating_do_not_thrash() -> None:
    """a and b take turns asking; each swap waits out min_resident, so swaps are at most one per window."""
    models = {"a": loaded("a", 10, loaded_at=0.0, last_used=0.5), "b": ModelView("b", gib(10), "unloaded")}
    swaps = []
    t = 0.0
    while t < 300:
        t += 1.0
        # Whichever is not loaded wants to be, from the moment the other was loaded.
        for id, m in list(models.items()):
            if m.state == "unloaded" and m.waiting_since is None:
                models[id] = dataclasses.replace(m, waiting_since=t)
        p = place(list(models.values()), gib(16), 0, 30.0, t)
        for id in p.stop:
            models[id] = dataclasses.replace(models[id], state="unloaded", loaded_at=None, waiting_since=None)
            swaps.append(t)
        for id in p.start:
            models[id] = dataclasses.replace(models[id], state="loaded", loaded_at=t, last_used=t, waiting_since=None)
    assert len(swaps) >= 2
    assert all(b - a >= 30 for a, b in itertools.pairwise(swaps))


# --- counts and limits --------------------------------------------------------------------------


def test_max_loaded_evicts_the_least_recently_used() -> None:
    models = [loaded("a", 1, last_used=30), loaded("b", 1, last_used=10), loaded("c", 1, last_used=20),
              waiting("d", 1, since=90)]
    p = plan(models, budget=64, max_loaded=3)
    assert p.stop == ("b",)
    assert p.blocked == {"d": "waiting for b to stop (needs 1.0 GiB)"}


def test_max_loaded_blocked_reason_counts_models() -> None:
    models = [loaded("a", 1, in_flight=1), loaded("b", 1, pinned=True), waiting("d", 1, since=90)]
    p = plan(models, budget=64, max_loaded=2)
    assert p.blocked == {"d": "needs 1.0 GiB, 62.0 GiB free of 64.0 GiB; 2 of 2 models loaded; "
                              "busy: a (1 in flight); pinned: b"}


def test_no_memory_limit_counts_only() -> None:
    models = [loaded("a", 100, last_used=20), loaded("b", 100, last_used=10),
              waiting("c", 500, since=90), waiting("d", 500, since=91)]
    p = plan(models, budget=None, max_loaded=3)
    assert p.start == ("c",)
    assert p.stop == ("b",)
    assert p.evicted_for == {"b": "d"}
    assert p.blocked == {"d": "waiting for b to stop"}


def test_no_limits_at_all_starts_everything() -> None:
    models = [waiting(id, 1000, since=90) for id in "abc"]
    assert plan(models, budget=None, max_loaded=0) == Plan(start=("a", "b", "c"))


def test_a_model_larger_than_the_budget_never_fits() -> None:
    models = [loaded("idle", 4), waiting("huge", 20, since=90), waiting("small", 2, since=95)]
    p = plan(models)
    assert p.stop == ()
    assert p.blocked == {"huge": "never fits: needs 20.0 GiB, budget 16.0 GiB"}
    assert p.start == ("small",)


def test_a_never_fitting_model_does_not_hold_back_younger_evictions() -> None:
    models = [loaded("idle", 10), waiting("huge", 20, since=90), waiting("mid", 8, since=95)]
    p = plan(models)
    assert p.stop == ("idle",)
    assert p.evicted_for == {"idle": "mid"}


def test_over_committed_fleet_is_safe() -> None:
    """A budget lowered under what is loaded: nothing starts until enough has gone."""
    models = [loaded("a", 10, last_used=1), loaded("b", 10, last_used=2), waiting("c", 4, since=90)]
    p = plan(models, budget=16)
    assert p.stop == ("a",)  # 16 - 20 + 10 = 6 GiB free once a has stopped
    assert p.start == ()


# --- preload ------------------------------------------------------------------------------------


def test_preloads_start_in_parallel_within_the_budget() -> None:
    boot = 0.0
    models = [waiting("a", 4, since=boot), waiting("b", 6, since=boot), waiting("c", 5, since=boot),
              waiting("d", 3, since=boot)]
    p = plan(models, now=boot)
    assert p.start == ("a", "b", "c")  # 15 GiB; d (3 GiB) does not fit in the 1 GiB left
    assert p.stop == ()
    assert p.blocked == {"d": "needs 3.0 GiB, 1.0 GiB free of 16.0 GiB; loading: a, b, c"}


def test_a_preload_that_does_not_fit_is_blocked_not_an_error() -> None:
    p = plan([waiting("a", 12, since=0.0), waiting("b", 12, since=0.0)], now=0.0)
    assert p.start == ("a",)
    assert set(p.blocked) == {"b"}


# --- determinism and helpers --------------------------------------------------------------------


def test_same_input_same_plan_in_any_order() -> None:
    models = [loaded("a", 4, last_used=10), loaded("b", 4, last_used=10), loaded("c", 4, last_used=10),
              waiting("x", 6, since=90), waiting("y", 6, since=90), waiting("z", 2, since=91)]
    first = plan(models)
    assert first.stop == ("a", "b", "c")  # equal last use and equal arrival: by id
    assert first.evicted_for == {"a": "x", "b": "y", "c": "z"}
    for perm in itertools.permutations(models):
        assert plan(list(perm)) == first


def test_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        plan([loaded("a", 1), waiting("a", 1, since=90)])


@pytest.mark.parametrize("n, text", [
    (6 * GiB, "6.0 GiB"), (int(2.5 * GiB), "2.5 GiB"), (512 * MiB, "512 MiB"), (1536, "2 KiB"), (0, "0 B"),
    (-GiB, "-1.0 GiB"),
])
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def test_held_counts_loading_loaded_and_stopping() -> None:
    models = [ModelView("a", 1, "loading"), ModelView("b", 2, "loaded"), ModelView("c", 4, "stopping"),
              ModelView("d", 8, "unloaded"), ModelView("e", 16, "failed")]
    assert held_bytes(models) == 7
    assert held_count(models) == 3


# --- properties ---------------------------------------------------------------------------------

STATES = ["unloaded", "loading", "loaded", "stopping", "failed"]


@st.composite
def fleets(draw):
    n = draw(st.integers(1, 7))
    models = []
    for i in range(n):
        state = draw(st.sampled_from(STATES))
        startable = state in ("unloaded", "failed")
        models.append(ModelView(
            id=f"m{i}",
            need=draw(st.integers(1, 8)) * GiB,
            state=state,
            pinned=draw(st.booleans()),
            in_flight=draw(st.integers(0, 2)) if state == "loaded" else 0,
            queued=draw(st.integers(0, 2)),
            last_used=draw(st.integers(0, 50)),
            loaded_at=draw(st.one_of(st.none(), st.integers(0, 100))) if state == "loaded" else None,
            waiting_since=draw(st.one_of(st.none(), st.integers(0, 100))) if startable else None,
        ))
    held = held_bytes(models)
    budget = draw(st.one_of(st.none(), st.integers(held, held + 20 * GiB)))
    count = held_count(models)
    max_loaded = draw(st.one_of(st.just(0), st.integers(max(count, 1), count + 4)))
    min_resident = draw(st.sampled_from([0.0, 10.0, 30.0]))
    return models, budget, max_loaded, min_resident


@settings(max_examples=400, deadline=None)
@given(fleets(), st.randoms(use_true_random=False))
def test_plans_are_safe(fleet, rnd) -> None:
    models, budget, max_loaded, min_resident = fleet
    now = 100.0
    p = place(models, budget, max_loaded, min_resident, now)
    by_id = {m.id: m for m in models}

    for id in p.stop:
        m = by_id[id]
        assert m.state == "loaded" and not m.pinned and m.in_flight == 0 and m.queued == 0
        w = by_id[p.evicted_for[id]]
        assert m.loaded_at is None or now - m.loaded_at >= min_resident or w.waiting_since < m.loaded_at
    assert set(p.evicted_for) == set(p.stop)
    assert len(set(p.stop)) == len(p.stop)

    wanting = {m.id for m in models if m.state in ("unloaded", "failed") and m.waiting_since is not None}
    assert set(p.start) <= wanting
    assert set(p.start) | set(p.blocked) == wanting
    assert not set(p.start) & set(p.blocked)
    # Stops are for waiters that wait for them, and never for one that cannot fit.
    for w in p.evicted_for.values():
        assert p.blocked[w].startswith("waiting for")
    going = set(p.stop) | {m.id for m in models if m.state == "stopping"}
    for reason in p.blocked.values():
        if reason.startswith("waiting for "):
            names = reason.removeprefix("waiting for ").split(" to stop")[0].split(", ")
            assert names and set(names) <= going

    # Stopped children still hold memory: the budget holds with every stop still in progress.
    after_bytes = held_bytes(models) + sum(by_id[id].need for id in p.start)
    after_count = held_count(models) + len(p.start)
    if budget is not None:
        assert after_bytes <= budget
    if max_loaded:
        assert after_count <= max_loaded

    shuffled = list(models)
    rnd.shuffle(shuffled)
    assert place(shuffled, budget, max_loaded, min_resident, now) == p


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 8), st.booleans(), st.integers(0, 50)), min_size=1, max_size=6),
       st.integers(8, 24), st.integers(0, 4))
def test_every_waiter_that_fits_is_served_when_nothing_is_busy(specs, budget_gib, max_loaded) -> None:
    """Applying each plan in turn (stops finish, starts load) serves every waiter, oldest first."""
    models = {}
    for i, (need, wants, since) in enumerate(specs):
        models[f"m{i}"] = ModelView(f"m{i}", need * GiB, "unloaded", waiting_since=since if wants else None)
    budget = budget_gib * GiB
    pending = {id for id, m in models.items() if m.waiting_since is not None and m.need <= budget}
    served: list[str] = []
    t = 100.0
    for _ in range(2 * len(models) + 2):
        p = place(list(models.values()), budget, max_loaded, 0.0, t)
        for id in p.stop:
            models[id] = dataclasses.replace(models[id], state="unloaded", loaded_at=None)
        for id in p.start:
            models[id] = dataclasses.replace(models[id], state="loaded", loaded_at=t, last_used=t, waiting_since=None)
            served.append(id)
        t += 1.0
    assert set(served) == pending
    if pending:
        assert served[0] == min(pending, key=lambda id: (specs[int(id[1:])][2], id))
