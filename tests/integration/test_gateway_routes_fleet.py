"""Two real llama-server models behind llamad, reached by every spelling of a route: a ``#fragment``,
``/upstream/<id>/...`` (the same checks, quota, key concurrency, in-flight count and cold start as the plain
route), the JSON bodies the child parses, and non-inference POSTs routed by their ``model``."""

from __future__ import annotations

import http.client
import json
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

from helpers import wait_for

from llamad.keys.access import log_files

pytestmark = pytest.mark.integration

PLAIN, QUOTA, ONE = "plain-key-0123456789", "quota-key-0123456789", "one-at-a-time-key-01"
KEYS = f"""
[keys.plain]
key = "{PLAIN}"

[keys.quota]
key = "{QUOTA}"
models = ["two"]
tokens_per_day = 30

[keys.one]
key = "{ONE}"
max_concurrent = 1
"""


def start(start_llamad, tmp_path: Path, demo_model: str):
    keys = tmp_path / "keys.toml"
    keys.write_text(KEYS)
    toml = (f'[auth]\nenabled = true\nkeys_file = "{keys}"\n'
            f'[fleet]\nmemory_budget = "8GiB"\nmin_resident = 0\n'
            f'[models.one]\nmodel = "{demo_model}"\nmemory = "1GiB"\n'
            f'[models.two]\nmodel = "{demo_model}"\nmemory = "1GiB"\n')
    return start_llamad(toml=toml, wait="listening")


def raw(daemon, key: str, target: str, body: bytes | dict, method: str = "POST"):
    """One request with ``body`` sent as it is (a dict as JSON): status, parsed JSON answer, headers."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn = http.client.HTTPConnection("127.0.0.1", daemon.api_port, timeout=120)
    try:
        conn.request(method, target, body=data,
                     headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
        response = conn.getresponse()
        text = response.read()
        return response.status, json.loads(text) if text else None, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def states(daemon) -> dict[str, str]:
    return {model: facts["state"] for model, facts in daemon.health()["models"].items()}


class Stream:
    """A streamed completion read one data line at a time."""

    def __init__(self, daemon, key: str, target: str, body: dict) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", daemon.api_port, timeout=120)
        self.conn.request("POST", target, body=json.dumps({**body, "stream": True}),
                          headers={"content-type": "application/json", "authorization": f"Bearer {key}"})
        self.response = self.conn.getresponse()
        assert self.response.status == 200

    def next_data(self) -> bytes:
        for line in self.response:
            if line.startswith(b"data: "):
                return line.strip()
        raise AssertionError("the stream ended without data")

    def rest(self) -> list[bytes]:
        try:
            return [line.strip() for line in self.response if line.startswith(b"data: ")]
        finally:
            self.conn.close()


def access(daemon) -> list[dict]:
    lines = []
    for path in log_files(str(daemon.data_dir / "logs" / "access")):
        lines += [json.loads(line) for line in Path(path).read_bytes().splitlines() if line.strip()]
    return lines


def test_every_spelling_of_a_route_gets_the_same_checks_policy_and_model(start_llamad, tmp_path, demo_model):
    daemon = start(start_llamad, tmp_path, demo_model)
    chat = {"model": "two", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    # A fragment is refused before routing: it neither reaches the default model nor wakes the one named.
    status, body, _ = raw(daemon, PLAIN, "/v1/chat/completions#", chat)
    assert status == 400 and body["error"]["code"] == "invalid_request_target"
    # /upstream/<id>/ gets the same strict JSON as the plain route, and so do the child's other JSON routes.
    for target, data in (("/upstream/two/v1/chat/completions", b'{"messages": [], "temperature": NaN}'),
                         ("/upstream/two/v1/chat/completions", b'{"messages": [], "max_tokens": 1e999}'),
                         ("/tokenize", b'{"model": "two", "content": "x", "n": -1e999}'),
                         ("/upstream/two/tokenize", b'{"content": 1e999}'),
                         ("/apply-template", b'{"model": "two", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}"),
                         ("/v1/messages/count_tokens", b'{"model": "two", "max_tokens": NaN}')):
        status, body, _ = raw(daemon, PLAIN, target, data)
        assert status == 400 and body["error"]["code"] == "invalid_json", (target, body)
    assert states(daemon) == {"one": "stopped", "two": "stopped"}  # nothing reached a model
    # An inference route under /upstream/ starts its stopped model, as the plain route does.
    status, body, headers = raw(daemon, PLAIN, "/upstream/two/v1/chat/completions", chat)
    assert status == 200 and body["choices"] and "x-llamad-cold-start" in headers
    # A non-inference POST goes to the model its body names (one is not loaded: such routes never wake it).
    status, body, _ = raw(daemon, PLAIN, "/tokenize", {"model": "two", "content": "Hello"})
    assert status == 200 and body["tokens"]
    status, body, _ = raw(daemon, PLAIN, "/tokenize", {"model": "one", "content": "Hello"})
    assert status == 503 and body["error"]["code"] == "backend_not_ready"
    assert states(daemon)["one"] == "stopped"
    # A token quota counts and refuses under /upstream/ too.
    statuses = []
    for _ in range(12):
        status, body, _ = raw(daemon, QUOTA, "/upstream/two/v1/completions", {"prompt": "Hello", "max_tokens": 8})
        statuses.append(status)
        if status != 200:
            break
    assert statuses[-1] == 429 and body["error"]["code"] == "token_quota_exceeded" and len(statuses) > 1
    served = lambda: [e for e in access(daemon) if e["key_id"] == "quota" and e["status"] == 200]  # noqa: E731
    used = wait_for(lambda: len(served()) == len(statuses) - 1 and served(), 30, "the access log's lines")
    assert all(e["route"] == "/v1/completions" and e["model"] == "two" for e in used)
    assert sum(e["prompt_tokens"] + e["completion_tokens"] for e in used) >= 30
    # A stream under /upstream/ counts in its model's in-flight requests (what keeps the fleet from unloading
    # it), and holds the key's one place: a second request of the key waits for its end.
    first = Stream(daemon, ONE, "/upstream/two/v1/completions",
                   {"prompt": "Tell a story", "max_tokens": 900, "ignore_eos": True})
    first.next_data()
    assert daemon.health()["models"]["two"]["in_flight"] == 1
    second: list[int] = []
    waiter = threading.Thread(target=lambda: second.append(
        raw(daemon, ONE, "/upstream/two/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0]), daemon=True)
    waiter.start()
    assert first.rest()[-1] == b"data: [DONE]"
    waiter.join(120)
    assert second == [200]
    wait_for(lambda: len([e for e in access(daemon) if e["key_id"] == "one"]) == 2, 30, "both access lines")
    streamed, after = [e for e in access(daemon) if e["key_id"] == "one"]
    assert streamed["completion_tokens"] > 0
    # llamad's own account of the order: the second was let in only once the stream had ended.
    admitted = _wall(after["time"]) - after["duration"] + after["queue_wait"]
    assert admitted >= _wall(streamed["time"]) - 0.005


def _wall(stamp: str) -> float:
    return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
