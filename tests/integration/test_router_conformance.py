"""llamad's models API against the real llama-server router, live.

Runs ``llama-server --models-dir`` on demo models (and a junk file that fails to
load), drives ``GET /models``, ``POST /models/load`` and ``POST /models/unload``,
and checks that :mod:`llamad.gateway.models_api` answers each situation with the
same keys and JSON types, recursively (llamad's own ``"llamad"`` key aside).  A
llama.cpp upgrade that changes the router's API fails here; then recapture
tests/fixtures/router_shapes.json and adapt models_api.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import shapes

from helpers import alive, children_of, wait_for
from llamad.fleet.fleet import ModelSnapshot
from llamad.gateway.models_api import (
    ModelsApiError, child_meta, load_answer, models_list, requested_model, unload_answer,
)
from llamad.supervisor import free_port

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "router_shapes.json"
START_TIMEOUT = 120  # seconds: generous, the test box is small and busy
LOAD_TIMEOUT = 180
LLAMAD_KEY = frozenset({"llamad"})

# The router's status -> the llamad state that shows as it.
STATE_OF = {("unloaded", False): "stopped", ("loading", False): "starting", ("loaded", False): "ready",
            ("unloaded", True): "failed"}


def shape_diff(ours: Any, theirs: Any, path: str = "$", ignore: frozenset[str] = LLAMAD_KEY) -> list[str]:
    return shapes.shape_diff(ours, theirs, path, ignore)


def assert_same_shape(ours: Any, theirs: Any, what: str) -> None:
    diffs = shape_diff(ours, theirs)
    assert not diffs, f"{what}: llamad's answer no longer has the router's shape:\n" + "\n".join(diffs)


class Server:
    """A llama-server process on a loopback port, stopped by PID (its children too)."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.seen_children: set[int] = set()
        with open(log_path, "wb") as out:
            self.proc = subprocess.Popen([*args, "--host", "127.0.0.1", "--port", str(self.port)],
                                         stdout=out, stderr=subprocess.STDOUT)

    def request(self, method: str, path: str, body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
            conn.request(method, path, body=data,
                         headers={"content-type": "application/json"} if data is not None else {})
            response = conn.getresponse()
            return response.status, json.loads(response.read())
        finally:
            conn.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_listening(self, path: str) -> None:
        def up() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"llama-server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                return self.request("GET", path)[0] == 200
            except (OSError, ValueError, http.client.HTTPException):
                return False
        wait_for(up, START_TIMEOUT, f"llama-server on port {self.port}", interval=0.2)

    def children(self) -> list[int]:
        pids = children_of(self.proc.pid)
        self.seen_children.update(pids)
        return pids

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.children()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)
        for pid in self.seen_children:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def models_dir(tmp_path: Path, demo_model: str) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    for name in ("a", "b"):
        shutil.copyfile(demo_model, folder / f"{name}.gguf")
    (folder / "c.gguf").write_bytes(b"this is not a gguf file\n" * 64)
    return folder


@pytest.fixture
def child_meta_live(tmp_path: Path, demo_model: str, llama_server_bin: str) -> dict[str, Any]:
    """``meta`` as llamad would read it from its own child's ``/v1/models`` (a plain llama-server)."""
    server = Server([llama_server_bin, "-m", demo_model], tmp_path / "plain.log")
    try:
        server.wait_listening("/health")
        status, answer = server.request("GET", "/v1/models")
        assert status == 200
        meta = child_meta(answer)
        assert meta is not None, answer
        return meta
    finally:
        server.stop()


@pytest.fixture
def router(tmp_path: Path, models_dir: Path, llama_server_bin: str) -> Iterator[Server]:
    server = Server([llama_server_bin, "--models-dir", str(models_dir), "--models-max", "1"],
                    tmp_path / "router.log")
    try:
        server.wait_listening("/models")
        yield server
    finally:
        server.stop()


def snapshots_like(router_list: dict[str, Any], meta: dict[str, Any], path: str) -> list[ModelSnapshot]:
    """llamad's snapshots of the models in the states the router shows them in."""
    snaps = []
    for entry in router_list["data"]:
        status = entry["status"]
        state = STATE_OF[(status["value"], bool(status.get("failed", False)))]
        snaps.append(ModelSnapshot(
            id=entry["id"], state=state, path=f"{path}/{entry['id']}.gguf", created=int(time.time()),
            aliases=tuple(entry["aliases"]), args=tuple(status["args"]), memory_need=1 << 20,
            pid=1234 if state == "ready" else None, exit_code=status.get("exit_code"),
            meta=meta if state == "ready" else None, source="models_dir",
        ))
    return snaps


def test_llamads_models_api_has_the_live_routers_shape(router: Server, models_dir: Path,
                                                       child_meta_live: dict[str, Any]) -> None:
    fixture = json.loads(FIXTURE.read_text())["cases"]

    def statuses() -> dict[str, tuple[str, bool]]:
        body = router.request("GET", "/models")[1]
        router.children()
        return {m["id"]: (m["status"]["value"], bool(m["status"].get("failed"))) for m in body["data"]}

    def check_list(path: str, what: str) -> dict[str, Any]:
        status, theirs = router.request("GET", path)
        assert status == 200
        ours = models_list(snapshots_like(theirs, child_meta_live, str(models_dir)))
        assert_same_shape(ours, theirs, what)
        for mine, live in zip(ours["data"], theirs["data"]):
            assert mine["status"]["value"] == live["status"]["value"]
            assert mine["object"] == live["object"] == "model"
        return theirs

    def check_answer(ours: tuple[int, dict[str, Any]], theirs: tuple[int, Any], what: str) -> None:
        assert ours[0] == theirs[0], f"{what}: status {ours[0]} != router's {theirs[0]} {theirs[1]}"
        assert_same_shape(ours[1], theirs[1], what)
        if "error" in ours[1]:
            assert ours[1]["error"]["type"] == theirs[1]["error"]["type"], what
            assert ours[1]["error"]["code"] == theirs[1]["error"]["code"], what

    def snap(state: str) -> ModelSnapshot:
        return ModelSnapshot(id="a", state=state, path=str(models_dir / "a.gguf"), created=0)  # type: ignore[arg-type]

    # Nothing loaded: every model unloaded.
    initial = check_list("/models", "GET /models, nothing loaded")
    assert {m["id"] for m in initial["data"]} == {"a", "b", "c"}
    assert_same_shape(initial, fixture["models_initial"]["body"], "the live router vs the captured fixture")

    # Load: accepted at once, the child loads in the background.
    check_answer(load_answer(snap("stopped")), router.request("POST", "/models/load", {"model": "a"}), "load")
    check_answer(load_answer(snap("starting")), router.request("POST", "/models/load", {"model": "a"}),
                 "load while loading or loaded")
    check_list("/models", "GET /models, a loading or loaded")
    wait_for(lambda: statuses()["a"] == ("loaded", False), LOAD_TIMEOUT, "model a loaded", interval=0.2)
    loaded = check_list("/models", "GET /models, a loaded")
    assert_same_shape(loaded, fixture["models_loaded"]["body"], "the live router vs the captured fixture")
    check_list("/v1/models", "GET /v1/models, a loaded")
    check_answer(load_answer(snap("ready")), router.request("POST", "/models/load", {"model": "a"}),
                 "load of a loaded model")

    # Unload: a model not running, unknown models, bad bodies.
    check_answer(unload_answer(snap("stopped")), router.request("POST", "/models/unload", {"model": "b"}),
                 "unload of a model not running")
    check_answer(unload_answer(None), router.request("POST", "/models/unload", {"model": "nope"}),
                 "unload of an unknown model")
    check_answer(load_answer(None), router.request("POST", "/models/load", {"model": "nope"}),
                 "load of an unknown model")
    check_answer(load_answer(None), router.request("POST", "/models/load", {}), "load naming no model")
    status, theirs = router.request("POST", "/models/load", raw=b"not json")
    with pytest.raises(ModelsApiError) as caught:
        requested_model(b"not json")
    assert_same_shape(caught.value.answer()[1], theirs, "a body that is not JSON")  # router: 500, llamad: 400

    # Unload of the running model, then the list once it is gone.
    check_answer(unload_answer(snap("ready")), router.request("POST", "/models/unload", {"model": "a"}),
                 "unload of a loaded model")
    wait_for(lambda: statuses()["a"] == ("unloaded", False), LOAD_TIMEOUT, "model a unloaded", interval=0.2)
    check_list("/models", "GET /models, a unloaded again")

    # A model that fails to load: accepted, then unloaded with failed and exit_code.
    check_answer(load_answer(snap("stopped")), router.request("POST", "/models/load", {"model": "c"}),
                 "load of a junk file")
    wait_for(lambda: statuses()["c"] == ("unloaded", True), LOAD_TIMEOUT, "model c failed", interval=0.2)
    failed = check_list("/models", "GET /models, c failed")
    assert_same_shape(failed, fixture["models_failed"]["body"], "the live router vs the captured fixture")
    c = next(m for m in failed["data"] if m["id"] == "c")
    assert c["status"]["failed"] is True and c["status"]["exit_code"] != 0
    check_answer(unload_answer(snap("failed")), router.request("POST", "/models/unload", {"model": "c"}),
                 "unload of a failed model")
    check_answer(load_answer(snap("failed")), router.request("POST", "/models/load", {"model": "c"}),
                 "load of a failed model")
    wait_for(lambda: statuses()["c"] == ("unloaded", True), LOAD_TIMEOUT, "model c failed again", interval=0.2)
