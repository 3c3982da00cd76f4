"""Keys with a policy in front of two real llama-server models: scopes, roles, a token quota that a
running stream crosses, priority in a full queue, reload, the access log under ``tail -F``, and
``llamad keys usage`` against the metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import BIN, wait_for

from llamad.keys.access import log_files

pytestmark = pytest.mark.integration

A, B, C, Q, OPS = ("scoped-key-0123456789", "high-key-012345678901", "plain-key-01234567890",
                   "quota-key-01234567890", "ops-key-01234567890123")


def keys_toml(quota: int = 40) -> str:
    return f"""
[keys.a]
key = "{A}"
models = ["one"]

[keys.b]
key = "{B}"
priority = "high"

[keys.c]
key = "{C}"

[keys.q]
key = "{Q}"
models = ["two"]
tokens_per_minute = {quota}

[keys.ops]
key = "{OPS}"
role = ["admin"]
"""


def start(start_llamad, tmp_path: Path, demo_model: str, llama_server_bin: str, extra: str = "",
          data_dir: Path | None = None):
    keys = tmp_path / "keys.toml"
    keys.write_text(keys_toml())
    slow = tmp_path / "slow-llama-server"  # model one takes a few seconds to start: requests queue meanwhile
    slow.write_text(f"#!/bin/sh\nsleep 3\nexec {llama_server_bin} \"$@\"\n")
    slow.chmod(0o755)
    toml = (f'[auth]\nenabled = true\nkeys_file = "{keys}"\npriorities = {{high = 1}}\n'
            f'[logs]\nmax_bytes = 1024\nkeep = 50\n'
            f'[fleet]\nmemory_budget = "8GiB"\nmin_resident = 0\n{extra}\n'
            f'[models.one]\nmodel = "{demo_model}"\nmemory = "1GiB"\nparallel = 1\ncommand = "{slow}"\n'
            f'[models.two]\nmodel = "{demo_model}"\nmemory = "1GiB"\n')
    return start_llamad(toml=toml, wait="listening", data_dir=data_dir), keys


def call(daemon, key: str, path: str, body=None, method: str = "POST"):
    status, data, headers = daemon.request(method, path, body=body, headers={"authorization": f"Bearer {key}"},
                                           timeout=120)
    return status, json.loads(data) if data else None, headers


def completion(daemon, key: str, model: str, **extra):
    return call(daemon, key, "/v1/completions", {"model": model, "prompt": "Hello", "max_tokens": 4, **extra})


def test_scopes_roles_quota_and_reload(start_llamad, tmp_path, demo_model, llama_server_bin):
    daemon, keys = start(start_llamad, tmp_path, demo_model, llama_server_bin)
    # Scopes: another model answers as if it did not exist, and lists show the key's models only.
    status, body, _ = completion(daemon, A, "two")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert body["error"]["message"].endswith("(models here: one)")
    for path in ("/v1/models", "/models"):
        status, body, _ = call(daemon, A, path, method="GET")
        assert status == 200 and [m["id"] for m in body["data"]] == ["one"], path
        status, body, _ = call(daemon, C, path, method="GET")
        assert [m["id"] for m in body["data"]] == ["one", "two"], path
    # Roles: an inference key cannot load a model, the admin key cannot run one.
    status, body, _ = call(daemon, C, "/models/load", {"model": "two"})
    assert status == 403 and body["error"]["code"] == "insufficient_role"
    status, body, _ = completion(daemon, OPS, "two")
    assert status == 403 and body["error"]["code"] == "insufficient_role"
    status, body, _ = call(daemon, OPS, "/models/load", {"model": "two"})
    assert status == 200
    # A token quota: the stream that crosses it runs to its end; the next request is refused.
    stream = subprocess_stream(daemon, Q, {"model": "two", "prompt": "Tell a story", "max_tokens": 60,
                                           "ignore_eos": True, "stream": True})
    assert stream[-1] == b"data: [DONE]" and len(stream) > 60
    status, body, headers = completion(daemon, Q, "two")
    assert status == 429 and body["error"]["code"] == "token_quota_exceeded"
    assert 1 <= int(headers["retry-after"]) <= 61
    # A restart on the same volume does not hand out a fresh quota.
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0
    daemon, keys = start(start_llamad, tmp_path, demo_model, llama_server_bin, data_dir=daemon.data_dir)
    assert "token use: restored the windows of 1 key(s)" in daemon.log()
    status, body, _ = completion(daemon, Q, "two")
    assert status == 429 and body["error"]["code"] == "token_quota_exceeded"
    # Reload: what the key used survives; a larger quota applies at once.
    loads = daemon.log().count("api keys: 5 loaded")
    keys.write_text(keys_toml(quota=40) + "\n[keys.new]\nkey = \"new-key-0123456789abc\"\n")
    os.kill(daemon.proc.pid, signal.SIGHUP)
    wait_for(lambda: "api keys: 6 loaded" in daemon.log(), 30, "the reload")
    assert daemon.log().count("api keys: 5 loaded") == loads
    assert completion(daemon, Q, "two")[0] == 429
    assert completion(daemon, "new-key-0123456789abc", "two")[0] == 200
    keys.write_text(keys_toml(quota=100000))
    status, body, _ = call(daemon, OPS, "/admin/reload")
    assert status == 200 and body["keys"] == 5
    assert completion(daemon, Q, "two")[0] == 200
    assert completion(daemon, "new-key-0123456789abc", "two")[0] == 401


def subprocess_stream(daemon, key: str, body: dict) -> list[bytes]:
    """A streamed completion read to its end: its data lines."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.api_port, timeout=120)
    try:
        conn.request("POST", "/v1/completions", json.dumps(body),
                     {"content-type": "application/json", "authorization": f"Bearer {key}"})
        response = conn.getresponse()
        assert response.status == 200
        return [line.strip() for line in response if line.startswith(b"data: ")]
    finally:
        conn.close()


def test_a_higher_class_goes_first_in_a_full_queue(start_llamad, tmp_path, demo_model, llama_server_bin):
    daemon, _ = start(start_llamad, tmp_path, demo_model, llama_server_bin)
    finished: list[str] = []

    def request(name: str, key: str) -> None:
        status = completion(daemon, key, "one")[0]
        finished.append(f"{name} {status}")

    def queued() -> int:
        return daemon.health()["models"]["one"]["queued"]

    threads = []
    for name, key, waiting in (("holder", C, 1), ("low", C, 2), ("high", B, 3)):
        threads.append(threading.Thread(target=request, args=(name, key), daemon=True))
        threads[-1].start()
        wait_for(lambda: queued() >= waiting, 30, f"{name} to wait")  # model one is still starting
    for thread in threads:
        thread.join(120)
    assert sorted(finished) == ["high 200", "holder 200", "low 200"]
    # One slot: the holder first, then the later request of the higher class, then the earlier low one.  The
    # order is llamad's, from its access log (the client threads may record the ends in another order).
    access = daemon.data_dir / "logs" / "access"

    def served() -> list[str]:
        entries = [json.loads(line) for line in _lines(access) if line.strip()]
        return [e["key_id"] for e in entries if e["route"] == "/v1/completions"]

    wait_for(lambda: len(served()) >= 3, 30, "the three access-log lines")
    assert served() == ["c", "b", "c"]


def test_the_access_log_follows_rotation_and_usage_matches_the_metrics(start_llamad, tmp_path, demo_model,
                                                                       llama_server_bin):
    daemon, _ = start(start_llamad, tmp_path, demo_model, llama_server_bin)
    access = daemon.data_dir / "logs" / "access"
    seen = tmp_path / "tail.out"  # a file, not a pipe: a full pipe would stall tail itself
    with open(seen, "wb") as out:
        tail = subprocess.Popen(["tail", "-n", "+1", "-F", "-s", "0.05", str(access / "latest.txt")],
                                stdout=out, stderr=subprocess.DEVNULL)
    try:
        expected = []
        for i in range(12):
            key, model = ((C, "two"), (A, "one"), (Q, "two"))[i % 3]
            status = completion(daemon, key, model)[0]
            expected.append((key, model, status))
            if i % 2:  # lines reach the file in batches: two at a time here, so that it rotates often
                wait_for(lambda: sum(1 for _ in _lines(access)) >= i + 1, 30, "the lines written")
        assert len(list(access.glob("*_access_*.log"))) >= 2  # 1024 bytes hold about four lines
        wait_for(lambda: seen.read_bytes().count(b"\n") >= len(expected), 30, "tail to follow every line")
    finally:
        tail.send_signal(signal.SIGTERM)
        tail.wait(10)
    followed = [json.loads(line) for line in seen.read_bytes().splitlines() if line.strip()]
    assert [(e["key_id"], e["model"], e["status"]) for e in followed] == [
        ({C: "c", A: "a", Q: "q"}[key], model, status) for key, model, status in expected]
    # keys usage (archives and latest.txt) matches llamad_tokens_total per key.
    config = next(tmp_path.glob("llamad*.toml"))
    result = subprocess.run([str(BIN / "llamad"), "keys", "--config", str(config), "usage", "--json"],
                            capture_output=True, text=True, env={**os.environ, "DATA_DIR": str(daemon.data_dir)},
                            timeout=60)
    assert result.returncode == 0, result.stderr
    usage: dict[str, int] = {}
    for row in json.loads(result.stdout)["usage"]:
        usage[row["key_id"]] = usage.get(row["key_id"], 0) + row["total_tokens"]
    _, text, _ = daemon.request("GET", "/metrics", headers={"authorization": f"Bearer {C}"})
    tokens: dict[str, float] = {}
    for family in text_string_to_metric_families(text.decode()):
        if family.name == "llamad_tokens":
            for sample in family.samples:
                tokens[sample.labels["key_id"]] = tokens.get(sample.labels["key_id"], 0) + sample.value
    assert usage == {k: int(v) for k, v in tokens.items()} and set(usage) == {"a", "c", "q"}
    assert all(v > 0 for v in usage.values())


def _lines(directory: Path):
    """The access log's lines, archives first: the files ``llamad keys usage`` reads (not the short-lived
    ``latest.txt.new`` of a rotation)."""
    for path in log_files(str(directory)):
        yield from Path(path).read_bytes().splitlines()
