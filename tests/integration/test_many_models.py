"""Many models behind one llamad: real llama-server children placed by memory, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import Stream, alive, metric, wait_for

pytestmark = pytest.mark.integration

GiB = 1 << 30


def fleet_toml(models: str, budget: str = "2500MiB", extra: str = "") -> str:
    return f'[fleet]\nmemory_budget = "{budget}"\nmin_resident = 0\n{extra}\n{models}'


def model_table(model_id: str, path: str, extra: str = "") -> str:
    return f'[models.{model_id}]\nmodel = "{path}"\nmemory = "1GiB"\n{extra}\n'


def models(daemon) -> dict[str, dict]:
    return daemon.health()["models"]


def loaded(daemon) -> set[str]:
    return {m for m, facts in models(daemon).items() if facts["state"] in ("starting", "ready", "backoff")}


def test_three_models_in_room_for_two_every_request_completes(start_llamad, demo_model):
    tables = "".join(model_table(m, demo_model) for m in "abc")
    daemon = start_llamad(toml=fleet_toml(tables), wait="listening")
    assert loaded(daemon) == set()  # nothing loads before a request asks
    streams = []
    seen_loaded: list[set[str]] = []
    for round_ in range(3):
        for model_id in "abc":
            body = {"model": model_id, "prompt": "Hello", "max_tokens": 64, "stream": True, "ignore_eos": True}
            streams.append(Stream(daemon.api_port, body).start())
    watching = threading.Event()

    def watch() -> None:
        while not watching.is_set():
            seen_loaded.append(loaded(daemon))

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        for s in streams:
            assert s.done.wait(300), "a stream never ended"
    finally:
        watching.set()
        watcher.join(30)
    failed = [s.describe() for s in streams if not s.completed]
    assert failed == [], failed  # no stream cut by a swap, no request lost while it waited for room
    assert max(len(m) for m in seen_loaded) <= 2  # the budget holds two
    assert metric(daemon, "llamad_model_swaps_total", {}) >= 1 or sum(
        metric(daemon, "llamad_model_swaps_total", {"model": m}) for m in "abc") >= 1


def test_kill_9_of_one_child_leaves_the_other_models_streaming(start_llamad, demo_model):
    # The victim's stream is far longer than the set-up, so that it is surely running at the kill: its one
    # slot has the whole context (with the default slots, each would stop at a slot's share of it).
    tables = "".join(model_table(m, demo_model, "context = 32768\nparallel = 1\n" if m == "c" else "")
                     for m in "abc")
    daemon = start_llamad(toml=fleet_toml(tables, budget="8GiB"), wait="listening")
    long = {"prompt": "Tell a long story.", "max_tokens": 1500, "stream": True, "ignore_eos": True}
    others = [Stream(daemon.api_port, {**long, "model": m}).start() for m in "ab"]
    victim = Stream(daemon.api_port, {**long, "model": "c", "max_tokens": 30000}).start()
    for s in (*others, victim):
        assert s.first_event.wait(120)
    pid = models(daemon)["c"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert victim.done.wait(120) and victim.interrupted, victim.describe()
    for s in others:
        assert s.done.wait(300) and s.completed, s.describe()  # untouched by the other model's crash
    again = Stream(daemon.api_port, {"model": "c", "prompt": "Hi", "max_tokens": 8, "stream": True}).start()
    assert again.done.wait(120) and again.completed, again.describe()
    assert models(daemon)["c"]["pid"] not in (None, pid)
    wait_for(lambda: not alive(pid), 30, "the killed child to be reaped")
    # Each ready child's own metrics, one family per name, one series per model.
    _, body, _ = daemon.request("GET", "/metrics")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    assert {s.labels["model"] for s in families["llamacpp:prompt_tokens"].samples} == {"a", "b", "c"}
    restarts = {(s.labels["model"], s.labels["reason"]): s.value for s in families["llamad_backend_restarts"].samples}
    assert restarts == {("c", "killed"): 1}


def test_models_dir_router_api_and_per_model_idle_unload(start_llamad, demo_model, tmp_path):
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    for name in ("qwen", "gemma"):
        shutil.copy(demo_model, shelf / f"{name}.gguf")
    daemon = start_llamad(toml=fleet_toml("", budget="8GiB", extra=f'models_dir = "{shelf}"\n')
                          + "[idle]\ntimeout = 2\n", wait="listening")
    status, body, _ = daemon.request("GET", "/models")
    listing = json.loads(body)
    assert status == 200 and sorted(m["id"] for m in listing["data"]) == ["gemma", "qwen"]
    assert {m["status"]["value"] for m in listing["data"]} == {"unloaded"}
    assert {m["source"] for m in listing["data"]} == {"models_dir"}

    status, body, _ = daemon.request("POST", "/models/load", body={"model": "qwen"})
    assert (status, json.loads(body)) == (200, {"success": True})
    wait_for(lambda: models(daemon)["qwen"]["state"] == "ready", 60, "qwen loaded")
    status, body, _ = daemon.request("POST", "/models/load", body={"model": "qwen"})
    assert status == 400 and "already running" in json.loads(body)["error"]["message"]
    status, body, _ = daemon.request("POST", "/models/unload", body={"model": "gemma"})
    assert status == 400 and "not running" in json.loads(body)["error"]["message"]
    status, _, _ = daemon.request("POST", "/models/load", body={"model": "nope"})
    assert status == 404

    # Per-model idle unload: qwen goes after its 2 s without a request; the log of each model is its own.
    wait_for(lambda: models(daemon)["qwen"]["state"] == "stopped", 60, "qwen unloaded when idle")
    assert (daemon.data_dir / "logs" / "llama" / "qwen" / "latest.txt").stat().st_size > 0

    status, body, _ = daemon.request("POST", "/v1/completions", body={"model": "gemma", "prompt": "x",
                                                                      "max_tokens": 4})
    assert status == 200 and json.loads(body)["choices"]
    status, body, _ = daemon.request("POST", "/models/unload", body={"model": "gemma"})
    assert status == 200
    wait_for(lambda: models(daemon)["gemma"]["state"] == "stopped", 60, "gemma unloaded")
    status, body, _ = daemon.request("POST", "/v1/completions", body={"prompt": "x", "max_tokens": 4})
    assert status == 400 and json.loads(body)["error"]["code"] == "model_required"


def test_idle_exit_waits_for_every_model(start_llamad, demo_model):
    tables = "".join(model_table(m, demo_model) for m in "ab")
    daemon = start_llamad(toml=fleet_toml(tables, budget="8GiB") + '[idle]\ntimeout = 2\naction = "exit"\n',
                          wait="listening")
    for model_id in "ab":
        status, _, _ = daemon.request("POST", "/v1/completions", body={"model": model_id, "prompt": "x",
                                                                       "max_tokens": 4})
        assert status == 200
    assert daemon.proc.wait(120) == 0  # every model idle for idle.timeout: drain, stop both children, exit 0
    assert "idle: exiting" in daemon.log()


def test_a_corrupt_gguf_fails_its_own_model_only(start_llamad, demo_model, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 64)
    tables = model_table("good", demo_model) + f'[models.bad]\nmodel = "{broken}"\n'
    daemon = start_llamad(toml=fleet_toml(tables, budget="8GiB") + "[supervisor]\ncrash_loop_limit = 1\n",
                          wait="listening")
    status, body, _ = daemon.request("POST", "/v1/completions", body={"model": "bad", "prompt": "x", "max_tokens": 4})
    assert status == 503 and b"backend" in body
    status, body, _ = daemon.request("POST", "/v1/completions", body={"model": "good", "prompt": "x",
                                                                      "max_tokens": 4})
    assert status == 200 and json.loads(body)["choices"]
    assert models(daemon)["bad"]["state"] == "failed" and daemon.health()["status"] == "ok"
