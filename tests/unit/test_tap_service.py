"""The service tree's edges: ports bound while it is built (a busy one is a config error), the
PID file that ``llamad keys reload`` finds the daemon by, and a second SIGTERM cutting the drain short."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.application import service
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.logger import LogLevel, formatEvent, globalLogPublisher

from llamad import runfiles
from llamad.activity import Activity
from llamad.config import Config, ConfigError
from llamad.root import ListeningService, LlamadService, listen_all


class BusyReactor(MemoryReactor):
    """A reactor on which some TCP ports are taken; the ports it gives out remember being stopped."""

    def __init__(self, busy: set[int]) -> None:
        super().__init__()
        self.busy = busy
        self.ports: list = []

    def listenTCP(self, port, factory, backlog=50, interface=""):  # type: ignore[no-untyped-def]
        if port in self.busy:
            raise CannotListenError(interface, port, OSError(98, "Address already in use"))
        super().listenTCP(port, factory, backlog, interface)
        self.ports.append(FakePort())
        return self.ports[-1]


class FakePort:
    def __init__(self) -> None:
        self.stopped = False

    def stopListening(self) -> None:
        self.stopped = True


def tree(reactor: MemoryReactor) -> service.MultiService:
    root = service.MultiService()
    ListeningService(reactor, "health.listen", "tcp:8001", "default", Factory()).setServiceParent(root)
    ListeningService(reactor, "api.listen", "tcp:8000", "env PORT", Factory()).setServiceParent(root)
    return root


def test_listen_all_binds_each_site_while_the_tree_is_built() -> None:
    reactor = BusyReactor(set())
    root = tree(reactor)
    listen_all(root)
    assert [entry[0] for entry in reactor.tcpServers] == [8001, 8000]
    root.privilegedStartService()  # twistd's turn: nothing is bound twice
    assert len(reactor.tcpServers) == 2
    root.startService()
    root.stopService()
    assert all(port.stopped for port in reactor.ports)


def test_a_busy_port_is_a_config_error_naming_key_and_endpoint_and_nothing_stays_bound() -> None:
    reactor = BusyReactor({8000})
    with pytest.raises(ConfigError) as info:
        listen_all(tree(reactor))
    assert str(info.value) == "api.listen: cannot listen on tcp:8000: address already in use (from env PORT)"
    assert [port.stopped for port in reactor.ports] == [True]  # the health port, bound first, is let go


def test_privileged_start_binds_a_site_that_was_not_bound_yet() -> None:
    reactor = BusyReactor(set())
    listener = ListeningService(reactor, "api.listen", "tcp:8000", "default", Factory())
    listener.privilegedStartService()
    assert listener.port is not None and len(reactor.tcpServers) == 1


# --- the daemon's PID file --------------------------------------------------------------


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path))
    return str(tmp_path / "data")


def test_the_service_records_itself_at_start_and_forgets_at_stop(data_dir: str) -> None:
    clock = Clock()
    status = SimpleNamespace(draining=False, snapshot=lambda: {"state": "ready"})
    root = LlamadService(Config(data_dir=data_dir), status, Activity(clock), clock)  # type: ignore[arg-type]
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    try:
        assert runfiles.running_daemon(data_dir) is None
        root.startService()
        record = runfiles.running_daemon(data_dir)
        assert record is not None and record.pid == os.getpid()
        assert signal.getsignal(signal.SIGHUP) == root._sighup  # a reload never finds a process SIGHUP would end
        stopped = root.stopService()
        assert runfiles.running_daemon(data_dir) is None  # gone as soon as the drain starts
        clock.advance(0)
        assert stopped.called
        assert not os.path.exists(runfiles.daemon_record_path(data_dir))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


# --- the drain on SIGTERM, on a Clock ---------------------------------------------------------------


class SignalClock(Clock):
    """A Clock on which a signal handler's ``callFromThread`` runs the call at once."""

    def callFromThread(self, f, *args, **kw) -> None:  # type: ignore[no-untyped-def]
        f(*args, **kw)


class Hurried:
    """A supervisor that records being told to hurry its child's stop."""

    def __init__(self) -> None:
        self.hurried = 0

    def hurry(self) -> None:
        self.hurried += 1


def test_a_sighup_while_stopping_is_logged_not_fatal(data_dir: str) -> None:
    clock = SignalClock()
    activity = Activity(clock)
    activity.begin(inference=True)  # the drain waits for it
    status = SimpleNamespace(draining=False, snapshot=lambda: {"state": "ready"})
    root = LlamadService(Config(data_dir=data_dir), status, activity, clock)  # type: ignore[arg-type]
    lines: list[str] = []
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    def observer(event: dict) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    try:
        root.startService()
        stopped = root.stopService()
        handler = signal.getsignal(signal.SIGHUP)
        assert callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN)
        handler(signal.SIGHUP, None)
        assert "SIGHUP ignored: llamad is shutting down" in lines and "SIGHUP: reloading" not in lines
        activity.end(inference=True)
        clock.advance(0)
        assert stopped.called and signal.getsignal(signal.SIGHUP) == handler  # to the process's end
    finally:
        globalLogPublisher.removeObserver(observer)
        for sig, h in handlers.items():
            signal.signal(sig, h)


def test_a_second_sigterm_ends_the_drain_at_once(data_dir: str) -> None:
    clock = SignalClock()
    activity = Activity(clock)
    activity.begin(inference=True)  # a request in flight, which never ends by itself here
    status = SimpleNamespace(draining=False, snapshot=lambda: {"state": "ready"})
    root = LlamadService(Config(data_dir=data_dir), status, activity, clock)  # type: ignore[arg-type]
    supervisor = Hurried()
    root.supervisors = [supervisor]  # type: ignore[list-item]
    drain_timeout = root.config.api.drain_timeout
    warnings: list[str] = []

    def observer(event: dict) -> None:
        if event.get("log_level") == LogLevel.warn:
            warnings.append(formatEvent(event))

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT)}
    globalLogPublisher.addObserver(observer)
    try:
        root.startService()
        stopped = root.stopService()  # the first SIGTERM
        clock.advance(drain_timeout - 1)
        assert status.draining and not stopped.called and supervisor.hurried == 0  # the drain waits
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)  # the second SIGTERM
        assert stopped.called and supervisor.hurried == 1  # at once: no more time passed
        assert clock.seconds() == drain_timeout - 1
        assert "second signal: cut 0 request(s) still in flight" in warnings
    finally:
        globalLogPublisher.removeObserver(observer)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
