"""``idle.action``, end to end on a Clock: IdleWatch, ``model.IdleAction`` and a real Supervisor on a fake process reactor.

The timer itself is tested in test_idle.py; these pin down what the idle unload
does to the child, and exactly when, so that the integration test in
tests/integration/test_scale_to_zero.py only checks order and outcome.
"""

from __future__ import annotations

import signal

from fakes import make_supervisor
from llamad.activity import Activity, IdleWatch
from llamad.metrics import Metrics
from llamad.supervisor import PROBE_INTERVAL, State
from llamad.fleet.runtime import IdleAction

TIMEOUT = 2.0  # as in the integration test's [idle] timeout


def unloads(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value("llamad_idle_unloads_total")


def ready_worker(action: str = "unload"):
    """A ready supervised child, with the idle watch wired as ``tap.build`` wires it."""
    sup, reactor, probe = make_supervisor()
    metrics = Metrics()
    activity = Activity(reactor)
    idle = IdleWatch(reactor, activity, TIMEOUT, IdleAction(action, sup, metrics, lambda: reactor.stop()))
    idle.startService()
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY
    return sup, reactor, activity, metrics


def test_the_child_is_unloaded_exactly_timeout_after_the_last_inference_ends():
    sup, reactor, activity, metrics = ready_worker()
    child = reactor.last
    activity.begin(True)
    reactor.advance(30)  # a long request: more than the timeout, never unloaded under it
    assert child.signals == [] and sup.state == State.READY
    activity.end(True)
    ended = reactor.seconds()
    reactor.advance(TIMEOUT - 0.01)
    assert child.signals == [] and sup.state == State.READY and unloads(metrics) == 0
    reactor.advance(0.01)
    assert reactor.seconds() == ended + TIMEOUT
    assert child.signals == ["TERM"] and sup.state == State.STOPPING and unloads(metrics) == 1
    child.exit(None, signal.SIGTERM)
    assert sup.state == State.STOPPED
    reactor.advance(100)
    assert len(reactor.processes) == 1 and unloads(metrics) == 1  # no restart, no second unload


def test_a_new_request_before_the_timeout_keeps_the_child():
    sup, reactor, activity, metrics = ready_worker()
    for _ in range(5):  # a request every 1.5 s: never 2 s without inference
        activity.begin(True)
        activity.end(True)
        reactor.advance(TIMEOUT * 0.75)
    assert reactor.last.signals == [] and sup.state == State.READY and unloads(metrics) == 0
    reactor.advance(TIMEOUT * 0.25)
    assert reactor.last.signals == ["TERM"] and unloads(metrics) == 1


def test_idle_while_loading_is_not_an_unload_and_looks_again_after_another_timeout():
    sup, reactor, probe = make_supervisor()
    metrics = Metrics()
    activity = Activity(reactor)
    IdleWatch(reactor, activity, TIMEOUT, IdleAction("unload", sup, metrics, lambda: reactor.stop())).startService()
    sup.startService()  # the probe answers 503: the model is still loading
    reactor.advance(TIMEOUT)
    assert sup.state == State.STARTING and reactor.last.signals == [] and unloads(metrics) == 0
    probe.status = 200
    reactor.advance(PROBE_INTERVAL)
    assert sup.state == State.READY
    reactor.advance(TIMEOUT - PROBE_INTERVAL - 0.01)
    assert reactor.last.signals == []
    reactor.advance(0.01)  # a whole timeout after the first look
    assert reactor.last.signals == ["TERM"] and unloads(metrics) == 1


def test_idle_exit_stops_the_reactor_once():
    sup, reactor, activity, metrics = ready_worker(action="exit")
    stops: list[float] = []
    reactor.stop = lambda: stops.append(reactor.seconds())  # type: ignore[attr-defined]
    activity.begin(True)
    activity.end(True)
    reactor.advance(TIMEOUT)
    assert stops == [PROBE_INTERVAL + TIMEOUT]
    assert reactor.last.signals == [] and unloads(metrics) == 0  # the shutdown stops the child, not the idle action
    reactor.advance(100)
    assert len(stops) == 1
