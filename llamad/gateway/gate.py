"""Between a request and the child: wait for readiness, starting the child on demand."""

from __future__ import annotations

from typing import Protocol

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from llamad.gateway.errors import ApiError
from llamad.backends import Target
from llamad.status import Status
from llamad.supervisor import StartFailed, State


class Backend(Protocol):
    state: State
    reason: str

    def target(self) -> Target: ...

    def request_start(self) -> None: ...

    def wait_ready(self) -> defer.Deferred[None]: ...


class Gate:
    def __init__(self, clock: IReactorTime, status: Status, backend: Backend | None, wait_timeout: float) -> None:
        self.clock = clock
        self.status = status
        self.backend = backend
        self.wait_timeout = wait_timeout

    def current_target(self) -> Target | None:
        """The child's address when it is ready; never starts it."""
        if self.backend is not None and self.backend.state == State.READY:
            return self.backend.target()
        return None

    async def acquire(self) -> Target:
        """A ready child for one request, or an :class:`ApiError` (503/504)."""
        backend = self.backend
        if self.status.draining:
            raise ApiError(503, "llamad is shutting down", "shutting_down", {b"retry-after": b"5"})
        if backend is None:
            raise ApiError(503, "no backend configured for inference")
        if backend.state == State.READY:
            return backend.target()
        if backend.state == State.FAILED:
            raise ApiError(503, f"backend failed: {backend.reason}", headers={b"retry-after": b"30"})
        waiting = backend.wait_ready()
        backend.request_start()
        if self.wait_timeout > 0:
            waiting.addTimeout(self.wait_timeout, self.clock)
        try:
            await waiting
        except defer.TimeoutError:
            raise ApiError(503, f"backend not ready within {self.wait_timeout:g} s", "backend_loading",
                           {b"retry-after": b"5"}) from None
        except StartFailed as e:
            raise ApiError(503, f"backend start failed: {e}", "backend_unavailable",
                           {b"retry-after": b"5"}) from None
        return backend.target()
