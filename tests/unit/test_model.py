"""One model's policies: what idleness does, and how state changes are reported."""

from __future__ import annotations

import signal

from fakes import FakeProbe, FakeProcessReactor
from twisted.internet.task import Clock

from llamad.config import BackendConfig, SupervisorConfig
from llamad.metrics import Metrics
from llamad.fleet.runtime import BackendReporter, IdleAction
from llamad.status import Status
from llamad.supervisor import PROBE_INTERVAL, ExternalBackend, State, Supervisor


def supervisor(**config: float) -> tuple[Supervisor, FakeProcessReactor, FakeProbe]:
    reactor = FakeProcessReactor()
    probe = FakeProbe()
    sup = Supervisor(reactor, reactor, BackendConfig(model="/m/demo.gguf"), SupervisorConfig(**config), probe=probe,
                     key="k", new_session=False, random=lambda: 1.0, base_env={})
    return sup, reactor, probe


def sample(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float | None:
    return metrics.registry.get_sample_value(name, labels or {})


class Notes:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def status(self, text: str) -> None:
        self.lines.append(text)


def test_idle_unload_stops_a_ready_child_and_counts_it():
    sup, reactor, probe = supervisor()
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    metrics, stops = Metrics(), []
    assert IdleAction("unload", sup, metrics, lambda: stops.append(1))() is True
    assert sup.state == State.STOPPING and reactor.last.signals == ["TERM"] and stops == []
    assert sample(metrics, "llamad_idle_unloads_total") == 1


def test_idle_while_loading_is_not_idleness():
    sup, reactor, probe = supervisor()
    sup.startService()
    assert IdleAction("unload", sup, Metrics(), lambda: None)() is False
    assert sup.state == State.STARTING


def test_idle_exit_stops_the_process_and_none_does_nothing():
    sup, reactor, probe = supervisor()
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    stops: list[int] = []
    assert IdleAction("none", sup, Metrics(), lambda: stops.append(1))() is True
    assert stops == [] and sup.state == State.READY
    assert IdleAction("exit", sup, Metrics(), lambda: stops.append(1))() is True
    assert stops == [1]


def test_an_external_backend_is_never_unloaded():
    metrics = Metrics()
    assert IdleAction("unload", ExternalBackend("http://127.0.0.1:9"), metrics, lambda: None)() is True
    assert sample(metrics, "llamad_idle_unloads_total") == 0


def test_reporter_turns_state_changes_into_metrics_status_and_ever_ready():
    sup, reactor, probe = supervisor()
    metrics, notes = Metrics(), Notes()
    status = Status(Clock(), sup, "demo", lazy=False)
    sup.add_listener(BackendReporter(sup, metrics, notes, status))
    assert sample(metrics, "llamad_backend_state", {"state": "stopped"}) == 1
    probe.status = 200
    sup.startService()
    reactor.advance(PROBE_INTERVAL)
    assert status.ever_ready and sample(metrics, "llamad_backend_state", {"state": "ready"}) == 1
    assert sample(metrics, "llamad_backend_start_duration_seconds_count") == 1
    reactor.last.exit(None, signal.SIGKILL)
    assert sample(metrics, "llamad_backend_restarts_total", {"reason": "killed"}) == 1
    assert notes.lines[-1].startswith("backend backoff: killed by signal SIGKILL")
    assert notes.lines[:2] == ["backend starting", "backend ready"]
