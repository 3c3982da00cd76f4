"""What counts as activity, and what happens when there is none.

Only inference counts: a request to an inference route is active from its
arrival to its last byte, so a ten-minute stream is never unloaded under its
client.  Health checks, metrics scrapes and ``/v1/models`` never count; that is
what lets a worker scale to zero while the platform keeps probing it.
"""

from __future__ import annotations

from typing import Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from llamad.timers import cancel

log = Logger(namespace="llamad.idle")


class Activity:
    """In-flight accounting: all proxied requests (for the drain), inference (for idleness)."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.in_flight = 0  # every proxied request
        self.inference_in_flight = 0
        self.last_activity = clock.seconds()  # when inference last began or ended
        self._drained: list[defer.Deferred[None]] = []
        self._listeners: list[Callable[[], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` whenever inference begins or ends."""
        self._listeners.append(listener)

    def begin(self, inference: bool) -> None:
        self.in_flight += 1
        if inference:
            self.inference_in_flight += 1
            self.last_activity = self.clock.seconds()
            self._notify()

    def end(self, inference: bool) -> None:
        self.in_flight -= 1
        if inference:
            self.inference_in_flight -= 1
            self.last_activity = self.clock.seconds()
            self._notify()
        if self.in_flight == 0:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def _notify(self) -> None:
        for listener in list(self._listeners):
            listener()

    def idle_seconds(self) -> float:
        """Seconds since inference last ended; 0 while any is in flight."""
        if self.inference_in_flight:
            return 0.0
        return max(0.0, self.clock.seconds() - self.last_activity)

    def drained(self) -> defer.Deferred[None]:
        """Fires when no proxied request is in flight."""
        if self.in_flight == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(self._drained.remove)
        self._drained.append(d)
        return d


class IdleWatch(Service):
    """After ``timeout`` seconds without inference, call ``on_idle``.

    The countdown starts at boot and again each time the last inference
    request ends; any inference that begins cancels it.  ``on_idle`` returns
    False when it cannot act yet (the model is still loading): the countdown
    then starts over.  One timer serves many requests: it is not cancelled
    when a request begins, and when it fires it looks at when inference last
    ended and waits out the rest (no timer set and cancelled per request).
    """

    name = "idle"

    def __init__(self, clock: IReactorTime, activity: Activity, timeout: float,
                 on_idle: Callable[[], bool]) -> None:
        self.clock = clock
        self.activity = activity
        self.timeout = timeout
        self.on_idle = on_idle
        self.timer: IDelayedCall | None = None
        activity.on_change(self._changed)

    def startService(self) -> None:
        super().startService()
        self._arm()

    def stopService(self) -> None:
        super().stopService()
        self._disarm()

    def _changed(self) -> None:
        if self.timer is None and not self.activity.inference_in_flight:
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        if self.timeout > 0 and self.running:
            self.timer = self.clock.callLater(self.timeout, self._fire)

    def _disarm(self) -> None:
        self.timer = cancel(self.timer)

    def _fire(self) -> None:
        self.timer = None
        if self.activity.inference_in_flight:
            return  # the end of the last request starts the countdown again
        remaining = self.activity.last_activity + self.timeout - self.clock.seconds()
        if remaining > 0:  # inference ran meanwhile: the countdown runs from its end
            self.timer = self.clock.callLater(remaining, self._fire)
        elif not self.on_idle():
            self._arm()
