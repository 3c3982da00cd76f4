"""The fleet on a Clock: real supervisors on a fake process reactor, real gates, placement by memory."""

from __future__ import annotations

import math

import signal

from fakes import FakeProbe, FakeProcessReactor
from twisted.internet import defer
from twisted.logger import formatEvent, globalLogPublisher

from llamad.fleet import memory
from llamad.activity import Activity, IdleWatch
from llamad.config import BackendConfig, SupervisorConfig
from llamad.fleet.fleet import Fleet, FleetBackend
from llamad.fleet.gate import Gate, Lease
from llamad.metrics import Metrics
from llamad.fleet.runtime import ModelRuntime
from llamad.fleet.placement import GiB
from llamad.status import Status
from llamad.supervisor import PROBE_INTERVAL, State, Supervisor


class World:
    """A fleet of demo models on one fake reactor; every child answers its probe at once."""

    def __init__(self, budget: int | None = 10 * GiB, max_loaded: int = 0, min_resident: float = 0.0,
                 queue_timeout: float = 60, swap_quantum: float = math.inf) -> None:
        self.reactor = FakeProcessReactor()
        self.probe = FakeProbe()
        self.probe.status = 200
        self.swaps: list[tuple[str, str]] = []
        self.fleet = Fleet(self.reactor, budget, max_loaded, min_resident,
                           on_swap=lambda gone, made_room_for: self.swaps.append((gone, made_room_for)),
                           swap_quantum=swap_quantum)
        self.queue_timeout = queue_timeout
        self.sups: dict[str, Supervisor] = {}

    def add(self, model_id: str, need: int, pinned: bool = False, preload: bool = False, parallel: int = 1,
            estimated: bool = False) -> None:
        sup = Supervisor(self.reactor, self.reactor, BackendConfig(model=f"/m/{model_id}.gguf", start="lazy",
                                                                   name=model_id),
                         SupervisorConfig(health_interval=0), probe=self.probe, key="k", new_session=False,
                         random=lambda: 1.0, base_env={})
        placed = FleetBackend(sup, self.fleet, model_id)
        status = Status(self.reactor, placed, model_id, lazy=True)
        gate = Gate(self.reactor, status, placed, parallel, 16, self.queue_timeout, Metrics())
        activity = Activity(self.reactor)
        runtime = ModelRuntime(model_id, sup, gate, activity, IdleWatch(self.reactor, activity, 0, lambda: True))
        self.fleet.add(runtime, need, pinned, preload, estimated=estimated)
        sup.setName(f"model {model_id}")
        sup.setServiceParent(self.fleet)
        self.sups[model_id] = sup

    def start_with(self, ids: str, need: int) -> None:
        """Models ``ids``, each needing ``need`` bytes, then the fleet started."""
        for model_id in ids:
            self.add(model_id, need)
        self.start()

    def start(self) -> None:
        self.fleet.startService()

    def admit(self, model_id: str) -> list:
        outcome: list = []
        defer.ensureDeferred(self.fleet.runtime(model_id).gate.admit()).addBoth(outcome.append)
        return outcome

    def settle(self) -> None:
        """Children answer their probes; children told to stop exit."""
        for _ in range(5):
            for sup in self.sups.values():
                if sup.state == State.STOPPING and sup.process is not None:
                    sup.process.exit(None, signal.SIGTERM)
            self.reactor.advance(PROBE_INTERVAL)

    def states(self) -> dict[str, str]:
        return {model_id: sup.state.value for model_id, sup in self.sups.items()}

    def running(self, model_id: str) -> tuple[list, Lease]:
        """A request for ``model_id`` that got its slot once the fleet started the model, now running."""
        outcome = self.admit(model_id)
        self.settle()
        return outcome, self.use(model_id, outcome)

    def use(self, model_id: str, outcome: list) -> Lease:
        """A request that got its slot runs, then ends."""
        lease = outcome[0]
        assert isinstance(lease, Lease), outcome
        activity = self.fleet.runtime(model_id).activity
        activity.begin(True)
        return lease

    def done(self, model_id: str, lease: Lease) -> None:
        lease.release()
        self.fleet.runtime(model_id).activity.end(True)


def test_models_start_on_demand_while_they_fit():
    w = World(budget=10 * GiB)
    w.start_with("ab", 4 * GiB)
    assert w.states() == {"a": "stopped", "b": "stopped"}  # lazy: nothing at boot
    first, second = w.admit("a"), w.admit("b")
    w.settle()
    assert w.states() == {"a": "ready", "b": "ready"}
    assert isinstance(first[0], Lease) and isinstance(second[0], Lease) and w.swaps == []


def test_a_model_that_does_not_fit_evicts_the_least_recently_used_idle_one():
    w = World(budget=10 * GiB)
    w.start_with("abc", 4 * GiB)
    for model_id in "ab":
        outcome, lease = w.running(model_id)
        w.reactor.advance(1)
        w.done(model_id, lease)
    c = w.admit("c")
    w.settle()
    assert w.states() == {"a": "stopped", "b": "ready", "c": "ready"}
    assert w.swaps == [("a", "c")] and isinstance(c[0], Lease)


def test_a_busy_model_is_never_evicted_and_the_request_waits_for_room():
    w = World(budget=8 * GiB, queue_timeout=100)
    w.start_with("ab", 5 * GiB)
    a, lease = w.running("a")  # a request in flight on a
    b = w.admit("b")
    w.settle()
    assert w.states() == {"a": "ready", "b": "stopped"} and b == []
    assert "needs 5.0 GiB" in w.fleet.models["b"].blocked and "busy: a" in w.fleet.models["b"].blocked
    w.reactor.advance(10)
    w.done("a", lease)  # a goes idle: now it can go
    w.settle()
    w.settle()
    assert w.states() == {"a": "stopped", "b": "ready"} and isinstance(b[0], Lease)


def test_a_request_that_waits_past_queue_timeout_gets_503_and_nothing_is_started_for_nobody():
    w = World(budget=8 * GiB, queue_timeout=30)
    w.start_with("ab", 5 * GiB)
    a, lease = w.running("a")
    b = w.admit("b")
    w.reactor.advance(30)
    assert b and b[0].value.code == "queue_timeout"
    assert "needs 5.0 GiB, 3.0 GiB free of 8.0 GiB; busy: a (1 in flight)" in b[0].value.message
    w.done("a", lease)
    w.settle()
    assert w.states() == {"a": "ready", "b": "stopped"} and w.swaps == []


def test_preloaded_models_start_at_boot_within_the_budget():
    w = World(budget=10 * GiB)
    w.add("a", 4 * GiB, preload=True)
    w.add("b", 4 * GiB, preload=True)
    w.add("c", 4 * GiB, preload=True)
    w.start()
    w.settle()
    assert w.states() == {"a": "ready", "b": "ready", "c": "stopped"}
    assert "c" not in w.fleet.waiting() and w.swaps == []  # a preload never evicts


def test_a_pinned_model_is_never_evicted():
    w = World(budget=8 * GiB, queue_timeout=10)
    w.add("a", 5 * GiB, pinned=True, preload=True)
    w.add("b", 5 * GiB)
    w.start()
    w.settle()
    b = w.admit("b")
    w.settle()
    w.reactor.advance(10)
    assert w.states()["a"] == "ready" and b[0].value.code == "queue_timeout"
    assert "pinned: a" in w.fleet.snapshot()["waiting"].get("b", w.fleet.models["b"].blocked or "pinned: a")


def test_an_idle_model_gives_way_at_once_whatever_min_resident_says():
    w = World(budget=6 * GiB, min_resident=30, queue_timeout=100)
    w.add("a", 5 * GiB)
    w.add("b", 5 * GiB)
    w.start()
    a, lease = w.running("a")
    w.done("a", lease)
    b = w.admit("b")  # a was loaded a moment ago, but has nothing to do: b gets its memory now
    w.settle()
    w.settle()
    assert w.states() == {"a": "stopped", "b": "ready"} and isinstance(b[0], Lease)
    assert w.swaps == [("a", "b")]


def test_a_busy_model_is_drained_after_its_turn_and_its_queue_waits_for_the_next():
    w = World(budget=6 * GiB, min_resident=5, swap_quantum=10, queue_timeout=100)
    w.add("a", 5 * GiB, parallel=1)
    w.add("b", 5 * GiB)
    w.start()
    a1, lease = w.running("a")
    a2 = w.admit("a")  # queued behind a1
    b = w.admit("b")
    w.settle()
    assert w.states() == {"a": "ready", "b": "stopped"} and a2 == [] and b == []
    w.reactor.advance(10)  # b's quantum is over: a is drained (takes nothing more), not cut
    assert w.fleet.runtime("a").gate.paused and w.states()["a"] == "ready"
    a3 = w.admit("a")
    w.done("a", lease)  # a1 ends: a2 does not get the slot, a stops
    assert a2 == [] and a3 == []
    w.settle()
    w.settle()
    assert w.states() == {"a": "stopped", "b": "ready"} and isinstance(b[0], Lease)
    assert w.swaps == [("a", "b")]
    # a's queued requests now wait for a's next turn, which comes after b's.
    assert not w.fleet.runtime("a").gate.paused and "a" in w.fleet.waiting()
    w.use("b", b)
    w.reactor.advance(10)
    assert w.fleet.runtime("b").gate.paused
    w.done("b", b[0])
    w.settle()
    w.settle()
    assert w.states() == {"a": "ready", "b": "stopped"} and isinstance(a2[0], Lease)
    assert w.swaps == [("a", "b"), ("b", "a")]


def test_a_wait_is_logged_once_not_at_every_request_of_the_busy_model():
    lines: list[str] = []

    def observe(event: dict) -> None:
        if "waits:" in formatEvent(event):
            lines.append(formatEvent(event))

    w = World(budget=6 * GiB, swap_quantum=100, queue_timeout=100)
    w.add("a", 5 * GiB, parallel=2)
    w.add("b", 5 * GiB)
    w.start()
    globalLogPublisher.addObserver(observe)
    try:
        a1, lease1 = w.running("a")
        b = w.admit("b")
        w.settle()
        for _ in range(3):  # a's counts change with each request; b's wait does not
            a2 = w.admit("a")
            lease2 = w.use("a", a2)
            w.reactor.advance(1)
            w.done("a", lease2)
        w.done("a", lease1)
        w.settle()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert isinstance(b[0], Lease)
    assert lines == ["model b waits: needs 5.0 GiB, 1.0 GiB free of 6.0 GiB; busy: a (1 in flight)",
                     "model b waits: waiting for a to stop (needs 5.0 GiB)"]


def test_a_drain_is_called_off_when_the_waiter_gives_up():
    w = World(budget=6 * GiB, swap_quantum=10, queue_timeout=12)
    w.add("a", 5 * GiB, parallel=1)
    w.add("b", 5 * GiB)
    w.start()
    a1, lease = w.running("a")
    b = w.admit("b")
    w.settle()
    w.reactor.advance(10)
    assert w.fleet.runtime("a").gate.paused
    a2 = w.admit("a")
    w.reactor.advance(2)  # b's request times out: nobody waits for a's memory any more
    assert b[0].value.code == "queue_timeout"
    w.done("a", lease)
    w.settle()
    assert w.states() == {"a": "ready", "b": "stopped"}
    assert not w.fleet.runtime("a").gate.paused and isinstance(a2[0], Lease)


def test_a_crashed_model_restarts_in_its_reserved_memory():
    w = World(budget=8 * GiB)
    w.add("a", 5 * GiB, preload=True)
    w.add("b", 5 * GiB)
    w.start()
    w.settle()
    w.sups["a"].process.exit(None, signal.SIGKILL)
    b = w.admit("b")  # a is in backoff: its memory stays reserved
    w.settle()
    assert w.states()["b"] == "stopped" and b == []
    w.reactor.advance(1.0)
    w.settle()
    w.settle()
    # a came back (a second child), idle: the request waiting for b since before then gets its memory.
    assert w.sups["a"].generation == 2 and w.swaps == [("a", "b")]
    assert w.states() == {"a": "stopped", "b": "ready"} and isinstance(b[0], Lease)


def test_an_estimated_need_is_corrected_by_what_the_child_was_measured_to_use():
    from llamad.fleet.fleet import MEASURE_INTERVAL

    seen: list[list[int]] = []

    def measure(pids: list[int]):
        seen.append(pids)
        return defer.succeed({pid: 3 * GiB for pid in pids})

    w = World(budget=10 * GiB)
    w.fleet.measure = measure
    w.add("a", 1 * GiB, preload=True, estimated=True)  # from the GGUF
    w.add("b", 1 * GiB, preload=True)  # an explicit memory: never corrected
    w.start()
    w.settle()
    w.reactor.advance(MEASURE_INTERVAL)
    assert seen == [[w.sups["a"].pid]]
    assert {m.id: m.need for m in w.fleet.models.values()} == {"a": memory.corrected_need(1 * GiB, 3 * GiB),
                                                                "b": 1 * GiB}
    assert w.fleet.models["a"].need > 3 * GiB
    w.fleet.stopService()
    w.reactor.advance(MEASURE_INTERVAL * 3)
    assert len(seen) == 1  # no measuring after the stop


def test_each_models_gate_counts_into_its_own_labelled_series():
    from llamad.metrics import Metrics

    metrics = Metrics(per_model=True)
    a, b = metrics.for_model("a"), metrics.for_model("b")
    a.queue_depth.set(3)
    b.queue_rejections.labels("queue_full").inc()
    a.set_backend_state(State.READY)
    value = metrics.registry.get_sample_value
    assert value("llamad_queue_depth", {"model": "a"}) == 3 and value("llamad_queue_depth", {"model": "b"}) == 0
    assert value("llamad_queue_rejections_total", {"model": "b", "reason": "queue_full"}) == 1
    assert value("llamad_backend_state", {"model": "a", "state": "ready"}) == 1
    assert value("llamad_backend_state", {"model": "b", "state": "stopped"}) == 1
    single = Metrics()
    assert single.for_model("demo") is single  # one model: today's series, no label


def test_a_request_that_arrives_while_its_model_is_being_evicted_waits_and_is_served():
    w = World(budget=6 * GiB)
    w.add("a", 5 * GiB, preload=True)
    w.add("b", 5 * GiB)
    w.start()
    w.settle()
    b = w.admit("b")  # a is idle: it is stopped to make room for b
    assert w.sups["a"].state == State.STOPPING
    w.reactor.advance(1)
    a = w.admit("a")  # ... and a request for a arrives before it is gone
    w.settle()
    assert a == [] and isinstance(b[0], Lease)  # a's request waits; the stop did not fail it
    lease = w.use("b", b)
    w.done("b", lease)
    w.settle()
    w.settle()
    assert isinstance(a[0], Lease) and w.states() == {"a": "ready", "b": "stopped"}


def test_a_higher_class_gets_room_first_across_models():
    """Room for one model at a time: b waits from t=0 (level 0), c from t=5 with a 30 s head start:
    when a's request ends, c starts first; b later, after c's request."""
    w = World(budget=5 * GiB, queue_timeout=600)
    w.start_with("abc", 5 * GiB)
    a, lease = w.running("a")
    b = w.admit("b")
    w.reactor.advance(5)
    c: list = []
    defer.ensureDeferred(w.fleet.runtime("c").gate.admit(head_start=30.0)).addBoth(c.append)
    w.settle()
    assert w.states()["a"] == "ready" and b == [] and c == []  # a is busy: nobody gets room
    w.done("a", lease)
    w.settle()
    assert w.states() == {"a": "stopped", "b": "stopped", "c": "ready"} and isinstance(c[0], Lease)
    w.done("c", w.use("c", c))
    w.settle()
    assert w.states()["b"] == "ready" and isinstance(b[0], Lease)


def test_a_forced_unload_during_the_start_leaves_its_waiting_requests_waiting_for_the_next_start():
    w = World(budget=6 * GiB)
    w.add("a", 5 * GiB, parallel=2)
    w.start()
    first, second = w.admit("a"), w.admit("a")
    assert w.states() == {"a": "starting"}
    w.fleet.unload("a", force=True)
    assert w.states() == {"a": "stopping"} and first == [] and second == []
    w.settle()
    w.settle()
    assert w.states() == {"a": "ready"} and w.sups["a"].generation == 2
    assert isinstance(first[0], Lease) and isinstance(second[0], Lease)


def test_a_model_that_fails_to_start_gives_its_room_back_while_it_would_back_off():
    w = World(budget=None, max_loaded=1)
    w.add("bad", GiB)
    w.add("good", GiB)
    w.start()
    bad = w.admit("bad")
    assert w.states() == {"bad": "starting", "good": "stopped"}
    good = w.admit("good")  # no room: one model at a time
    w.sups["bad"].process.exit(1, None)  # not a GGUF: the child exits before it is ready
    assert bad[0].value.code == "backend_unavailable" and "exit" in bad[0].value.message
    w.reactor.advance(0)
    w.settle()
    assert w.states() == {"bad": "stopped", "good": "ready"} and isinstance(good[0], Lease)
    assert w.sups["bad"].process is None or w.sups["bad"].generation == 1  # not respawned on its own


def test_a_model_that_keeps_failing_to_start_becomes_failed_and_is_refused_at_once():
    w = World(budget=None, max_loaded=1)
    w.add("bad", GiB)
    w.start()
    limit = w.sups["bad"].config.crash_loop_limit
    for attempt in range(limit):
        outcome = w.admit("bad")
        w.sups["bad"].process.exit(1, None)
        w.reactor.advance(0)
        assert outcome[0].value.status == 503
    assert w.states() == {"bad": "failed"}
    refused = w.admit("bad")
    assert refused[0].value.code == "backend_failed"


def test_unloading_a_model_whose_asked_load_waits_for_room_calls_the_load_off():
    from llamad.gateway import models_api

    w = World(budget=None, max_loaded=1)
    w.add("a", GiB)
    w.add("b", GiB)
    w.start()
    a, lease = w.running("a")
    w.fleet.load("b")  # no room while a runs
    snapshot = next(s for s in w.fleet.model_snapshots(0) if s.id == "b")
    assert snapshot.waiting_for_room and models_api.unload_answer(snapshot)[0] == 200
    w.fleet.unload("b")
    w.done("a", lease)
    w.settle()
    assert w.states() == {"a": "ready", "b": "stopped"} and "b" not in w.fleet.waiting()


def test_a_model_whose_turn_is_over_at_once_still_runs_the_requests_it_was_loaded_for():
    """No minimum residency and no quantum: each turn still runs the requests admitted for it."""
    w = World(budget=6 * GiB, min_resident=0, swap_quantum=0, queue_timeout=100)
    w.add("a", 5 * GiB)
    w.add("b", 5 * GiB)
    w.start()
    a: list = []
    runtime = w.fleet.runtime("a")

    def running(lease: Lease) -> Lease:
        runtime.activity.begin(True)  # as the gateway does the moment it gets the slot
        return lease

    defer.ensureDeferred(runtime.gate.admit()).addCallback(running).addBoth(a.append)
    b = w.admit("b")  # waits for a's room while a loads
    w.settle()
    assert isinstance(a[0], Lease) and w.states()["a"] == "ready"  # not stopped before its request ran
    assert runtime.gate.paused  # b waits: a takes nothing more
    w.done("a", a[0])
    w.settle()
    w.settle()
    assert w.states() == {"a": "stopped", "b": "ready"} and isinstance(b[0], Lease)
