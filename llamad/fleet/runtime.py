# -*- test-case-name: tests.unit.test_model -*-
"""One model, bundled: its backend, gate, activity and idle watch, and the policies that tie them.

``makeService`` builds a :class:`ModelRuntime` per model and wires nothing
else about it; what happens when the model goes idle (:class:`IdleAction`)
and how its state changes are reported (:class:`BackendReporter`) are named,
tested objects rather than closures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from twisted.logger import Logger

from llamad.activity import Activity, IdleWatch
from llamad.fleet.gate import Gate
from llamad.interfaces import Backend
from llamad.metrics import Metrics, ModelMetrics
from llamad.notify import Notifier
from llamad.status import Status
from llamad.supervisor import State, exit_kind

log = Logger(namespace="llamad.fleet.runtime")


class IdleAction:
    """``idle.action`` when a model has had no inference for its idle time-out.

    ``unload`` stops its child (the next request loads it again), ``exit``
    stops the whole process (serverless: the container ends), ``none`` does
    nothing.  Returns False while the model is still loading: loading is not
    idleness, so the watch looks again after another time-out.
    """

    def __init__(self, action: str, backend: Backend | None, metrics: Metrics | ModelMetrics,
                 stop_process: Callable[[], None]) -> None:
        self.action = action
        self.backend = backend
        self.metrics = metrics
        self.stop_process = stop_process

    def __call__(self) -> bool:
        backend = self.backend
        if backend is not None and backend.state in (State.STARTING, State.BACKOFF):
            return False
        if self.action == "unload" and backend is not None and backend.supervised and backend.state == State.READY:
            log.info("idle: unloading the model (the next inference request loads it again)")
            self.metrics.idle_unloads.inc()
            backend.unload()
        elif self.action == "exit":
            log.info("idle: exiting (drain, stop the child, exit 0)")
            self.stop_process()
        return True


class BackendReporter:
    """A backend's state changes, as metrics, a systemd status line and the status's ``ever_ready``."""

    def __init__(self, backend: Backend, metrics: Metrics | ModelMetrics, notifier: Notifier, status: Status,
                 name: str = "backend") -> None:
        self.backend = backend
        self.metrics = metrics
        self.notifier = notifier
        self.status = status
        self.name = name  # "backend", or "model <id>" in a fleet: what the systemd status line says
        metrics.set_backend_state(backend.state)

    def __call__(self, before: State, after: State) -> None:
        backend = self.backend
        self.metrics.set_backend_state(after)
        troubled = after in (State.BACKOFF, State.FAILED)
        self.notifier.status(f"{self.name} {after.value}" + (f": {backend.reason}" if troubled else ""))
        if after == State.READY:
            self.status.ever_ready = True
            if backend.last_start_seconds is not None:
                self.metrics.backend_start_duration.observe(backend.last_start_seconds)
        if troubled and before in (State.STARTING, State.READY, State.STOPPING):
            self.metrics.backend_restarts.labels(exit_kind(backend.reason)).inc()


@dataclass
class ModelRuntime:
    """Everything that belongs to one model while llamad serves it."""

    id: str
    backend: Backend | None  # None: a scale-from-zero poller pod serves no model
    gate: Gate
    activity: Activity
    idle: IdleWatch | None = None  # None: idleness is watched for the whole process, or not at all
    log_file: str | None = None  # where its child's output goes (None: it runs no child)
