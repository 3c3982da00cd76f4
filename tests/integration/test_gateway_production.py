"""Port 8000 against real traffic and abuse: a twistd subprocess and the real llama-server."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import raw, status_of, wait_for

pytestmark = pytest.mark.integration

LLAMAD = str(Path(sys.executable).parent / "llamad")
MESSAGES = [{"role": "user", "content": "hi"}]


def new_key(keys_file: Path, key_id: str, *extra: str) -> str:
    out = subprocess.run([LLAMAD, "keys", "--file", str(keys_file), "generate", key_id, *extra],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip()


def samples(daemon, key: str | None = None) -> dict:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    body = daemon.request("GET", "/metrics", headers=headers)[1].decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(body) for s in f.samples}


def test_api_keys_end_to_end(start_llamad, tmp_path):
    keys_file = tmp_path / "api_keys.txt"
    first = new_key(keys_file, "alice")
    daemon = start_llamad(toml=f'[auth]\nenabled = true\nkeys_file = "{keys_file}"\n')

    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="wrong-key-0123456789", max_retries=0
                      ).models.list()
    api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key=first, max_retries=0)
    assert api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2).usage.completion_tokens == 2
    status, body, _ = daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1},
                                     headers={"x-api-key": first})
    assert status == 200
    status, body, headers = daemon.request("POST", "/v1/completions", body={"prompt": "a"})
    assert status == 401 and json.loads(body) == {"error": {
        "message": "Missing API key: send 'Authorization: Bearer <key>'", "type": "invalid_request_error",
        "param": "authorization", "code": "invalid_api_key"}}
    assert daemon.request("GET", "/ping")[0] == 200 and daemon.request("GET", "/health")[0] == 200
    assert daemon.request("GET", "/ping", port="health")[0] == 200

    # A stream in flight is not dropped by a reload; the new key works after SIGHUP.
    stream = api.completions.create(model="demo", prompt="x", max_tokens=400, stream=True,
                                    extra_body={"ignore_eos": True})
    first_chunk = next(iter(stream))
    second = new_key(keys_file, "bob")
    daemon.proc.send_signal(signal.SIGHUP)
    rest = list(stream)
    assert first_chunk and rest and rest[-1].choices[0].finish_reason == "length"
    bob = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key=second, max_retries=0)
    wait_for(lambda: _works(bob), 10, "the new key after SIGHUP")

    # `llamad keys revoke` + `llamad keys reload` (POST /admin/reload) removes it.
    subprocess.run([LLAMAD, "keys", "--file", str(keys_file), "revoke", "bob"], check=True, capture_output=True)
    subprocess.run([LLAMAD, "keys", "reload", "--url", daemon.base_url, "--key", first], check=True,
                   capture_output=True)
    assert not _works(bob)
    assert daemon.request("POST", "/admin/reload")[0] == 401


def _works(api: openai.OpenAI) -> bool:
    try:
        api.models.list()
        return True
    except openai.AuthenticationError:
        return False


def test_rate_limit_and_expiry(start_llamad, tmp_path):
    keys_file = tmp_path / "keys.txt"
    limited = new_key(keys_file, "limited", "--rate", "2")
    expired = new_key(keys_file, "old", "--expires", "2020-01-01T00:00:00")
    daemon = start_llamad(toml=f'[auth]\nenabled = true\nkeys_file = "{keys_file}"\n')
    auth = {"authorization": f"Bearer {limited}"}
    assert [daemon.request("GET", "/v1/models", headers=auth)[0] for _ in range(2)] == [200, 200]
    status, body, headers = daemon.request("GET", "/v1/models", headers=auth)
    assert status == 429 and int(headers["retry-after"]) >= 1
    status, body, _ = daemon.request("GET", "/v1/models", headers={"authorization": f"Bearer {expired}"})
    assert status == 401 and json.loads(body)["error"]["message"] == "API key has expired"


def test_auth_fails_closed_with_no_keys(start_llamad, tmp_path):
    daemon = start_llamad(toml=f'[auth]\nenabled = true\nkeys_file = "{tmp_path / "none.txt"}"\n')
    assert daemon.request("GET", "/v1/models", headers={"authorization": "Bearer anything-at-all-123"})[0] == 401
    assert "holds no valid key" in daemon.log()


def test_bad_input_gets_clear_answers_and_the_daemon_keeps_serving(start_llamad):
    daemon = start_llamad(toml="[api]\nmax_body_bytes = 1000\nheader_timeout = 1\n")
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"

    # Over the limit by Content-Length: 413 before any body byte is sent.
    response = raw(daemon, head + b"Content-Length: 5000\r\n\r\n")
    assert status_of(response) == 413 and b"payload_too_large" in response

    # A chunked body: accepted under the limit, cut at the limit.
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
    chunked = head + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    assert status_of(raw(daemon, chunked)) == 200
    big = b"x" * 600
    response = raw(daemon, head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                   % (len(big), big, len(big), big))
    assert status_of(response) == 413

    # Headers: too many, or one too long -> 431; request line too long -> 414.
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(70))
    assert status_of(raw(daemon, b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")) == 431
    assert status_of(raw(daemon, b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"a" * 9000 + b"\r\n\r\n")) == 431
    assert status_of(raw(daemon, b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")) == 414

    # Slowloris: header lines trickled without end are cut off with 408 while the client is still sending
    # them (header_timeout bounds the whole head, not the gap between two lines).
    sock = socket.create_connection(("127.0.0.1", daemon.api_port), timeout=5)
    sock.sendall(b"GET /v1/models HTTP/1.1\r\n")
    sock.settimeout(0.01)
    received = b""
    # A line every 0.2 s, never the end of the head: api.max_headers (64) lines would take 13 s.
    for _ in range(300):
        try:
            sock.sendall(b"X-Slow: 1\r\n")
        except OSError:
            break  # closed by the server
        time.sleep(0.2)
        try:
            chunk = sock.recv(4096)
        except socket.timeout:
            continue
        except OSError:
            break
        if not chunk:
            break
        received += chunk
        if b"\r\n\r\n" in received:
            break  # the server answered before the client ended its head
    else:
        pytest.fail("the server kept reading trickled header lines")
    sock.close()
    assert status_of(received) == 408, received

    # Bad JSON, wrong method, path tricks.
    for payload in (b"not json", b"[1, 2]", b""):
        response = raw(daemon, head + b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(payload), payload))
        assert status_of(response) == 400, response
    assert daemon.request("GET", "/v1/chat/completions")[0] == 405
    for path in ("//v1/models", "/v1/../v1/models", "/v1/%2e%2e/v1/models", "/v1%2fmodels"):
        assert daemon.request("GET", path)[0] == 400, path
    assert daemon.request("TRACE", "/")[0] == 405

    # Still serving.
    assert daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})[0] == 200
    assert daemon.request("GET", "/ping", port="health")[0] == 200


def test_admission_queue_full_and_timeout(start_llamad):
    daemon = start_llamad({"parallel": 1}, toml="[admission]\nmax_queue = 1\nqueue_timeout = 2\n")
    api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0)
    long = api.completions.create(model="demo", prompt="x", max_tokens=4000, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(long))  # holds the only slot

    results: list = []
    waiter = threading.Thread(target=lambda: results.append(
        daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})))
    waiter.start()
    wait_for(lambda: samples(daemon)[("llamad_queue_depth", ())] == 1, 10, "one queued request")
    status, body, headers = daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})
    assert status == 503 and json.loads(body)["error"]["code"] == "queue_full" and headers["retry-after"]
    waiter.join(10)
    status, body, _ = results[0]
    assert status == 503 and json.loads(body)["error"]["code"] == "queue_timeout"
    long.close()
    m = samples(daemon)
    assert m[("llamad_queue_rejections_total", (("reason", "queue_full"),))] == 1
    assert m[("llamad_queue_rejections_total", (("reason", "queue_timeout"),))] == 1
    assert m[("llamad_queue_depth", ())] == 0
    # The slot comes back once the stream is gone.
    wait_for(lambda: daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})[0] == 200,
             10, "the freed slot")


def test_queued_waiter_that_disconnects_leaves_the_queue(start_llamad):
    daemon = start_llamad({"parallel": 1}, toml="[admission]\nmax_queue = 1\nqueue_timeout = 60\n")
    api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0)
    long = api.completions.create(model="demo", prompt="x", max_tokens=4000, stream=True,
                                  extra_body={"ignore_eos": True})
    next(iter(long))
    body = json.dumps({"prompt": "a", "max_tokens": 1}).encode()
    sock = socket.create_connection(("127.0.0.1", daemon.api_port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: samples(daemon)[("llamad_queue_depth", ())] == 1, 10, "the queued request")
    sock.close()
    wait_for(lambda: samples(daemon)[("llamad_queue_depth", ())] == 0, 10, "the queue to empty")
    long.close()


def test_token_metrics_and_usage_stays_as_the_client_asked(start_llamad):
    daemon = start_llamad()
    api = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="x", max_retries=0)
    api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=3)
    chunks = list(api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4, stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    with_usage = list(api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5, stream=True,
                                                  stream_options={"include_usage": True}))
    assert with_usage[-1].usage.completion_tokens == 5
    m = samples(daemon)
    assert m[("llamad_tokens_total", (("kind", "completion"), ("model", "demo")))] == 3 + 4 + 5
    assert m[("llamad_tokens_total", (("kind", "prompt"), ("model", "demo")))] > 0


def test_cors_preflight_and_headers(start_llamad):
    daemon = start_llamad(toml='[api]\ncors_origins = ["https://app.example"]\n')
    status, _, headers = daemon.request("OPTIONS", "/v1/chat/completions", headers={
        "origin": "https://app.example", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-stainless-os, x-stainless-lang"})
    assert status == 204 and headers["access-control-allow-origin"] == "https://app.example"
    assert "x-stainless-os" in headers["access-control-allow-headers"]
    status, _, headers = daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1},
                                        headers={"origin": "https://app.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    status, _, headers = daemon.request("GET", "/v1/chat/completions", headers={"origin": "https://app.example"})
    assert status == 405 and headers["access-control-allow-origin"] == "https://app.example"
    status, _, headers = daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1},
                                        headers={"origin": "https://evil.example"})
    assert "access-control-allow-origin" not in headers
