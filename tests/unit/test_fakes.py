"""The shared fakes stand for the real thing: FakeBackend has the shape of llamad.interfaces.Backend."""

from __future__ import annotations

import inspect
from typing import Protocol, runtime_checkable

import pytest
from fakes import FakeBackend
from twisted.internet import defer

from llamad.interfaces import Backend
from llamad.supervisor import StartFailed, State


@runtime_checkable
class CheckedBackend(Backend, Protocol):
    """Backend, checkable with isinstance (Backend itself is left as it is)."""


ATTRIBUTES = sorted(Backend.__annotations__)
METHODS = sorted(name for name, value in vars(Backend).items() if inspect.isfunction(value) and not name.startswith("_"))
VARIANTS = {
    "default": lambda: FakeBackend(),
    "follows_starts": lambda: FakeBackend(State.STOPPED, follows_starts=True),
    "model_id": lambda: FakeBackend(State.STARTING, model_id="alpha"),
}


def test_the_protocol_is_read_whole() -> None:
    assert ATTRIBUTES == ["last_start_seconds", "ready_at", "reason", "state", "supervised"]
    assert METHODS == ["add_listener", "request_start", "restart", "retry", "snapshot", "target", "unload",
                       "wait_ready"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_is_a_backend(variant: str) -> None:
    backend = VARIANTS[variant]()
    assert isinstance(backend, CheckedBackend)
    for name in ATTRIBUTES:
        assert hasattr(backend, name), name


@pytest.mark.parametrize("name", METHODS)
def test_each_method_takes_what_the_protocol_passes(name: str) -> None:
    def shape(function: object) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    assert shape(getattr(FakeBackend, name)) == shape(getattr(Backend, name))


def test_its_calls_answer_as_the_protocol_says() -> None:
    backend = FakeBackend(State.STOPPED, follows_starts=True)
    changes: list[tuple[State, State]] = []
    backend.add_listener(lambda old, new: changes.append((old, new)))
    backend.request_start(since=1.0)
    waiter = backend.wait_ready(newer_than=0)
    assert isinstance(waiter, defer.Deferred) and not waiter.called
    backend.ready()
    assert waiter.called and backend.wait_ready().called  # ready: a waiter fires at once
    assert changes == [(State.STOPPED, State.STARTING), (State.STARTING, State.READY)]
    assert backend.snapshot() == {"state": "ready"} and backend.target().key == "k"
    backend.unload()
    backend.restart()
    backend.retry()
    assert (backend.start_requests, backend.spawns, backend.unloads, backend.restarts, backend.retries) == (1, 1, 1, 1, 1)


def test_by_default_only_the_test_moves_it() -> None:
    backend = FakeBackend(State.STOPPED)
    backend.request_start()
    assert backend.state == State.STOPPED and backend.start_requests == 1 and backend.spawns == 0
    backend.state = State.READY
    waiter = backend.wait_ready()
    assert not waiter.called and backend.waiters == [waiter]
    backend.fail("exited with code 1")
    assert backend.state == State.FAILED and backend.reason == "exited with code 1"
    assert backend.waiters == [] and waiter.called
    waiter.addErrback(lambda failure: failure.trap(StartFailed))
