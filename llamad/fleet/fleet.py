# -*- test-case-name: tests.unit.test_fleet -*-
"""The models llamad serves, and where they fit: the one place that starts and stops their children.

A model's gate never starts its child itself: it asks the fleet (through
:class:`FleetBackend`), which records how long the model has been waited for and
runs :func:`llamad.fleet.placement.place` over every model.  The fleet performs the
plan: it unloads idle models to make room, drains a model whose turn is over
(its gate admits nothing more until it is stopped, then its queued requests ask
for its next turn), starts the ones that fit, and looks again whenever a child
changes state, a request begins or ends, or a turn runs out.  Requests for a
model that does not fit wait in that model's gate, bounded by ``queue_timeout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llamad.backends import Target
from llamad.fleet import memory, placement
from llamad.fleet.runtime import ModelRuntime
from llamad.interfaces import Backend
from llamad.supervisor import State
from llamad.timers import cancel

log = Logger(namespace="llamad.fleet.fleet")

MEASURE_INTERVAL = 10.0  # seconds between measurements of the loaded models' memory
Measure = Callable[[list[int]], "defer.Deferred[dict[int, int] | None]"]

BackendState = Literal["stopped", "starting", "ready", "stopping", "backoff", "failed"]


@dataclass(frozen=True)
class ModelSnapshot:
    """One configured model at one instant, as the models API (llama-server's router API) shows it.

    ``args`` is the child's argv without secrets (no API key); ``memory_need`` is
    bytes while loaded; ``last_used`` is wall-clock seconds or None if never used;
    ``created`` is the Unix time shown as OpenAI's ``created``.  ``meta`` is the
    child's own facts (see :func:`child_meta`), ``source`` the router's word for
    where the model came from: "models_dir" for a GGUF found in
    ``fleet.models_dir``, "preset" for a ``[models.<id>]`` table.
    """

    id: str
    state: BackendState
    path: str
    created: int
    aliases: tuple[str, ...] = ()
    reason: str = ""
    exit_code: int | None = None
    pid: int | None = None
    memory_need: int = 0
    last_used: float | None = None
    in_flight: int = 0
    queued: int = 0
    args: tuple[str, ...] = ()
    meta: Mapping[str, Any] | None = None
    source: Literal["models_dir", "preset"] = "preset"
    input_modalities: tuple[str, ...] = ("text",)
    waiting_for_room: bool = False  # a load (asked, or for requests) waits for memory
    kv: Mapping[str, int] | None = None  # its saved KV cache (slots, tokens, bytes); None: not kept


# How placement sees each backend state: a child restarting after a crash keeps its memory reserved.
PLACEMENT_STATE: dict[State, placement.State] = {
    State.STOPPED: "unloaded",
    State.STARTING: "loading",
    State.BACKOFF: "loading",
    State.READY: "loaded",
    State.STOPPING: "stopping",
    State.FAILED: "failed",
}


@dataclass(eq=False)
class FleetModel:
    """One model as the fleet keeps it: its runtime, what it needs, and where it stands in placement."""

    runtime: ModelRuntime
    need: int  # bytes while loaded: the configured or estimated need, corrected by measurement
    estimate: int | None = None  # the need came from the GGUF: a measurement corrects it
    measured: int = 0  # the most it was seen to use while it ran
    path: str = ""
    aliases: tuple[str, ...] = ()
    scanned: bool = False  # found in fleet.models_dir
    pinned: bool = False
    preload: bool = False
    asked: bool = False  # POST /models/load asked for it (not a waiting request)
    unload_when_idle: bool = False  # POST /models/unload waits for its requests to end
    waiting_since: float | None = None  # wants room: since its most urgent request (or preload)
    blocked: str = ""  # why it waits, from the last plan
    turn_ended: float | None = None  # drained: its queued requests wait from then

    @property
    def id(self) -> str:
        return self.runtime.id

    @property
    def idle(self) -> bool:
        return self.runtime.activity.inference_in_flight == 0 and self.runtime.gate.waiting == 0


class Fleet(MultiService):
    """Runs :func:`placement.place` over the models and performs its plan.

    :param clock: timers (turns running out); a ``Clock`` in tests.
    :param budget: bytes all loaded models may take together; None: no memory limit.
    :param max_loaded: models loaded at once; 0: no limit.
    :param min_resident: seconds a loaded model with requests keeps its memory at least (an idle one
        gives way at once).
    :param swap_quantum: seconds a model with requests keeps its memory after another model began to
        wait for room; then it is drained and stopped.
    :param on_swap: called with (unloaded model, the model it made room for) for each eviction.
    :param measure: ``measure(pids)`` fires with the bytes each process uses (GPU memory from
        ``nvidia-smi``, or RSS); every ``MEASURE_INTERVAL`` the loaded models are measured, and an
        estimated need becomes the most seen plus a margin.
    """

    name = "fleet"

    def __init__(self, clock: IReactorTime, budget: int | None, max_loaded: int = 0, min_resident: float = 0.0,
                 on_swap: Callable[[str, str], None] | None = None, measure: Measure | None = None,
                 swap_quantum: float = math.inf) -> None:
        super().__init__()
        self.clock = clock
        self.budget = budget
        self.max_loaded = max_loaded
        self.min_resident = min_resident
        self.swap_quantum = swap_quantum
        self.on_swap = on_swap
        self.measure = measure
        self.models: dict[str, FleetModel] = {}
        self.swaps = 0
        self._measure_call: IDelayedCall | None = None
        self._wake: IDelayedCall | None = None
        self._placing = False
        self._again = False
        self._booting = False

    def add(self, runtime: ModelRuntime, need: int, pinned: bool = False, preload: bool = False,
            path: str = "", aliases: tuple[str, ...] = (), scanned: bool = False, estimated: bool = False) -> None:
        """Take ``runtime`` into the fleet; its ``backend`` is the real one (its gate holds a :class:`FleetBackend`).

        ``estimated``: ``need`` is an estimate from the GGUF, to be corrected by measurement.
        """
        model = FleetModel(runtime, need, estimate=need if estimated else None, path=path, aliases=aliases,
                           scanned=scanned, pinned=pinned, preload=preload)
        self.models[model.id] = model
        if runtime.backend is not None:
            runtime.backend.add_listener(lambda before, after: self._changed(model, before, after))
        runtime.activity.on_change(self._activity_changed)

    def runtime(self, model_id: str) -> ModelRuntime:
        return self.models[model_id].runtime

    def waiting(self) -> dict[str, str]:
        """The models that wait for room, each with why."""
        return {m.id: m.blocked or "starting" for m in self.models.values() if m.waiting_since is not None}

    def startService(self) -> None:
        super().startService()
        now = self.clock.seconds()
        preloads = [m for m in self.models.values() if m.preload]
        for model in preloads:
            model.waiting_since = now if model.waiting_since is None else model.waiting_since
        self._booting = True
        try:
            self.place()
        finally:
            self._booting = False
        if self.measure is not None and any(m.estimate is not None for m in self.models.values()):
            self._measure_call = self.clock.callLater(MEASURE_INTERVAL, self._measure_loaded)
        for model in preloads:
            if model.waiting_since is not None:
                # A preload is no request: it takes free room at boot, and never evicts a model later.
                log.warn("preload of model {model} skipped: {reason}", model=model.id,
                         reason=model.blocked or "no room")
                model.waiting_since = None
                model.blocked = ""

    def stopService(self) -> Any:
        self._wake = cancel(self._wake)
        self._measure_call = cancel(self._measure_call)
        return super().stopService()

    def want(self, model_id: str, since: float | None = None) -> None:
        """A request needs ``model_id`` up: it waits until it fits.  Models get room in the order of
        their most urgent request: the earliest ``since`` (default now; a priority class moves it earlier)."""
        model = self.models[model_id]
        backend = model.runtime.backend
        if backend is None or backend.state in (State.STARTING, State.READY, State.BACKOFF):
            return  # up, or on its way up: its memory is already held
        since = self.clock.seconds() if since is None else since
        if model.turn_ended is not None:
            # Requests left queued by a drain wait from the drain's end, behind the model it made room for.
            since = max(since, model.turn_ended)
        if model.waiting_since is None or since < model.waiting_since:
            model.waiting_since = since
        self.place()

    def _measure_loaded(self) -> None:
        """Measure the loaded models whose need is an estimate; the next placement uses what was seen."""
        self._measure_call = None
        pids: dict[int, FleetModel] = {}
        for model in self.models.values():
            backend = model.runtime.backend
            if model.estimate is None or backend is None or backend.state != State.READY:
                continue
            pid = backend.snapshot().get("pid")
            if pid:
                pids[pid] = model
        d = self.measure(list(pids)) if pids and self.measure is not None else defer.succeed({})

        def seen(by_pid: dict[int, int] | None) -> None:
            for pid, used in (by_pid or {}).items():
                model = pids.get(pid)
                if model is None or not used or model.estimate is None:
                    continue
                model.measured = max(used, model.measured)
                need = memory.corrected_need(model.estimate, model.measured)
                if need != model.need:
                    log.info("model {model}: measured {used}, needs {need} from now on (estimate {estimate})",
                             model=model.id, used=placement.format_bytes(used), need=placement.format_bytes(need),
                             estimate=placement.format_bytes(model.estimate))
                    model.need = need

        d.addCallback(seen)
        d.addErrback(lambda failure: log.debug("measuring models failed: {f}", f=failure.getErrorMessage()))
        d.addBoth(lambda _: self._next_measure())

    def _next_measure(self) -> None:
        if self.running:
            self._measure_call = self.clock.callLater(MEASURE_INTERVAL, self._measure_loaded)

    def load(self, model_id: str) -> None:
        """``POST /models/load``: start it as if a request waited for it (it may evict idle models)."""
        model = self.models[model_id]
        model.asked = True
        model.unload_when_idle = False
        self.want(model_id)

    def unload(self, model_id: str, force: bool = False) -> None:
        """``POST /models/unload``: stop it once its requests are done (``force``: now, cutting them).
        A load waiting for room is called off, unless requests wait for it (they keep their place)."""
        model = self.models[model_id]
        model.asked = False
        if model.runtime.gate.waiting == 0:
            model.waiting_since, model.blocked = None, ""  # a load asked for and waiting for room: called off
        if force or model.idle:
            model.unload_when_idle = False
            if model.runtime.backend is not None:
                model.runtime.backend.unload()
        else:
            model.unload_when_idle = True

    def _activity_changed(self) -> None:
        """A request began or ended.  That changes a plan only while a model waits for room (a busy
        model cannot be evicted, an idle one can) or an unload waits for its model to be idle; the
        rest of the time placement is not run twice per request."""
        if any(m.waiting_since is not None or m.unload_when_idle for m in self.models.values()):
            self.place()

    def _changed(self, model: FleetModel, before: State, after: State) -> None:
        if after in (State.STARTING, State.READY, State.FAILED):
            # Started (or given up on): no longer waiting for room.
            model.waiting_since, model.blocked, model.asked = None, "", False
        if after == State.STARTING:
            model.turn_ended = None
        if before == State.STARTING and after == State.BACKOFF and (self.budget is not None or self.max_loaded):
            # A start that failed (its waiting requests are told why): where room is limited, it holds
            # none while it would back off.  The next request starts it again, and crash_loop_limit
            # failures make it failed.  With no limit (one model) its supervisor backs off and retries.
            log.warn("model {model} failed to start: {reason}; it gives its room back until asked again",
                     model=model.id, reason=model.runtime.backend.reason if model.runtime.backend else "")
            self.clock.callLater(0, self._give_up_start, model)
        gate = model.runtime.gate
        if after in (State.STOPPED, State.FAILED) and gate.paused:
            model.turn_ended = self.clock.seconds()
            gate.resume()  # drained and stopped: what queued meanwhile asks for its next turn
        if (after == State.STOPPED and before == State.STOPPING and gate.starting_waiters
                and model.waiting_since is None):
            # Stopped while requests waited for its start (an unload during the load): they still wait.
            self.want(model.id)
            return
        self.place()

    @staticmethod
    def _give_up_start(model: FleetModel) -> None:
        backend = model.runtime.backend
        if backend is not None and backend.state == State.BACKOFF:
            backend.unload()

    def views(self) -> list[placement.ModelView]:
        """Every model as placement sees it, from memory only."""
        views = []
        for model in self.models.values():
            runtime = model.runtime
            backend = runtime.backend
            if backend is None:
                continue
            # Requests admitted while it loaded are on their way to the child as it becomes ready: they
            # count as running, so a turn that is already over drains the model instead of stopping it.
            admitted = runtime.gate.starting_waiters if backend.state == State.READY else 0
            views.append(placement.ModelView(
                id=model.id,
                need=model.need,
                state=PLACEMENT_STATE[backend.state],
                pinned=model.pinned,
                in_flight=runtime.activity.inference_in_flight + admitted,
                queued=runtime.gate.waiting - admitted,
                last_used=runtime.activity.last_activity,
                loaded_at=backend.ready_at,
                waiting_since=model.waiting_since,
            ))
        return views

    def place(self) -> None:
        """Plan and act; re-entrant calls (a stop changes a state) run once more after this one."""
        if not self.running:
            return  # startService places once everything is added
        if self._placing:
            self._again = True
            return
        self._placing = True
        try:
            self._again = True
            while self._again:
                self._again = False
                self._place_once()
        finally:
            self._placing = False

    def _place_once(self) -> None:
        for model in self.models.values():
            if model.unload_when_idle and model.idle:
                model.unload_when_idle = False
                if model.runtime.backend is not None:
                    model.runtime.backend.unload()
        for model in self.models.values():
            if (model.waiting_since is not None and not self._booting and not model.asked
                    and model.runtime.gate.waiting == 0):
                model.waiting_since = None  # everyone who waited for it gave up
        now = self.clock.seconds()
        plan = placement.place(self.views(), self.budget, self.max_loaded, self.min_resident, now,
                               swap_quantum=self.swap_quantum)
        for model in self.models.values():
            reason = plan.blocked.get(model.id, "")
            if reason and reason != model.blocked and (
                    placement.without_counts(reason) != placement.without_counts(model.blocked)):
                log.info("model {model} waits: {reason}", model=model.id, reason=reason)
            model.blocked = reason
        for model_id in plan.stop:
            for_model = plan.evicted_for.get(model_id, "")
            log.info("unloading model {model} to make room for {other}", model=model_id, other=for_model or "?")
            self.swaps += 1
            if self.on_swap is not None:
                self.on_swap(model_id, for_model)
            runtime = self.models[model_id].runtime
            assert runtime.backend is not None
            if runtime.gate.waiting:
                runtime.gate.pause()  # its turn is over: what it has queued waits for the next one
            runtime.backend.unload()
        for model_id in plan.drain:
            gate = self.models[model_id].runtime.gate
            if not gate.paused:
                log.info("draining model {model} to make room for {other}: its turn is over",
                         model=model_id, other=plan.evicted_for.get(model_id, "?"))
                gate.pause()
        for model in self.models.values():
            backend, gate = model.runtime.backend, model.runtime.gate
            if gate.paused and model.id not in plan.drain and backend is not None and backend.state == State.READY:
                gate.resume()  # the model it was drained for no longer waits
        for model_id in plan.start:
            backend = self.models[model_id].runtime.backend
            assert backend is not None
            log.info("starting model {model}", model=model_id)
            backend.request_start()
        self._wake = cancel(self._wake)
        if plan.wake is not None:
            self._wake = self.clock.callLater(max(0.0, plan.wake - now), self.place)

    def model_snapshots(self, created: int) -> list[ModelSnapshot]:
        """Every model as llama-server's router API shows it (``GET /models``): from memory only."""
        snapshots = []
        for model in self.models.values():
            runtime = model.runtime
            backend = runtime.backend
            facts = backend.snapshot() if backend is not None else {}
            snapshots.append(ModelSnapshot(
                id=model.id, state=backend.state.value if backend is not None else "stopped", path=model.path,
                created=created, aliases=model.aliases, reason=backend.reason if backend is not None else "",
                pid=facts.get("pid"), memory_need=model.need,
                last_used=round(runtime.activity.last_activity, 3), in_flight=runtime.activity.inference_in_flight,
                queued=runtime.gate.waiting,
                source="models_dir" if model.scanned else "preset",
                waiting_for_room=model.waiting_since is not None, kv=facts.get("kv"),
            ))
        return snapshots

    def snapshot(self) -> dict[str, Any]:
        """Placement facts for /health: no I/O."""
        return {
            "budget": self.budget,
            "max_loaded": self.max_loaded,
            "held": placement.held_bytes(self.views()),
            "swaps": self.swaps,
            "waiting": self.waiting(),
        }


class FleetBackend:
    """A model's backend as its gate sees it in a fleet: a start is asked of the fleet, which decides when."""

    def __init__(self, backend: Backend, fleet: Fleet, model_id: str) -> None:
        self.backend = backend
        self.fleet = fleet
        self.model_id = model_id

    @property
    def supervised(self) -> bool:
        return self.backend.supervised

    @property
    def state(self) -> State:
        return self.backend.state

    @property
    def reason(self) -> str:
        return self.fleet.models[self.model_id].blocked or self.backend.reason

    @property
    def ready_at(self) -> float | None:
        return self.backend.ready_at

    @property
    def last_start_seconds(self) -> float | None:
        return self.backend.last_start_seconds

    def target(self) -> Target:
        return self.backend.target()

    def request_start(self, since: float | None = None) -> None:
        self.fleet.want(self.model_id, since)

    def wait_ready(self, newer_than: int | None = None) -> defer.Deferred[None]:
        return self.backend.wait_ready(newer_than)

    def unload(self) -> None:
        self.backend.unload()

    def restart(self) -> None:
        self.backend.restart()

    def retry(self) -> None:
        self.backend.retry()

    def add_listener(self, listener: Callable[[State, State], None]) -> None:
        self.backend.add_listener(listener)

    def snapshot(self) -> dict[str, Any]:
        return self.backend.snapshot()
