"""In-flight accounting: what shutdown drains and (later) what idle policy reads."""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime


class Activity:
    """Counts proxied requests from arrival to their last byte."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.in_flight = 0
        self.last_activity = clock.seconds()
        self._drained: list[defer.Deferred[None]] = []

    def begin(self) -> None:
        self.in_flight += 1
        self.last_activity = self.clock.seconds()

    def end(self) -> None:
        self.in_flight -= 1
        self.last_activity = self.clock.seconds()
        if self.in_flight == 0:
            waiters, self._drained = self._drained, []
            for d in waiters:
                d.callback(None)

    def drained(self) -> defer.Deferred[None]:
        """Fires when nothing is in flight."""
        if self.in_flight == 0:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(self._drained.remove)
        self._drained.append(d)
        return d
