"""Scale to zero inside the worker: idle unload/exit and cold starts, with twistd and the real llama-server."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import threading
import time

import openai
import pytest

from helpers import alive, children_of, wait_for

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi"}]


class Poller:
    """Polls a URL every 100 ms in a thread, remembering every status."""

    def __init__(self, daemon, path: str, port: str) -> None:
        self.codes: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(daemon, path, port), daemon=True)
        self.thread.start()

    def _run(self, daemon, path: str, port: str) -> None:
        while not self.stop.is_set():
            self.codes.append(daemon.request("GET", path, port=port, timeout=5)[0])
            time.sleep(0.1)

    def close(self) -> list[int]:
        self.stop.set()
        self.thread.join(5)
        return self.codes


def test_idle_unload_then_ten_requests_share_one_cold_start(start_llamad, llama_server_bin, tmp_path):
    # A start that takes 1 s, so that all ten requests surely arrive while it runs.
    slow = tmp_path / "slow-llama-server"
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec "{llama_server_bin}" "$@"\n')
    slow.chmod(0o755)
    daemon = start_llamad({"command": str(slow)}, toml="[idle]\ntimeout = 2\naction = \"unload\"\n")
    ping = Poller(daemon, "/ping", "health")
    try:
        api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0)
        api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
        last_response = time.monotonic()  # the request's activity ended before this
        first = daemon.backend_pid()
        assert first and alive(first)  # not unloaded under (or right after) the request
        wait_for(lambda: not alive(first), 60, "the idle unload", interval=0.05)
        unloaded_after = time.monotonic() - last_response
        # Not before the 2 s timeout, counted from the end of the request (with 1 s of slack for the response
        # to reach this client).  No upper bound: a slow machine only unloads later.  The exact time is
        # tested on a Clock in tests/unit/test_idle.py and tests/unit/test_idle_unload.py.
        assert unloaded_after > 1.0, unloaded_after
        assert children_of(daemon.proc.pid) == []
        assert daemon.health()["state"] == "stopped"
        assert daemon.request("GET", "/readyz", port="health")[0] == 200  # startable on demand

        with concurrent.futures.ThreadPoolExecutor(10) as pool:
            results = list(pool.map(lambda _: api.chat.completions.with_raw_response.create(
                model="demo", messages=MESSAGES, max_tokens=2), range(10)))
        assert all(r.http_response.status_code == 200 for r in results)
        # Each one waited for the start (a request that came once the child was ready would carry no header;
        # how long each waited depends on when the pool's thread sent it, on a loaded machine too).
        waited = [r.headers.get("x-llamad-cold-start") for r in results]
        assert all(w is not None and float(w) > 0 for w in waited), waited
        children = daemon.children()
        assert len(children) == 1 and children[0] != first
        metrics = daemon.request("GET", "/metrics")[1].decode()
        assert "llamad_cold_starts_total 1.0" in metrics and "llamad_idle_unloads_total 1.0" in metrics
    finally:
        codes = ping.close()
    assert codes and set(codes) == {200}


def test_probes_never_wake_an_unloaded_model(start_llamad):
    daemon = start_llamad({"start": "lazy"}, wait="listening")
    assert daemon.health()["state"] == "stopped"
    for _ in range(5):
        for path in ("/ping", "/livez", "/readyz", "/"):
            assert daemon.request("GET", path, port="health")[0] == 200
        assert daemon.request("GET", "/health")[0] == 200
        assert daemon.request("GET", "/metrics")[0] == 200
        status, body, _ = daemon.request("GET", "/v1/models")
        assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["demo"]
        assert daemon.request("GET", "/props")[0] == 503
    time.sleep(0.3)
    assert children_of(daemon.proc.pid) == [] and daemon.health()["state"] == "stopped"


def test_idle_exit_ends_the_process_with_0(start_llamad):
    daemon = start_llamad(toml="[idle]\ntimeout = 1\naction = \"exit\"\n")
    pid = daemon.backend_pid()
    assert daemon.proc.wait(20) == 0
    assert not alive(pid)
    assert "idle: exiting" in daemon.log()


def test_failed_cold_start_answers_every_waiter_with_503(start_llamad, tmp_path):
    broken = tmp_path / "broken-llama-server"
    broken.write_text("#!/bin/sh\necho 'error: this model cannot load' >&2\nexit 1\n")
    broken.chmod(0o755)
    daemon = start_llamad({"start": "lazy", "command": str(broken)},
                          toml="[supervisor]\nbackoff_initial = 5\n", wait="listening")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: daemon.request("POST", "/v1/completions",
                                                         body={"prompt": "a"}), range(4)))
    for status, body, headers in results:
        assert status == 503, body
        assert "exited with code 1" in json.loads(body)["error"]["message"]


def test_runpod_ping_mode(start_llamad, llama_server_bin, tmp_path):
    slow = tmp_path / "slow-llama-server"
    slow.write_text(f'#!/bin/sh\nsleep 2\nexec "{llama_server_bin}" "$@"\n')
    slow.chmod(0o755)
    daemon = start_llamad({"command": str(slow)}, wait="listening",
                          toml="[health]\nping = \"runpod\"\n[idle]\ntimeout = 1\n")
    assert daemon.request("GET", "/ping", port="health")[0] == 204  # loading
    daemon.wait_state("ready")
    assert daemon.request("GET", "/ping", port="health")[0] == 200
    pid = daemon.backend_pid()
    wait_for(lambda: not alive(pid), 10, "the idle unload")
    assert daemon.request("GET", "/ping", port="health")[0] == 200  # unloaded, startable
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(30) == 0


def test_openai_client_streams_through_a_slow_cold_start(start_llamad, llama_server_bin, tmp_path):
    """The `: loading` comments sent while the child loads are ignored by the official client."""
    slow = tmp_path / "slow-llama-server"
    slow.write_text(f'#!/bin/sh\nsleep 4\nexec "{llama_server_bin}" "$@"\n')
    slow.chmod(0o755)
    daemon = start_llamad({"command": str(slow), "start": "lazy"}, wait="listening")
    api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0)
    started = time.monotonic()
    chunks = list(api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=6, stream=True))
    assert time.monotonic() - started > 3.5  # it really waited past the first comment
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].choices[0].finish_reason == "length"
    assert daemon.health()["state"] == "ready"
