"""Admission: at most ``max_concurrent`` inference requests reach the child; the rest wait in line.

The line is FIFO, except that a key's priority class gives its requests a head
start (:mod:`llamad.keys.policy`): they queue as if they had arrived that much
earlier, so higher classes go first and nobody waits behind them forever.

:class:`AdmissionQueue` is the pure part (slots and the ordered tickets).  :class:`Gate`
adds the Deferreds, the timeout and the wait for a ready (or starting) child.
Nothing waits forever: a full queue answers 503 at once, and every wait ends at
``queue_timeout``.
"""

from __future__ import annotations

from bisect import insort
from itertools import count
from typing import Callable, Generic, Hashable, Literal, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from llamad.backends import Target
from llamad.errors import ApiError
from llamad.interfaces import Backend
from llamad.metrics import Metrics, ModelMetrics
from llamad.status import Status
from llamad.supervisor import StartFailed, State

T = TypeVar("T", bound=Hashable)

LOSS_GRACE = 2.0  # seconds for a child that closed a connection unanswered to be seen exiting


class AdmissionQueue(Generic[T]):
    """Slots in use and the tickets waiting for one, in order of rank, with no I/O."""

    def __init__(self, limit: int, max_queue: int) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.in_use = 0
        self._line: list[tuple[float, int, T]] = []  # (rank, arrival number, ticket), first served first
        self._numbers = count()
        self.paused = False  # slots are not handed out: everyone queues until :meth:`resume`

    @property
    def waiting(self) -> list[T]:
        return [ticket for _, _, ticket in self._line]

    @property
    def depth(self) -> int:
        return len(self._line)

    def take(self) -> bool:
        """A slot now, if one is free, nobody waits for one and the queue is not paused."""
        if self.in_use < self.limit and not self._line and not self.paused:
            self.in_use += 1
            return True
        return False

    def arrive(self, ticket: T, rank: float = 0.0) -> Literal["admitted", "queued", "full"]:
        """``rank``: the time it counts as arrived (its arrival minus its class's head start); equal
        ranks keep the order of arrival."""
        if self.take():
            return "admitted"
        if len(self._line) >= self.max_queue:
            return "full"
        insort(self._line, (rank, next(self._numbers), ticket), key=lambda entry: entry[:2])
        return "queued"

    def leave(self, ticket: T) -> None:
        """A waiter gives up (timeout or client gone)."""
        for i, entry in enumerate(self._line):
            if entry[2] == ticket:
                del self._line[i]
                return
        raise ValueError("not waiting")

    def release(self) -> T | None:
        """Free a slot; the next waiter, if any, takes it and is returned."""
        if self._line and not self.paused:
            return self._line.pop(0)[2]
        self.in_use -= 1
        return None

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> list[T]:
        """Hand out the slots freed while paused; the waiters that took one are returned, in order."""
        self.paused = False
        admitted = []
        while self._line and self.in_use < self.limit:
            self.in_use += 1
            admitted.append(self._line.pop(0)[2])
        return admitted

    def pop_all(self) -> list[T]:
        line, self._line = self._line, []
        return [ticket for _, _, ticket in line]


class Lease:
    """One admitted request's slot; ``release`` exactly once when it is done."""

    def __init__(self, gate: Gate | None, target: Target, started: float = 0.0) -> None:
        self.gate = gate
        self.target = target
        self.started = started  # arrival: queue_timeout counts from here, redeliveries included
        self.queue_wait = 0.0  # seconds from arrival to admission (cold start included)
        self.cold_wait: float | None = None  # seconds waited for the child to start, if it had to

    def release(self) -> None:
        if self.gate is not None:
            gate, self.gate = self.gate, None
            gate._release()


class Gate:
    def __init__(self, clock: IReactorTime, status: Status, backend: Backend | None, max_concurrent: int,
                 max_queue: int, queue_timeout: float, metrics: Metrics | ModelMetrics) -> None:
        self.clock = clock
        self.status = status
        self.backend = backend
        self.queue: AdmissionQueue[defer.Deferred[None]] = AdmissionQueue(max_concurrent, max_queue)
        self.queue_timeout = queue_timeout
        self.metrics = metrics
        self.starting_waiters = 0  # admitted requests waiting for the backend to be ready

    @property
    def waiting(self) -> int:
        """Requests that wait for this gate: queued for a slot, or holding one until the backend is ready."""
        return self.queue.depth + self.starting_waiters

    @property
    def ready(self) -> bool:
        return self.backend is not None and self.backend.state == State.READY

    def current_target(self) -> Target | None:
        """The child's address when it is ready; never starts it."""
        if self.backend is not None and self.backend.state == State.READY:
            return self.backend.target()
        return None

    def _refuse_early(self) -> Backend:
        if self.status.draining:
            raise ApiError(503, "llamad is shutting down", "shutting_down", {b"retry-after": b"5"})
        if self.backend is None:
            raise ApiError(503, "this llamad serves no model (backend.kind = \"none\")", "no_backend")
        if self.backend.state == State.FAILED:
            raise ApiError(503, f"backend failed: {self.backend.reason}", "backend_failed",
                           {b"retry-after": b"30"})
        return self.backend

    def ready_target(self) -> Target:
        """For non-inference routes: the ready child, never a start or a wait."""
        backend = self._refuse_early()
        if backend.state != State.READY:
            raise ApiError(503, f"backend not ready ({backend.state.value})", "backend_not_ready",
                           {b"retry-after": b"5"})
        return backend.target()

    def _reject(self, reason: str, err: ApiError) -> ApiError:
        self.metrics.queue_rejections.labels(reason).inc()
        return err

    def try_admit(self) -> Lease | None:
        """A slot at once when one is free, nobody waits and the backend is ready (most requests
        under normal load): no Deferred, no coroutine.  None: :meth:`admit` decides."""
        backend = self.backend
        if backend is None or backend.state != State.READY or self.status.draining or not self.queue.take():
            return None
        self.metrics.queue_wait.observe(0.0)
        return Lease(self, backend.target(), self.clock.seconds())

    async def admit(self, head_start: float = 0.0, started: float | None = None) -> Lease:
        """A slot and a ready child for one inference request, or an :class:`ApiError`.

        ``head_start``: seconds its priority class puts it ahead in line; ``started``: its arrival
        (queue_timeout counts from there; default now)."""
        backend = self._refuse_early()
        started = self.clock.seconds() if started is None else started
        rank = started - head_start
        cold = backend.state != State.READY
        ticket: defer.Deferred[None] = defer.Deferred(self.queue.leave)
        outcome = self.queue.arrive(ticket, rank)
        if outcome == "full":
            raise self._reject("queue_full", ApiError(
                503, f"server busy: {self.queue.max_queue} requests already waiting", "queue_full",
                {b"retry-after": b"1"}))
        lease = Lease(None, Target(b"", ""), started)  # holds the slot once admitted
        try:
            if outcome == "queued":
                self.metrics.queue_depth.set(self.queue.depth)
                try:
                    await self._bounded(ticket, started)
                finally:
                    self.metrics.queue_depth.set(self.queue.depth)
            lease.gate = self
            self._refuse_early()  # things may have changed while it waited
            if backend.state != State.READY:
                waiting = backend.wait_ready()
                if backend.state == State.STOPPED:
                    self.metrics.cold_starts.inc()  # this request starts the child
                await self._wait_for_start(waiting, started, lambda: backend.request_start(rank))
            if cold:
                # From arrival to the child's readiness, whether it waited in the queue or for the start.
                ready_at = backend.ready_at or self.clock.seconds()
                lease.cold_wait = max(0.0, ready_at - started)
                self.metrics.cold_start_wait.observe(lease.cold_wait)
            lease.queue_wait = self.clock.seconds() - started
            self.metrics.queue_wait.observe(lease.queue_wait)
            lease.target = backend.target()
            return lease
        except StartFailed as e:
            lease.release()
            raise self._start_failed(e) from None
        except BaseException:
            lease.release()
            raise

    def _start_failed(self, e: StartFailed) -> ApiError:
        return self._reject("start_failed", ApiError(503, f"backend start failed: {e}", "backend_unavailable",
                                                     {b"retry-after": b"5"}))

    def can_redeliver(self, lease: Lease) -> bool:
        """Only a supervised child is restarted; a request an external backend refused fails."""
        return lease.gate is self and lease.target.generation > 0

    async def redeliver(self, lease: Lease, unanswered: ApiError | None = None, grace: float = LOSS_GRACE) -> None:
        """The request goes, holding its slot, to the next child, within ``queue_timeout`` of its arrival.

        Without ``unanswered``: the child could not be reached and got none of
        it (it died and its exit is not seen yet, or it is restarting).  With
        ``unanswered``: the child took it and closed the connection without
        answering, as a dying child does (its listening socket accepts until the
        process is gone); if that child still serves ``grace`` seconds later,
        the close was its answer and ``unanswered`` is raised.
        """
        backend = self._refuse_early()
        generation = lease.target.generation
        waiting = backend.wait_ready(newer_than=generation)
        answered: list[bool] = []  # the child still served at the end of the grace

        def still_serving() -> None:
            if backend.state == State.READY and backend.target().generation == generation:
                answered.append(True)
                waiting.cancel()

        check = self.clock.callLater(grace, still_serving) if unanswered is not None else None
        try:
            await self._wait_for_start(waiting, lease.started)
        except defer.CancelledError:
            if answered and unanswered is not None:
                raise unanswered from None
            raise  # the client went away
        except StartFailed as e:
            raise self._start_failed(e) from None
        finally:
            if check is not None and check.active():
                check.cancel()
        self._refuse_early()
        lease.target = backend.target()

    async def _wait_for_start(self, d: defer.Deferred[None], started: float,
                              start: Callable[[], None] | None = None) -> None:
        """Ask for a start, then wait for the backend, counted: a fleet starts only models someone waits for."""
        self.starting_waiters += 1
        try:
            if start is not None:
                start()
            await self._bounded(d, started)
        finally:
            self.starting_waiters -= 1

    async def _bounded(self, d: defer.Deferred[None], started: float) -> None:
        """Wait for ``d`` until ``queue_timeout`` after ``started``."""
        if self.queue_timeout > 0:
            remaining = max(0.0, started + self.queue_timeout - self.clock.seconds())
            d.addTimeout(remaining, self.clock)
        try:
            await d
        except defer.TimeoutError:
            message = f"no capacity within queue_timeout ({self.queue_timeout:g} s)"
            waiting = self.backend is not None and self.backend.state != State.READY and self.backend.reason
            if waiting:
                message += f": {self.backend.reason}"  # e.g. a fleet's "needs 6.0 GiB, 2.5 GiB free ..."
            raise self._reject("queue_timeout", ApiError(503, message, "queue_timeout",
                                                         {b"retry-after": b"5"})) from None

    @property
    def paused(self) -> bool:
        return self.queue.paused

    def pause(self) -> None:
        """Admit nothing more (the fleet drains this model to give its memory to another): new and
        queued requests wait for the model's next turn; requests already admitted run to their end."""
        self.queue.pause()

    def resume(self) -> None:
        """Admit again: the requests that waited meanwhile take the free slots (a stopped child is
        started again for them)."""
        for ticket in self.queue.resume():
            ticket.callback(None)
        self.metrics.queue_depth.set(self.queue.depth)

    def refuse_waiting(self) -> None:
        """Shutdown: everyone still queued gets 503 now instead of a slot later."""
        for ticket in self.queue.pop_all():
            ticket.errback(ApiError(503, "llamad is shutting down", "shutting_down", {b"retry-after": b"5"}))
        self.metrics.queue_depth.set(0)

    def _release(self) -> None:
        following = self.queue.release()
        if following is not None:
            following.callback(None)
