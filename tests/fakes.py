"""Test doubles shared by unit tests: a model's server (Backend), proxies, transports, an in-memory process
reactor with a probe and a Supervisor on them, and a clean environment for config loading."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from llamad.backends import Target
from llamad.config import BackendConfig, SupervisorConfig
from llamad.supervisor import StartFailed, State, Supervisor

# --- a model's server ----------------------------------------------------------------------------------


class FakeBackend:
    """A :class:`llamad.interfaces.Backend` in memory, on which the test moves the state and fires the waiters.

    ``follows_starts=False`` (the default): the state changes only when the test changes it, and every
    ``wait_ready`` waits until the test fires it (``waiters``).  ``follows_starts=True``: like the supervisor,
    ``request_start`` starts a stopped one once (STARTING, one more of ``spawns``), ``wait_ready`` fires at
    once when it is ready, and :meth:`ready` and :meth:`fail` end a start for all its waiters.
    ``model_id``: it answers at ``http://<model_id>`` with no key, so that models are told apart by target.
    """

    supervised = True
    ready_at: float | None = None
    last_start_seconds: float | None = None

    def __init__(self, state: State = State.READY, reason: str = "", *, model_id: str | None = None,
                 follows_starts: bool = False) -> None:
        self.state = state
        self.reason = reason
        self.model_id = model_id
        self.follows_starts = follows_starts
        self.start_requests = 0  # calls of request_start
        self.spawns = 0  # starts that request_start made (follows_starts)
        self.snapshots = 0  # calls of snapshot
        self.unloads = self.restarts = self.retries = 0
        self.waiters: list[defer.Deferred[None]] = []
        self.listeners: list[Callable[[State, State], None]] = []

    def target(self) -> Target:
        if self.model_id is None:
            return Target(b"http://127.0.0.1:1", "k")
        return Target(b"http://" + self.model_id.encode(), "")

    def request_start(self, since: float | None = None) -> None:
        self.start_requests += 1
        if self.follows_starts and self.state == State.STOPPED:
            self._move(State.STARTING)
            self.spawns += 1

    def wait_ready(self, newer_than: int | None = None) -> defer.Deferred[None]:
        if self.follows_starts and self.state == State.READY:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred(self.waiters.remove)
        self.waiters.append(d)
        return d

    def ready(self) -> None:
        """The start ends well: every waiter fires."""
        self._move(State.READY)
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.callback(None)

    def fail(self, reason: str) -> None:
        """The start fails: every waiter fails with :class:`StartFailed`."""
        self.reason = reason
        self._move(State.FAILED)
        waiters, self.waiters = self.waiters, []
        for d in waiters:
            d.errback(StartFailed(reason))

    def unload(self) -> None:
        self.unloads += 1

    def restart(self) -> None:
        self.restarts += 1

    def retry(self) -> None:
        self.retries += 1

    def add_listener(self, listener: Callable[[State, State], None]) -> None:
        self.listeners.append(listener)

    def snapshot(self) -> dict[str, Any]:
        self.snapshots += 1
        return {"state": self.state.value}

    def _move(self, new: State) -> None:
        old, self.state = self.state, new
        for listener in self.listeners:
            listener(old, new)


# --- proxies: what the gateway relays to -----------------------------------------------------------------

PROXIED = b'{"proxied": true}'  # FakeProxy's answer


class Relayed:
    """What a fake proxy's ``relay`` returns: a relay already over, which cancelling leaves alone."""

    def cancel(self) -> None:
        pass


class FakeProxy:
    """Answers every relayed request with a fixed body, recording the target."""

    def __init__(self) -> None:
        self.targets: list[Target] = []

    def relay(self, request, target, body, owner, first_byte=None, tap_for=None, sse_started=False, uri=None):
        self.targets.append(target)
        request.setHeader(b"content-type", b"application/json")
        first_byte()
        request.write(PROXIED)
        owner.relayed()
        return Relayed()


class UsageProxy(FakeProxy):
    """Answers with a JSON body whose usage is 8 prompt and 4 completion tokens."""

    BODY = b'{"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}}'

    def relay(self, request, target, body, owner, first_byte=None, tap_for=None, sse_started=False, uri=None):
        self.targets.append(target)
        request.setHeader(b"content-type", b"application/json")
        data = tap_for(False).feed(self.BODY) if tap_for is not None else self.BODY
        first_byte()
        request.write(data)
        owner.relayed()
        return Relayed()


class PendingProxy(FakeProxy):
    """Holds each forwarded request until the test answers it, and records a cancelled one."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[object, Held]] = []
        self.cancelled: list[object] = []

    def relay(self, request, target, body, owner, first_byte=None, tap_for=None, sse_started=False, uri=None):
        self.targets.append(target)
        held = Held(self, request, owner)
        self.pending.append((request, held))
        return held

    def answer(self) -> None:
        request, held = self.pending.pop(0)
        request.setHeader(b"content-type", b"application/json")
        request.write(PROXIED)
        held.owner.relayed()


class Held:
    """A relay the test has not answered yet; cancelling it records the request."""

    def __init__(self, proxy: PendingProxy, request: object, owner) -> None:
        self.proxy, self.request, self.owner = proxy, request, owner

    def cancel(self) -> None:
        self.proxy.cancelled.append(self.request)
        self.owner.not_relayed(Failure(defer.CancelledError()))


class TCPTransport(StringTransport):
    """A StringTransport with the TCP calls llamad makes on its connections."""

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def abortConnection(self) -> None:
        self.disconnecting = True


# --- processes ---------------------------------------------------------------------------------------------


class FakeProcess:
    def __init__(self, reactor: FakeProcessReactor, protocol: Any, argv: list[str], env: dict[str, str], pid: int):
        self.reactor = reactor
        self.proto = protocol
        self.argv = argv
        self.env = env
        self.pid = pid
        self.signals: list[str] = []
        self.alive = True

    def signalProcess(self, name: str) -> None:
        if not self.alive:
            raise error.ProcessExitedAlready()
        self.signals.append(name)

    def exit(self, code: int | None = 0, signal: int | None = None) -> None:
        """The process ends: code 0 is ProcessDone, otherwise ProcessTerminated."""
        self.alive = False
        if code == 0 and signal is None:
            reason: Exception = error.ProcessDone(0)
        else:
            reason = error.ProcessTerminated(code, signal)
        self.proto.processEnded(Failure(reason))

    def output(self, data: bytes, fd: int = 2) -> None:
        self.proto.childDataReceived(fd, data)


class FakeProcessReactor(Clock):
    """Clock plus spawnProcess that records children instead of forking."""

    def __init__(self, fail_spawn: OSError | None = None) -> None:
        super().__init__()
        self.processes: list[FakeProcess] = []
        self.fail_spawn = fail_spawn

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str] | None = None,
                     **kwargs: Any) -> FakeProcess:
        if self.fail_spawn is not None:
            raise self.fail_spawn
        process = FakeProcess(self, protocol, list(args), dict(env or {}), 1000 + len(self.processes))
        self.processes.append(process)
        protocol.makeConnection(process)
        return process

    @property
    def last(self) -> FakeProcess:
        return self.processes[-1]


class FakeProbe:
    """Readiness answers chosen by the test: a status code per call, default 503."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, bytes]] = []
        self.status: int | defer.Deferred[int] = 503  # a Deferred: the probe hangs until the test fires it

    def __call__(self, port: int, path: bytes, timeout: float = 1.0) -> defer.Deferred[int]:
        self.calls.append((port, path))
        if isinstance(self.status, defer.Deferred):
            return self.status
        return defer.succeed(self.status)


SUP = SupervisorConfig(backoff_initial=1.0, backoff_max=8.0, crash_loop_limit=3, crash_loop_window=60,
                       failed_retry_after=300, stop_timeout=10)


def make_supervisor(start: str = "eager", **kw) -> tuple[Supervisor, FakeProcessReactor, FakeProbe]:
    """A Supervisor (config SUP) on a fake process reactor and probe; ``lines`` collects the child's output."""
    reactor = FakeProcessReactor(kw.pop("fail_spawn", None))
    probe = FakeProbe()
    backend = BackendConfig(model="/models/demo.gguf", parallel=2, start=start, ready_timeout=30)
    lines: list[bytes] = kw.pop("lines", [])

    class Sink:
        def child_line(self, line: bytes) -> None:
            lines.append(line)

    sup = Supervisor(reactor, reactor, backend, SUP, probe=probe, key="k", run_dir=kw.pop("run_dir", ""),
                     output=Sink(), new_session=False, random=lambda: 1.0, base_env={"PATH": "/bin"}, **kw)
    return sup, reactor, probe


# --- config ------------------------------------------------------------------------------------------------


def clean_config_env(tmp_path: Path, monkeypatch: Any) -> Path:
    """A clean environment for config loading: a real model file and command, no stray config file."""
    from llamad import config

    for name in [*config.ENV_NAMES, *config.IGNORED_ENV]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    model = tmp_path / "m.gguf"
    model.touch()
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODEL_PATH", str(model))
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    return model
