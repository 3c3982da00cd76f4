"""Admission: the pure AdmissionQueue and the Gate, driven by a Clock and a fake backend."""

from __future__ import annotations

from fakes import FakeBackend
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from llamad.backends import Target
from llamad.errors import ApiError
from llamad.fleet.gate import AdmissionQueue, Gate, Lease
from llamad.metrics import Metrics
from llamad.status import Status
from llamad.supervisor import State

# --- AdmissionQueue -----------------------------------------------------------


def test_queue_admits_up_to_the_limit_then_queues_then_is_full():
    q: AdmissionQueue[str] = AdmissionQueue(limit=2, max_queue=2)
    assert [q.arrive(t) for t in "abcde"] == ["admitted", "admitted", "queued", "queued", "full"]
    assert q.in_use == 2 and list(q.waiting) == ["c", "d"]


def test_queue_release_hands_the_slot_to_waiters_in_order():
    q: AdmissionQueue[str] = AdmissionQueue(limit=1, max_queue=3)
    for t in "abcd":
        q.arrive(t)
    assert [q.release(), q.release(), q.release()] == ["b", "c", "d"]
    assert q.in_use == 1
    assert q.release() is None and q.in_use == 0


def test_queue_leave_removes_a_waiter_without_taking_a_slot():
    q: AdmissionQueue[str] = AdmissionQueue(limit=1, max_queue=3)
    for t in "abc":
        q.arrive(t)
    q.leave("b")
    assert q.release() == "c" and q.in_use == 1
    assert q.release() is None and q.in_use == 0


def test_queue_is_fifo_even_when_a_slot_is_free():
    """A newcomer never overtakes someone already waiting."""
    q: AdmissionQueue[str] = AdmissionQueue(limit=1, max_queue=2)
    q.arrive("a")
    q.arrive("b")
    q.in_use = 0  # a slot frees up without a hand-over
    assert q.arrive("c") == "queued" and list(q.waiting) == ["b", "c"]


# --- Gate ---------------------------------------------------------------------


def make(state: State = State.READY, max_concurrent: int = 2, max_queue: int = 2, timeout: float = 10):
    clock = Clock()
    backend = FakeBackend(state, follows_starts=True)
    metrics = Metrics()
    gate = Gate(clock, Status(clock, backend, "m", lazy=True), backend, max_concurrent, max_queue, timeout, metrics)
    return gate, clock, backend, metrics


class Admission:
    """One ``gate.admit()`` in flight, with its outcome once it has one."""

    def __init__(self, gate: Gate) -> None:
        self.d = defer.ensureDeferred(gate.admit())
        self.result: Lease | Failure | None = None
        self.d.addBoth(self._done)

    def _done(self, result) -> None:
        self.result = result  # and return None: handled, so no "unhandled error" noise

    @property
    def lease(self) -> Lease:
        assert isinstance(self.result, Lease), self.result
        return self.result

    def error(self) -> ApiError:
        assert isinstance(self.result, Failure), self.result
        return self.result.value


def sample(metrics: Metrics, name: str, labels: dict | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_at_most_max_concurrent_admitted_rest_admitted_fifo_as_leases_are_released():
    gate, clock, backend, metrics = make(max_concurrent=2, max_queue=5)
    calls = [Admission(gate) for _ in range(5)]
    assert [c.result is not None for c in calls] == [True, True, False, False, False]
    assert sample(metrics, "llamad_queue_depth") == 3
    calls[1].lease.release()
    assert [c.result is not None for c in calls[2:]] == [True, False, False]
    calls[0].lease.release()
    assert calls[3].result is not None and calls[4].result is None
    calls[3].lease.release()
    assert isinstance(calls[4].result, Lease) and calls[4].lease.target == backend.target()
    assert gate.queue.in_use == 2 and sample(metrics, "llamad_queue_depth") == 0


def test_a_lease_released_twice_frees_one_slot():
    gate, clock, backend, metrics = make(max_concurrent=1, max_queue=2)
    first = Admission(gate)
    second, third = Admission(gate), Admission(gate)
    first.lease.release()
    first.lease.release()
    assert isinstance(second.result, Lease) and third.result is None


def test_full_queue_is_503_queue_full_with_retry_after():
    gate, clock, backend, metrics = make(max_concurrent=1, max_queue=1)
    Admission(gate), Admission(gate)
    rejected = Admission(gate)
    err = rejected.error()
    assert (err.status, err.code) == (503, "queue_full")
    assert err.headers[b"retry-after"].isdigit()
    assert sample(metrics, "llamad_queue_rejections_total", {"reason": "queue_full"}) == 1
    assert len(gate.queue.waiting) == 1


def test_waiting_past_queue_timeout_is_503_and_leaves_the_queue():
    gate, clock, backend, metrics = make(max_concurrent=1, max_queue=3, timeout=5)
    holder = Admission(gate)
    clock.advance(1)
    late = Admission(gate)
    clock.advance(2)
    later = Admission(gate)
    clock.advance(2.999)
    assert late.result is None
    clock.advance(0.001)  # 5 s after `late` arrived; `later` has waited 3 s
    err = late.error()
    assert (err.status, err.code) == (503, "queue_timeout")
    assert sample(metrics, "llamad_queue_rejections_total", {"reason": "queue_timeout"}) == 1
    assert len(gate.queue.waiting) == 1 and sample(metrics, "llamad_queue_depth") == 1
    holder.lease.release()  # goes to `later`, not to the one that gave up
    assert isinstance(later.result, Lease)
    later.lease.release()
    assert gate.queue.in_use == 0 and not gate.queue.waiting
    assert sample(metrics, "llamad_queue_depth") == 0


def test_timed_out_waiter_never_gets_a_slot_later():
    gate, clock, backend, metrics = make(max_concurrent=1, max_queue=3, timeout=5)
    holder = Admission(gate)
    late = Admission(gate)
    clock.advance(5)
    assert late.error().code == "queue_timeout"
    assert sample(metrics, "llamad_queue_depth") == 0
    holder.lease.release()
    assert gate.queue.in_use == 0 and not gate.queue.waiting
    assert not clock.getDelayedCalls()


def test_cancelled_waiter_leaves_at_once_and_takes_no_slot():
    gate, clock, backend, metrics = make(max_concurrent=1, max_queue=3)
    holder = Admission(gate)
    gone, next_one = Admission(gate), Admission(gate)
    gone.d.cancel()  # client disconnected
    assert isinstance(gone.result, Failure) and gone.result.check(defer.CancelledError)
    assert len(gate.queue.waiting) == 1 and sample(metrics, "llamad_queue_depth") == 1
    holder.lease.release()
    assert isinstance(next_one.result, Lease)
    next_one.lease.release()
    assert gate.queue.in_use == 0
    assert not clock.getDelayedCalls()  # its timeout was cancelled too


def test_draining_is_503_shutting_down():
    gate, clock, backend, metrics = make()
    gate.status.draining = True
    err = Admission(gate).error()
    assert (err.status, err.code) == (503, "shutting_down")
    assert gate.queue.in_use == 0


def test_draining_while_queued_refuses_and_passes_the_slot_on():
    gate, clock, backend, metrics = make(max_concurrent=1, max_queue=2)
    holder = Admission(gate)
    queued = Admission(gate)
    gate.status.draining = True
    holder.lease.release()
    assert queued.error().code == "shutting_down"
    assert gate.queue.in_use == 0


def test_failed_backend_is_503_with_the_reason():
    gate, clock, backend, metrics = make(State.FAILED)
    backend.reason = "exited with code 1"
    err = Admission(gate).error()
    assert err.status == 503 and "exited with code 1" in err.message
    assert gate.queue.in_use == 0


def test_stopped_backend_one_shared_start_then_all_proceed():
    gate, clock, backend, metrics = make(State.STOPPED, max_concurrent=2, max_queue=2)
    calls = [Admission(gate) for _ in range(3)]
    assert backend.spawns == 1 and backend.state == State.STARTING
    assert backend.start_requests >= 1 and len(backend.waiters) == 2  # the third waits for a slot
    assert all(c.result is None for c in calls)
    clock.advance(3)
    backend.ready()
    assert isinstance(calls[0].result, Lease) and isinstance(calls[1].result, Lease) and calls[2].result is None
    assert sample(metrics, "llamad_queue_wait_seconds_sum") == 6
    calls[0].lease.release()
    assert isinstance(calls[2].result, Lease)
    assert backend.spawns == 1


def test_start_failure_is_503_and_frees_the_slot():
    gate, clock, backend, metrics = make(State.STOPPED, max_concurrent=1, max_queue=2)
    first, second = Admission(gate), Admission(gate)
    backend.fail("exited with code 1")
    err = first.error()
    assert err.status == 503 and "exited with code 1" in err.message
    assert sample(metrics, "llamad_queue_rejections_total", {"reason": "start_failed"}) == 1
    # The slot went on to the second, which then sees the failed backend.
    assert second.error().code == "backend_failed"
    assert gate.queue.in_use == 0 and not gate.queue.waiting


def test_cold_start_longer_than_queue_timeout_is_503_and_frees_the_slot():
    gate, clock, backend, metrics = make(State.STOPPED, max_concurrent=1, max_queue=2, timeout=5)
    first = Admission(gate)
    clock.advance(5)
    assert first.error().code == "queue_timeout"
    assert backend.waiters == [] and gate.queue.in_use == 0
    backend.ready()  # the start itself goes on
    assert isinstance(Admission(gate).result, Lease)


def test_disconnect_during_cold_start_does_not_cancel_the_start():
    gate, clock, backend, metrics = make(State.STOPPED, max_concurrent=1, max_queue=2)
    first = Admission(gate)
    second = Admission(gate)
    first.d.cancel()
    assert backend.state == State.STARTING and gate.queue.in_use == 1  # the slot went to `second`
    backend.ready()
    assert isinstance(second.result, Lease)


def _serving_supervisor():
    """A supervised child, ready, behind a gate of one slot."""
    from fakes import FakeProbe, FakeProcessReactor
    from llamad.config import BackendConfig, SupervisorConfig
    from llamad.supervisor import PROBE_INTERVAL, Supervisor

    reactor = FakeProcessReactor()
    probe = FakeProbe()
    probe.status = 200
    sup = Supervisor(reactor, reactor, BackendConfig(model="/m/demo.gguf"), SupervisorConfig(), probe=probe,
                     key="k", new_session=False, random=lambda: 1.0, base_env={})
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    gate = Gate(reactor, Status(reactor, sup, "m", lazy=False), sup, 1, 4, 30, Metrics())
    return reactor, sup, gate


def test_a_request_the_dead_child_never_got_keeps_its_slot_and_goes_to_the_restarted_child():
    """A child crash frees slots before its exit is seen: requests sent then are refused, not lost."""
    import signal

    from llamad.supervisor import PROBE_INTERVAL

    reactor, sup, gate = _serving_supervisor()
    first = Admission(gate)
    queued = Admission(gate)
    assert first.result is not None and queued.result is None
    old = first.lease.target.generation
    assert gate.can_redeliver(first.lease)
    # The proxy got "connection refused": the lease waits for the next child, holding its slot.
    again = defer.ensureDeferred(gate.redeliver(first.lease))
    assert not again.called and queued.result is None
    reactor.last.exit(None, signal.SIGKILL)
    reactor.advance(1.0)
    reactor.advance(PROBE_INTERVAL)
    assert again.called and first.lease.target.generation == old + 1
    first.lease.release()
    assert isinstance(queued.result, Lease)


def test_redelivery_ends_at_queue_timeout_counted_from_arrival():
    import signal

    from fakes import FakeProbe, FakeProcessReactor
    from llamad.config import BackendConfig, SupervisorConfig
    from llamad.supervisor import PROBE_INTERVAL, Supervisor

    reactor = FakeProcessReactor()
    probe = FakeProbe()
    probe.status = 200
    sup = Supervisor(reactor, reactor, BackendConfig(model="/m/demo.gguf"), SupervisorConfig(backoff_initial=50),
                     probe=probe, key="k", new_session=False, random=lambda: 1.0, base_env={})
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    gate = Gate(reactor, Status(reactor, sup, "m", lazy=False), sup, 1, 4, 30, Metrics())
    admitted = Admission(gate)
    reactor.advance(20)
    outcome: list = []
    defer.ensureDeferred(gate.redeliver(admitted.lease)).addBoth(outcome.append)
    reactor.last.exit(None, signal.SIGKILL)  # the restart is 50 s away
    reactor.advance(9.9)
    assert outcome == []
    reactor.advance(0.1)
    assert outcome[0].value.code == "queue_timeout"
    external = Lease(gate, Target(b"http://127.0.0.1:9", ""))
    assert not gate.can_redeliver(external)  # nobody restarts an external backend


def test_a_request_closed_unanswered_by_a_child_that_then_exits_goes_to_the_next_child():
    import signal

    from llamad.fleet.gate import LOSS_GRACE
    from llamad.supervisor import PROBE_INTERVAL

    reactor, sup, gate = _serving_supervisor()
    first = Admission(gate)
    old = first.lease.target.generation
    unanswered = ApiError(502, "backend unreachable: upstream closed the connection", "backend_unreachable")
    outcome: list = []
    defer.ensureDeferred(gate.redeliver(first.lease, unanswered)).addBoth(outcome.append)
    reactor.advance(LOSS_GRACE / 2)
    reactor.last.exit(None, signal.SIGKILL)  # its exit is seen within the grace
    reactor.advance(1.0)
    reactor.advance(PROBE_INTERVAL)
    assert outcome == [None] and first.lease.target.generation == old + 1


def test_a_request_closed_unanswered_by_a_child_that_lives_on_fails_after_the_grace():
    from llamad.fleet.gate import LOSS_GRACE

    reactor, sup, gate = _serving_supervisor()
    first = Admission(gate)
    unanswered = ApiError(502, "backend unreachable: upstream closed the connection", "backend_unreachable")
    outcome: list = []
    defer.ensureDeferred(gate.redeliver(first.lease, unanswered)).addBoth(outcome.append)
    reactor.advance(LOSS_GRACE - 0.1)
    assert outcome == []
    reactor.advance(0.2)
    assert outcome[0].value is unanswered
    assert gate.starting_waiters == 0
