"""What both sites report, computed from in-memory state only.

The health site and the API's ``/health`` ask this object; neither ever talks
to the child, so health checks cannot wake or slow the model.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.interfaces import IReactorTime

from llamad.activity import Activity
from llamad.interfaces import Backend
from llamad.supervisor import State


class Status:
    def __init__(
        self, clock: IReactorTime, backend: Backend | None, model_id: str, lazy: bool,
        backend_has_metrics: bool = False,
    ) -> None:
        self.clock = clock
        self.backend = backend
        self.backend_has_metrics = backend_has_metrics
        self.model_id = model_id
        self.lazy = lazy
        self.draining = False
        self.booted_at = clock.seconds()
        self.booted_wall = time.time()
        self.ever_ready = False
        self.activity: Activity | None = None
        self.poller: Any = None  # the scale-from-zero service, when enabled
        self.fleet: Any = None  # the fleet, when llamad serves several models (then ``backend`` is None)

    @property
    def state(self) -> State | None:
        return self.backend.state if self.backend is not None else None

    def readiness(self) -> tuple[bool, str]:
        """(can serve now or on demand, reason when not)."""
        state = self.state
        if self.draining:
            return False, "draining: shutting down"
        if self.fleet is not None:
            # Ready while at least one model serves, or can start on demand.
            runtimes = [m.runtime for m in self.fleet.models.values()]
            failed = [m for m in runtimes if m.backend is None or m.backend.state == State.FAILED]
            if len(failed) < len(self.fleet.models):
                return True, ""
            return False, "every model failed: " + "; ".join(f"{m.id}: {m.backend.reason if m.backend else ''}"
                                                             for m in failed)
        if state is None:
            if self.poller is not None:  # a poller pod: ready once every cache has listed
                return (True, "") if self.poller.synced else (False, "scale-from-zero: listing the cluster")
            return False, "no backend configured"
        if state == State.READY:
            return True, ""
        if state in (State.STOPPED, State.STOPPING) and (self.lazy or self.ever_ready):
            # Unloaded (lazy start or idle): the next inference request starts it.
            return True, "unloaded; starts on the first inference request"
        if state == State.FAILED:
            return False, f"backend failed: {self.backend.reason}" if self.backend else "backend failed"
        if state == State.BACKOFF:
            return False, f"backend restarting after: {self.backend.reason}" if self.backend else "restarting"
        return False, {State.STARTING: "loading model", State.STOPPING: "backend stopping"}.get(
            state, state.value
        )

    def ping_code(self, mode: str) -> int:
        """``/ping`` on the health port: llama-gguf-inference's always-200, or RunPod's contract."""
        if mode == "always":
            return 200
        ready, _ = self.readiness()
        if ready:
            return 200
        if self.draining or self.state == State.FAILED or (self.state is None and self.poller is None):
            return 503
        return 204  # initializing

    def model_snapshot(self, model: Any) -> dict[str, Any]:
        """One model of a fleet (a ``FleetModel``): state, memory, last use, in flight and queued."""
        runtime = model.runtime
        backend = runtime.backend
        return {
            **(backend.snapshot() if backend is not None else {"state": "none"}),
            "memory": model.need,
            "waiting": (model.blocked or None) if model.waiting_since is not None else None,
            "in_flight": runtime.activity.inference_in_flight,
            "queued": runtime.gate.waiting,
            "last_used": round(runtime.activity.last_activity, 3),
        }

    def snapshot(self) -> dict[str, Any]:
        ready, reason = self.readiness()
        body: dict[str, Any] = {
            "status": "ok" if ready else "unavailable",
            "state": self.state.value if self.state is not None else "none",
            "model": self.model_id,
            "uptime_seconds": round(self.clock.seconds() - self.booted_at, 3),
        }
        if reason:
            body["reason"] = reason
        if self.backend is not None:
            body["backend"] = self.backend.snapshot()
        if self.poller is not None:
            body["scale_from_zero"] = self.poller.snapshot()
        if self.fleet is not None:
            body["state"] = "fleet"
            body["fleet"] = self.fleet.snapshot()
            body["models"] = {model_id: self.model_snapshot(model) for model_id, model in self.fleet.models.items()}
        if self.activity is not None:
            body["activity"] = {
                "inference_in_flight": self.activity.inference_in_flight,
                "last_activity": round(self.activity.last_activity, 3),
                "idle_seconds": round(self.activity.idle_seconds(), 3),
            }
        return body
