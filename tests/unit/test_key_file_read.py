"""The child's key file is gone as soon as the child has read it, not when the model has loaded: a llamad
SIGKILLed during a long load leaves no key on disk.  inotify's events are real; the reactor is a fake that
the test turns by hand."""

from __future__ import annotations

import os
import sys

import pytest
from fakes import FakeProbe, FakeProcessReactor
from twisted.internet.interfaces import IReactorFDSet
from twisted.internet.task import Clock
from zope.interface import implementer

from llamad import runfiles
from llamad.config import BackendConfig, SupervisorConfig
from llamad.supervisor import State, Supervisor

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="inotify")


@implementer(IReactorFDSet)
class FdReactor(FakeProcessReactor):
    """The fake process reactor, with file descriptors a test reads by calling :meth:`turn`."""

    def __init__(self) -> None:
        super().__init__()
        self.readers: list = []

    def addReader(self, reader) -> None:
        self.readers.append(reader)

    def removeReader(self, reader) -> None:
        if reader in self.readers:
            self.readers.remove(reader)

    def addWriter(self, writer) -> None:
        pass

    def removeWriter(self, writer) -> None:
        pass

    def removeAll(self) -> list:
        readers, self.readers = self.readers, []
        return readers

    def getReaders(self) -> list:
        return list(self.readers)

    def getWriters(self) -> list:
        return []

    def turn(self) -> None:
        """What an event loop does once every descriptor is readable (inotify's are non-blocking)."""
        for reader in list(self.readers):
            reader.doRead()
        self.advance(0)


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_when_read_fires_once_the_file_is_read_and_closed(tmp_path) -> None:
    path = str(tmp_path / "key")
    open(path, "w").write("k\n")
    reactor = FdReactor()
    seen: list[str] = []
    end = runfiles.when_read(reactor, path, lambda: seen.append("read"))
    assert end is not None and len(reactor.readers) == 1
    with open(path, "a") as f:  # a writer (llamad itself) is not the child reading
        f.write("")
    reactor.turn()
    assert seen == []
    assert read(path) == b"k\n"
    reactor.turn()
    assert seen == ["read"] and reactor.readers == []  # the watch ended with it
    read(path)
    reactor.turn()
    assert seen == ["read"]


def test_when_read_ended_early_never_fires(tmp_path) -> None:
    path = str(tmp_path / "key")
    open(path, "w").write("k\n")
    reactor = FdReactor()
    seen: list[str] = []
    end = runfiles.when_read(reactor, path, lambda: seen.append("read"))
    assert end is not None
    end()
    read(path)
    reactor.turn()
    assert seen == [] and reactor.readers == []


def test_no_watch_where_the_reactor_has_no_file_descriptors(tmp_path) -> None:
    path = tmp_path / "key"
    path.write_text("k\n")
    assert runfiles.when_read(Clock(), str(path), lambda: None) is None


def supervisor(tmp_path, reactor: FdReactor) -> tuple[Supervisor, FakeProbe]:
    probe = FakeProbe()
    backend = BackendConfig(model="/models/demo.gguf", parallel=2, start="eager", ready_timeout=600)
    sup = Supervisor(reactor, reactor, backend, SupervisorConfig(), probe=probe, key="k",
                     run_dir=str(tmp_path / "run"), new_session=False, random=lambda: 1.0, base_env={"PATH": "/bin"})
    return sup, probe


def key_file_of(reactor: FdReactor) -> str:
    argv = reactor.processes[-1].argv
    return argv[argv.index("--api-key-file") + 1]


def test_the_key_file_goes_once_the_child_has_read_it_while_it_still_loads(tmp_path) -> None:
    reactor = FdReactor()
    sup, probe = supervisor(tmp_path, reactor)
    sup.startService()
    key_file = key_file_of(reactor)
    reactor.turn()
    assert os.path.exists(key_file)  # not read yet: it stays
    assert read(key_file) == b"k\n"  # the child parses its arguments
    reactor.turn()
    assert sup.state == State.STARTING and not os.path.exists(key_file)  # the model still loads
    probe.status = 200
    reactor.advance(1)
    assert sup.state == State.READY
    sup.stopService()
    reactor.processes[-1].exit(0)
    assert os.listdir(tmp_path / "run") == []


def test_a_child_that_ends_unread_takes_its_key_file_and_watch_with_it(tmp_path) -> None:
    reactor = FdReactor()
    sup, _ = supervisor(tmp_path, reactor)
    sup.startService()
    key_file = key_file_of(reactor)
    reactor.processes[-1].exit(1)
    reactor.advance(0)
    assert not os.path.exists(key_file) and reactor.readers == []
    sup.stopService()
