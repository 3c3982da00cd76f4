"""Placement decisions on plain values: which models to stop and which to start."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llamad.fleet.placement import (
    GiB, MiB, ModelView, Plan, format_bytes, held_bytes, held_count, place,
)

NOW = 100.0


def gib(n: float) -> int:
    return int(n * GiB)


def loaded(id: str, need: float, last_used: float = 0.0, loaded_at: float | None = 0.0, **kw) -> ModelView:
    return ModelView(id, gib(need), "loaded", last_used=last_used, loaded_at=loaded_at, **kw)


def waiting(id: str, need: float, since: float, state: str = "unloaded") -> ModelView:
    return ModelView(id, gib(need), state, waiting_since=since)  # type: ignore[arg-type]


def plan(models, budget: float | None = 16, max_loaded: int = 0, min_resident: float = 0.0, now: float = NOW,
         swap_quantum: float = 1000.0) -> Plan:
    """By default a busy model's turn never ends within these tests' times: turns are tested on their own."""
    return place(models, None if budget is None else gib(budget), max_loaded, min_resident, now,
                 swap_quantum=swap_quantum)


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


# --- idle models give way, busy ones after their turn -------------------------------------------


def test_an_idle_model_gives_way_at_once_however_recently_loaded() -> None:
    """Work-conserving: min_resident protects a model with requests, never an idle one."""
    models = [loaded("a", 10, loaded_at=99.0, last_used=99.5), waiting("b", 10, since=99.8)]
    p = plan(models, min_resident=30, now=100.0)
    assert p.stop == ("a",)
    assert p.evicted_for == {"a": "b"}


def test_a_busy_model_keeps_its_memory_until_its_turn_is_over() -> None:
    models = [loaded("a", 10, loaded_at=0.0, in_flight=2, queued=1), waiting("b", 10, since=95.0)]
    p = plan(models, min_resident=5, swap_quantum=10, now=100.0)
    assert p.stop == () and p.drain == ()
    assert p.blocked == {"b": "needs 10.0 GiB, 6.0 GiB free of 16.0 GiB; busy: a (2 in flight, 1 queued)"}
    assert p.wake == 105.0  # b's quantum ends


def test_a_busy_model_is_drained_when_its_turn_is_over() -> None:
    models = [loaded("a", 10, loaded_at=0.0, in_flight=2, queued=1), waiting("b", 10, since=95.0)]
    p = plan(models, min_resident=5, swap_quantum=10, now=105.0)
    assert p.drain == ("a",) and p.stop == ()
    assert p.evicted_for == {"a": "b"}
    assert p.blocked == {"b": "waiting for a to stop (needs 10.0 GiB)"}
    assert p.wake is None


def test_a_drained_model_with_nothing_running_is_stopped_though_requests_queue() -> None:
    models = [loaded("a", 10, loaded_at=0.0, queued=3), waiting("b", 10, since=95.0)]
    p = plan(models, min_resident=5, swap_quantum=10, now=105.0)
    assert p.stop == ("a",) and p.drain == ()


def test_min_resident_lets_a_model_loaded_for_old_requests_run_them() -> None:
    """b waited long, but a was just loaded for requests older still: a runs them first."""
    models = [loaded("a", 10, loaded_at=100.0, in_flight=2), waiting("b", 10, since=50.0)]
    p = plan(models, min_resident=5, swap_quantum=10, now=101.0)
    assert p.drain == () and p.stop == ()
    assert p.wake == 105.0
    assert plan(models, min_resident=5, swap_quantum=10, now=105.0).drain == ("a",)


def test_idle_models_go_before_busy_ones() -> None:
    models = [loaded("busy", 6, loaded_at=0.0, in_flight=1), loaded("idle", 6, last_used=90.0),
              waiting("w", 8, since=50.0)]
    p = plan(models, swap_quantum=10, now=100.0)  # both may go; the idle one is enough
    assert p.stop == ("idle",) and p.drain == ()


def test_pinned_models_are_never_drained() -> None:
    models = [loaded("a", 10, loaded_at=0.0, in_flight=1, pinned=True), waiting("b", 10, since=0.0)]
    p = plan(models, swap_quantum=0, now=100.0)
    assert p.drain == () and p.stop == ()
    assert p.wake is None


def test_two_models_with_steady_work_take_turns() -> None:
    """a and b both always have requests: each runs at least min_resident per turn, neither starves."""
    models = {"a": loaded("a", 10, loaded_at=0.0, in_flight=2), "b": ModelView("b", gib(10), "unloaded")}
    loads: list[tuple[float, str]] = [(0.0, "a")]
    t = 0.0
    while t < 300:
        t += 1.0
        for id, m in list(models.items()):
            if m.state == "unloaded" and m.waiting_since is None:
                models[id] = dataclasses.replace(m, waiting_since=t)
        p = place(list(models.values()), gib(16), 0, 20.0, t, swap_quantum=10.0)
        for id in p.drain:  # its requests end within the second
            models[id] = dataclasses.replace(models[id], in_flight=0, queued=2)
        for id in p.stop:
            models[id] = dataclasses.replace(models[id], state="unloaded", loaded_at=None, waiting_since=None,
                                             in_flight=0, queued=0)
        for id in p.start:
            models[id] = dataclasses.replace(models[id], state="loaded", loaded_at=t, last_used=t, waiting_since=None,
                                             in_flight=2)
            loads.append((t, id))
    assert [id for _, id in loads[:4]] == ["a", "b", "a", "b"]
    assert all(b - a >= 20 for (a, _), (b, _) in itertools.pairwise(loads))
    assert all(b - a <= 25 for (a, _), (b, _) in itertools.pairwise(loads))


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
    swap_quantum = draw(st.sampled_from([0.0, 10.0, 1000.0]))
    return models, budget, max_loaded, min_resident, swap_quantum


@settings(max_examples=400, deadline=None)
@given(fleets(), st.randoms(use_true_random=False))
def test_plans_are_safe(fleet, rnd) -> None:
    models, budget, max_loaded, min_resident, swap_quantum = fleet
    now = 100.0
    p = place(models, budget, max_loaded, min_resident, now, swap_quantum=swap_quantum)
    by_id = {m.id: m for m in models}

    # Nothing running is cut: a stop has nothing in flight, a model with requests running is drained.
    for id in p.stop + p.drain:
        m = by_id[id]
        assert m.state == "loaded" and not m.pinned
        assert (m.in_flight == 0) == (id in p.stop)
        if m.busy:  # only once its turn against the waiter it goes for is over
            w = by_id[p.evicted_for[id]]
            assert now >= w.waiting_since + swap_quantum
            assert m.loaded_at is None or now >= m.loaded_at + min_resident
    assert set(p.evicted_for) == set(p.stop) | set(p.drain)
    assert len(set(p.stop + p.drain)) == len(p.stop) + len(p.drain)

    wanting = {m.id for m in models if m.state in ("unloaded", "failed") and m.waiting_since is not None}
    assert set(p.start) <= wanting
    assert set(p.start) | set(p.blocked) == wanting
    assert not set(p.start) & set(p.blocked)
    # Stops are for waiters that wait for them, and never for one that cannot fit.
    for w in p.evicted_for.values():
        assert p.blocked[w].startswith("waiting for")
    going = set(p.stop) | set(p.drain) | {m.id for m in models if m.state == "stopping"}
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
    assert place(shuffled, budget, max_loaded, min_resident, now, swap_quantum=swap_quantum) == p


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
        p = place(list(models.values()), budget, max_loaded, 0.0, t, swap_quantum=0.0)
        for id in p.stop:
            models[id] = dataclasses.replace(models[id], state="unloaded", loaded_at=None)
        for id in p.start:
            models[id] = dataclasses.replace(models[id], state="loaded", loaded_at=t, last_used=t, waiting_since=None)
            served.append(id)
        t += 1.0
    assert set(served) == pending
    if pending:
        assert served[0] == min(pending, key=lambda id: (specs[int(id[1:])][2], id))


# --- a fleet simulated on a Clock: random arrivals, plans carried out ------------------------------

LOAD_S, STOP_S, PARALLEL = 2.0, 1.0, 2


class SimulatedFleet:
    """Models, their queues and children on a Clock, driven by :func:`place` as the fleet drives it:
    every arrival, end, load and stop places again, and so does the plan's ``wake``."""

    def __init__(self, needs: dict[str, int], budget: int | None, max_loaded: int, min_resident: float,
                 swap_quantum: float) -> None:
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.budget, self.max_loaded = budget, max_loaded
        self.min_resident, self.swap_quantum = min_resident, swap_quantum
        self.views = {id: ModelView(id, need, "unloaded") for id, need in needs.items()}
        self.queues: dict[str, list[tuple[float, float]]] = {id: [] for id in needs}  # (arrival, duration)
        self.drained: set[str] = set()
        self.turn_ended: dict[str, float] = {}  # a drained model's queued requests wait from its stop
        self.waits: dict[str, list[float]] = {id: [] for id in needs}  # per request: arrival to admission
        self.done = 0
        self.wake = None
        self.violations: list[str] = []

    def arrive(self, model: str, duration: float) -> None:
        self.queues[model].append((self.clock.seconds(), duration))
        self._dispatch(model)
        self.place()

    def _update(self, id: str) -> None:
        m = self.views[id]
        queue = self.queues[id]
        since = (max(min(a for a, _ in queue), self.turn_ended.get(id, -1.0))
                 if queue and m.state == "unloaded" else None)
        self.views[id] = dataclasses.replace(m, queued=len(queue), waiting_since=since)

    def _dispatch(self, id: str) -> None:
        m = self.views[id]
        now = self.clock.seconds()
        while m.state == "loaded" and id not in self.drained and self.queues[id] and m.in_flight < PARALLEL:
            arrival, duration = self.queues[id].pop(0)
            self.waits[id].append(now - arrival)
            m = self.views[id] = dataclasses.replace(m, in_flight=m.in_flight + 1, last_used=now)
            self.clock.callLater(duration, self._end, id)
        self._update(id)

    def _end(self, id: str) -> None:
        m = self.views[id]
        self.views[id] = dataclasses.replace(m, in_flight=m.in_flight - 1, last_used=self.clock.seconds())
        self.done += 1
        self._dispatch(id)
        self.place()

    def _loaded(self, id: str) -> None:
        self.views[id] = dataclasses.replace(self.views[id], state="loaded", loaded_at=self.clock.seconds())
        self._dispatch(id)
        self.place()

    def _stopped(self, id: str) -> None:
        self.views[id] = dataclasses.replace(self.views[id], state="unloaded", loaded_at=None)
        self.drained.discard(id)
        self.turn_ended[id] = self.clock.seconds()
        self._update(id)
        self.place()

    def place(self) -> None:
        now = self.clock.seconds()
        views = list(self.views.values())
        p = place(views, self.budget, self.max_loaded, self.min_resident, now, swap_quantum=self.swap_quantum)
        self._check_work_conserving(views, p)
        for id in p.stop:
            self.views[id] = dataclasses.replace(self.views[id], state="stopping")
            self.drained.add(id)
            self.clock.callLater(STOP_S, self._stopped, id)
        for id in p.drain:
            self.drained.add(id)
        for id, m in self.views.items():
            if id in self.drained and m.state == "loaded" and id not in p.drain:
                self.drained.discard(id)
                self._dispatch(id)
        for id in p.start:
            self.views[id] = dataclasses.replace(self.views[id], state="loading", waiting_since=None)
            self.turn_ended.pop(id, None)
            self.clock.callLater(LOAD_S, self._loaded, id)
        if self.wake is not None and self.wake.active():
            self.wake.cancel()
        self.wake = self.clock.callLater(p.wake - now, self.place) if p.wake is not None else None

    def _check_work_conserving(self, views: list[ModelView], p: Plan) -> None:
        """The oldest waiter, if the only models in its way have no work, is given their room now."""
        waiters = sorted((m for m in views if m.waiting), key=lambda m: (m.waiting_since, m.id))
        if not waiters or any(m.state == "stopping" for m in views):
            return
        c = waiters[0]
        others = [m for m in views if m.state in ("loading", "loaded") and m.id != c.id]
        if any(m.state == "loading" or m.busy or m.pinned for m in others):
            return
        if c.id not in p.start and not p.stop:
            self.violations.append(f"t={self.clock.seconds()}: {c.id} waits behind idle models "
                                   f"{[m.id for m in others]}: {p.blocked.get(c.id)}")


@st.composite
def workloads(draw):
    n = draw(st.integers(2, 4))
    needs = {f"m{i}": draw(st.integers(2, 8)) * GiB for i in range(n)}
    budget = draw(st.one_of(st.none(), st.integers(max(needs.values()), sum(needs.values())).map(int)))
    max_loaded = draw(st.integers(0 if budget is not None else 1, n - 1))
    arrivals = draw(st.lists(
        st.tuples(st.integers(0, 600).map(lambda t: t / 4), st.sampled_from(sorted(needs)),
                  st.integers(1, 12).map(lambda d: d / 2)),
        min_size=1, max_size=60))
    # A stream that alone keeps one model busy for 150 s (one request every 2 s, each running 3 s, at
    # most 2 at once): without turns, every other model would wait that long.
    flood = draw(st.sampled_from([None, *sorted(needs)]))
    if flood is not None:
        arrivals += [(2.0 * i, flood, 3.0) for i in range(75)]
    min_resident = draw(st.sampled_from([0.0, 5.0, 30.0]))
    swap_quantum = draw(st.sampled_from([0.0, 5.0, 10.0]))
    return needs, budget, max_loaded, min_resident, swap_quantum, arrivals


@settings(max_examples=100, deadline=None)
@given(workloads())
def test_simulated_fleet_conserves_work_and_bounds_every_wait(workload) -> None:
    """Every request is admitted; none waits for its model longer than every other model's turn, and
    placement never leaves the oldest waiter behind models that have no work."""
    needs, budget, max_loaded, min_resident, swap_quantum, arrivals = workload
    sim = SimulatedFleet(needs, budget, max_loaded, min_resident, swap_quantum)
    for t, model, duration in arrivals:
        sim.clock.callLater(t, sim.arrive, model, duration)
    sim.clock.pump([0.25] * 4 * 1000)
    assert sim.violations == []
    assert sim.done == len(arrivals)
    # A model waits at most for every other model's turn: its quantum (or min_resident), the
    # longest request, a stop and a load; then its requests run, up to PARALLEL at a time.
    turn = max(min_resident, swap_quantum) + 6.0 + STOP_S + LOAD_S
    for model, waits in sim.waits.items():
        if not waits:
            continue
        own = sum(1 for _, m, _ in arrivals if m == model) * 6.0 / PARALLEL
        assert max(waits) <= len(needs) * turn + own, model
