"""A fleet meeting faults with real llama-server children: an unload during a start, a broken model."""

from __future__ import annotations

import json
import stat
import threading
import time
from pathlib import Path

import pytest

from helpers import wait_for

pytestmark = pytest.mark.integration

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def tables(models: dict[str, str], extra: str = "") -> str:
    return "".join(f'[models.{model_id}]\nmodel = "{path}"\nmemory = "1GiB"\n{extra}\n'
                   for model_id, path in models.items())


def slow_start(tmp_path: Path, llama_server_bin: str) -> str:
    """A llama-server that takes 2 s more to start: room for something to happen meanwhile."""
    path = tmp_path / "slow-llama-server"
    path.write_text(f'#!/bin/sh\nsleep 2\nexec "{llama_server_bin}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


def test_a_forced_unload_during_the_start_does_not_stall_the_requests_waiting_for_it(
        start_llamad, demo_model, tmp_path, llama_server_bin):
    toml = ('[fleet]\nmemory_budget = "8GiB"\n[admission]\nqueue_timeout = 20\n'
            + tables({"a": demo_model, "b": demo_model}, f'command = "{slow_start(tmp_path, llama_server_bin)}"'))
    daemon = start_llamad(toml=toml, wait="listening")
    answers: list[int] = []

    def ask() -> None:
        answers.append(daemon.request("POST", "/v1/chat/completions", body={**CHAT, "model": "a"}, timeout=90)[0])

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    wait_for(lambda: daemon.health()["models"]["a"]["state"] == "starting", 30, "a starting")
    status, body, _ = daemon.request("POST", "/models/unload", body={"model": "a", "force": True})
    assert status == 200, body
    for t in threads:
        t.join(90)
    assert answers == [200, 200, 200]  # answered by the next start; a stall would end in 503 at queue_timeout


def test_a_broken_model_does_not_hold_a_slot_while_it_fails(start_llamad, demo_model, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF file\n" * 100)
    toml = ('[fleet]\nmax_loaded = 1\nmemory_budget = "8GiB"\n'
            + tables({"good": demo_model}) + f'[models.bad]\nmodel = "{broken}"\nmemory = "1GiB"\n')
    daemon = start_llamad(toml=toml, wait="listening")
    for _ in range(3):
        status, body, _ = daemon.request("POST", "/v1/chat/completions", body={**CHAT, "model": "bad"})
        assert status == 503, body
        assert "start failed" in json.loads(body)["error"]["message"] or "failed" in json.loads(body)["error"]["message"]
        # The good model gets the one slot at once: the broken one gave it back.
        status, body, _ = daemon.request("POST", "/v1/chat/completions", body={**CHAT, "model": "good"}, timeout=60)
        assert status == 200, body
    time.sleep(4)  # longer than its first back-offs (1 s, then 2 s): a respawn on its own would show
    assert daemon.health()["models"]["bad"]["state"] in ("stopped", "failed")
    assert daemon.log().count("model bad failed to start") == 3  # once per request that asked, no more
