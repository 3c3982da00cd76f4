"""The health site on port 8001, driven in memory through StubTreq."""

from __future__ import annotations

from typing import Any
from unittest.mock import ANY

import pytest
import pytest_twisted
from fakes import FakeBackend
from treq.testing import StubTreq
from twisted.internet.task import Clock

from llamad.health import HealthResource
from llamad.status import Status
from llamad.supervisor import State

URL = "http://127.0.0.1:8001"


def make_status(state: State, reason: str = "", lazy: bool = False, ever_ready: bool = False,
                draining: bool = False) -> Status:
    status = Status(Clock(), FakeBackend(state, reason), "demo", lazy)
    status.ever_ready = ever_ready
    status.draining = draining
    return status


async def fetch(status: Status, mode: str, path: str, method: str = "GET") -> tuple[int, bytes, Any]:
    client = StubTreq(HealthResource(status, mode))
    response = await client.request(method, URL + path)
    return response.code, await client.content(response), response.headers


async def fetch_json(status: Status, path: str) -> tuple[int, Any]:
    client = StubTreq(HealthResource(status, "always"))
    response = await client.get(URL + path)
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return response.code, await client.json_content(response)


@pytest.mark.parametrize("path", ["/ping", "/"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("state", list(State))
@pytest_twisted.ensureDeferred
async def test_ping_always_mode_is_200_whatever_the_state(state: State, method: str, path: str) -> None:
    code, body, _ = await fetch(make_status(state, "x"), "always", path, method)
    assert (code, body) == (200, b"")


@pytest_twisted.ensureDeferred
async def test_ping_always_mode_is_200_while_draining() -> None:
    assert (await fetch(make_status(State.READY, draining=True), "always", "/ping"))[0] == 200


@pytest.mark.parametrize(
    "status, code",
    [
        (make_status(State.STARTING), 204),
        (make_status(State.STOPPED), 204),
        (make_status(State.BACKOFF, "exit 1"), 204),
        (make_status(State.READY), 200),
        (make_status(State.STOPPED, ever_ready=True), 200),
        (make_status(State.STOPPED, lazy=True), 200),
        (make_status(State.FAILED, "crash loop"), 503),
        (make_status(State.READY, draining=True), 503),
        (make_status(State.STARTING, draining=True), 503),
    ],
    ids=["starting", "stopped-before-start", "backoff", "ready", "unloaded", "lazy", "failed", "draining",
         "draining-while-starting"],
)
@pytest.mark.parametrize("path", ["/ping", "/"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest_twisted.ensureDeferred
async def test_ping_runpod_mode(status: Status, code: int, path: str, method: str) -> None:
    got, body, _ = await fetch(status, "runpod", path, method)
    assert (got, body) == (code, b"")


@pytest.mark.parametrize("state", list(State))
@pytest_twisted.ensureDeferred
async def test_livez_is_200(state: State) -> None:
    assert await fetch_json(make_status(state, draining=True), "/livez") == (200, {"status": "alive"})


@pytest.mark.parametrize(
    "status, body",
    [
        (make_status(State.READY), {"status": "ready", "state": "ready"}),
        (make_status(State.STOPPED, lazy=True), {"status": "ready", "state": "stopped"}),
        (make_status(State.STOPPED, ever_ready=True), {"status": "ready", "state": "stopped"}),
    ],
    ids=["ready", "lazy", "unloaded"],
)
@pytest_twisted.ensureDeferred
async def test_readyz_ready(status: Status, body: dict[str, str]) -> None:
    assert await fetch_json(status, "/readyz") == (200, body)


@pytest.mark.parametrize(
    "status, reason, state",
    [
        (make_status(State.STARTING), "loading model", "starting"),
        (make_status(State.BACKOFF, "exit code 139 (SIGSEGV)"),
         "backend restarting after: exit code 139 (SIGSEGV)", "backoff"),
        (make_status(State.FAILED, "5 failed starts in 120s"), "backend failed: 5 failed starts in 120s", "failed"),
        (make_status(State.READY, draining=True), "draining: shutting down", "ready"),
        (make_status(State.STOPPING), "backend stopping", "stopping"),
        (make_status(State.STOPPED), "stopped", "stopped"),
    ],
    ids=["starting", "backoff", "failed", "draining", "stopping", "stopped-eager"],
)
@pytest_twisted.ensureDeferred
async def test_readyz_unavailable(status: Status, reason: str, state: str) -> None:
    assert await fetch_json(status, "/readyz") == (503, {"status": "unavailable", "reason": reason, "state": state})


@pytest_twisted.ensureDeferred
async def test_readyz_follows_the_backend() -> None:
    status = make_status(State.STARTING)
    assert (await fetch_json(status, "/readyz"))[0] == 503
    status.backend.state = State.READY
    assert (await fetch_json(status, "/readyz"))[0] == 200
    status.draining = True
    assert (await fetch_json(status, "/readyz"))[0] == 503


@pytest_twisted.ensureDeferred
async def test_readyz_without_backend() -> None:
    status = Status(Clock(), None, "", lazy=False)
    assert await fetch_json(status, "/readyz") == (
        503, {"status": "unavailable", "reason": "no backend configured", "state": "none"}
    )
    assert (await fetch(status, "runpod", "/ping"))[0] == 503


@pytest.mark.parametrize("path", ["/health", "/ping/", "/v1/models", "/readyz/x", "/healthz"])
@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("state, mode, code", [(State.READY, "always", 200), (State.STARTING, "always", 200),
                                               (State.STARTING, "runpod", 204), (State.FAILED, "runpod", 503)])
@pytest_twisted.ensureDeferred
async def test_any_other_path_is_answered_as_ping(path: str, method: str, state: State, mode: str,
                                                  code: int) -> None:
    """A platform set up for llama-gguf-inference's health port (any path: 200) keeps working."""
    status = make_status(state, "x")
    assert await fetch(status, mode, path, method) == (code, b"", ANY)
    assert status.backend.snapshots == 0


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("path", ["/ping", "/readyz", "/livez", "/nowhere"])
@pytest_twisted.ensureDeferred
async def test_other_methods_are_405(method: str, path: str) -> None:
    code, body, headers = await fetch(make_status(State.READY), "runpod", path, method)
    assert (code, body) == (405, b"")
    assert headers.getRawHeaders(b"allow") == [b"GET, HEAD"]


@pytest_twisted.ensureDeferred
async def test_query_string_is_ignored() -> None:
    assert (await fetch(make_status(State.STARTING), "runpod", "/ping?probe=1"))[0] == 204


@pytest_twisted.ensureDeferred
async def test_ping_does_not_touch_the_backend() -> None:
    status = make_status(State.READY)
    await fetch(status, "runpod", "/ping")
    await fetch(status, "always", "/")
    assert status.backend.snapshots == 0
