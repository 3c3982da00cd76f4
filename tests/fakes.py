"""Test doubles shared by unit tests: an in-memory process reactor and a probe."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from twisted.internet import defer, error
from twisted.internet.task import Clock
from twisted.python.failure import Failure


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
