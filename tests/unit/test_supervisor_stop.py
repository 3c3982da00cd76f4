"""Stopping llama-server: its SIGTERM goes once the serving loop answers, and a missed one is sent again at once.

llama-server installs its SIGTERM handler a moment before its serving loop starts, and the loop's
start undoes what the handler asked: a SIGTERM in between is lost.  Its loop answers ``/metrics``.
"""

from __future__ import annotations

import signal

from twisted.internet import defer

from fakes import FakeProcessReactor
from llamad.config import BackendConfig, SupervisorConfig
from llamad.supervisor import (
    MISS_CHECK, PROBE_INTERVAL, PROBE_TIMEOUT, RESIGNAL_AFTER, SERVING_PATH, State, Supervisor,
)

SUP = SupervisorConfig(stop_timeout=10, health_interval=0)


class PathProbe:
    """Answers by path: a status code, or a Deferred the test fires; 503 for a path not set."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.status: dict[bytes, int | defer.Deferred[int]] = {b"/health": 200, b"/v1/models": 200}

    def __call__(self, port: int, path: bytes, timeout: float = 1.0) -> defer.Deferred[int]:
        self.calls.append(path)
        status = self.status.get(path, 503)
        return status if isinstance(status, defer.Deferred) else defer.succeed(status)

    def serving_checks(self) -> int:
        return self.calls.count(SERVING_PATH)


def started(kind: str = "llama-server", ready: bool = True) -> tuple[Supervisor, FakeProcessReactor, PathProbe]:
    reactor = FakeProcessReactor()
    probe = PathProbe()
    if not ready:
        probe.status[b"/health"] = 503
    backend = BackendConfig(kind=kind, model="/models/demo.gguf", parallel=1, ready_timeout=30)
    sup = Supervisor(reactor, reactor, backend, SUP, probe=probe, key="k", new_session=False,
                     base_env={"PATH": "/bin"})
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == (State.READY if ready else State.STARTING)
    return sup, reactor, probe


def test_a_ready_child_gets_its_sigterm_once_its_serving_loop_answers():
    sup, reactor, probe = started()
    loop: defer.Deferred[int] = defer.Deferred()
    probe.status[SERVING_PATH] = loop
    d = sup.stopService()
    child = reactor.last
    assert sup.state == State.STOPPING and child.signals == [] and probe.serving_checks() == 1
    reactor.advance(0.01)
    loop.callback(200)  # the loop runs: its handler is in place and nothing undoes it any more
    assert child.signals == ["TERM"]
    reactor.advance(RESIGNAL_AFTER - 0.02)
    assert child.signals == ["TERM"] and probe.serving_checks() == 1  # taken: no watch for a miss
    child.exit(0)
    assert d.called and sup.state == State.STOPPED


def test_a_sigterm_the_child_missed_is_sent_again_as_soon_as_it_is_seen_serving():
    sup, reactor, probe = started(ready=False)
    d = sup.stopService()  # /metrics: 503 (loading): SIGTERM at once, with no handler it ends the child...
    child = reactor.last
    assert child.signals == ["TERM"]
    reactor.advance(MISS_CHECK)
    assert probe.serving_checks() == 2 and child.signals == ["TERM"]  # still 503: no sign of a miss
    probe.status[SERVING_PATH] = 200  # ...but this one had just installed it, and its loop then started
    reactor.advance(MISS_CHECK)
    assert child.signals == ["TERM", "TERM"]  # llama-server takes a second SIGTERM as "exit now"
    reactor.advance(SUP.stop_timeout - 2 * MISS_CHECK - 0.01)
    assert child.signals == ["TERM", "TERM"] and probe.serving_checks() == 3  # no timed one: sent already
    reactor.advance(0.01)
    assert child.signals == ["TERM", "TERM", "KILL"] and not d.called  # the SIGKILL still comes
    child.exit(None, signal.SIGKILL)
    assert d.called and sup.state == State.STOPPED


def test_a_child_that_took_its_sigterm_is_left_to_finish():
    sup, reactor, probe = started()
    refused: defer.Deferred[int] = defer.Deferred()
    probe.status[SERVING_PATH] = refused
    sup.stopService()
    child = reactor.last
    refused.errback(ConnectionRefusedError())  # not answering yet: SIGTERM at once
    assert child.signals == ["TERM"]
    probe.status[SERVING_PATH] = 503
    reactor.pump([MISS_CHECK] * round(RESIGNAL_AFTER / MISS_CHECK - 2))
    assert child.signals == ["TERM"] and probe.serving_checks() > 10  # watched, never seen serving
    reactor.advance(3 * MISS_CHECK)
    assert child.signals == ["TERM", "TERM"]  # the timed second SIGTERM, as for any child
    checks = probe.serving_checks()
    reactor.pump([MISS_CHECK] * 20)
    assert probe.serving_checks() == checks  # the watch ends with it
    child.exit(1)
    assert sup.state == State.STOPPED


def test_a_serving_loop_that_does_not_answer_delays_the_sigterm_only_so_long():
    sup, reactor, probe = started()
    probe.status[SERVING_PATH] = defer.Deferred()  # busy, or hung
    sup.stopService()
    child = reactor.last
    reactor.advance(PROBE_TIMEOUT - 0.01)
    assert child.signals == []
    reactor.advance(0.01)
    assert child.signals == ["TERM"]
    reactor.advance(SUP.stop_timeout - PROBE_TIMEOUT)
    assert child.signals[-1] == "KILL"  # stop_timeout counts from the stop, not from the SIGTERM


def test_a_child_that_ends_during_the_check_gets_no_signal():
    sup, reactor, probe = started()
    loop: defer.Deferred[int] = defer.Deferred()
    probe.status[SERVING_PATH] = loop
    d = sup.stopService()
    child = reactor.last
    child.exit(None, signal.SIGSEGV)
    loop.callback(200)
    reactor.advance(SUP.stop_timeout)
    assert child.signals == [] and d.called and sup.state == State.STOPPED


def test_other_children_get_their_sigterm_at_once_and_are_not_watched():
    sup, reactor, probe = started(kind="llama-cpp-python")
    calls = len(probe.calls)
    sup.stopService()
    assert reactor.last.signals == ["TERM"]
    reactor.advance(RESIGNAL_AFTER)
    assert reactor.last.signals == ["TERM", "TERM"] and len(probe.calls) == calls
