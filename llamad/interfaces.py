"""The contracts between llamad's parts, named in one place.

A model's server is a :class:`Backend`: a ``llama-server`` child that llamad
supervises, or an external server it only proxies to.  The gateway, the status
and the idle policy talk to this interface only, never to one kind of backend.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from twisted.internet import defer

    from llamad.backends import Target
    from llamad.supervisor import State


class Backend(Protocol):
    """A model's server, as the rest of llamad sees it."""

    supervised: bool  # llamad runs it: it starts, stops, restarts and unloads
    state: State
    reason: str  # why the last child ended or failed; "" when there is nothing to say
    ready_at: float | None  # clock seconds of the last readiness (None: never, or not tracked)
    last_start_seconds: float | None  # spawn to ready, the last time it started

    def target(self) -> Target:
        """Where it answers now, and with which key."""

    def request_start(self, since: float | None = None) -> None:
        """Someone wants it up (a request at cold start): start it if it is stopped.  ``since``: when
        that request counts as arrived (its priority's head start taken off), for the order in which
        a fleet makes room."""

    def wait_ready(self, newer_than: int | None = None) -> defer.Deferred[None]:
        """Fires when it is ready (a later start than ``newer_than``, if given)."""

    def unload(self) -> None:
        """Stop it and keep it startable: the next request starts it again."""

    def restart(self) -> None:
        """Start over now: out of ``failed``, or a fresh child for a running one."""

    def retry(self) -> None:
        """Leave ``failed`` now (SIGHUP); nothing otherwise."""

    def add_listener(self, listener: Callable[[State, State], None]) -> None:
        """Call ``listener(old, new)`` on every state change."""

    def snapshot(self) -> dict[str, Any]:
        """In-memory facts for /health: no I/O."""
