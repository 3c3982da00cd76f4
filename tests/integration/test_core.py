"""End to end: twistd -n llamad, the real llama-server on the demo model, the openai client."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import time

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import TWISTD, alive, children_of, wait_for
from llamad.supervisor import free_port

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "Say something."}]


def client(daemon, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="client-key-is-stripped", max_retries=0, **kw)


def test_openai_client_chat_and_completions(start_llamad):
    daemon = start_llamad()
    api = client(daemon)

    models = api.models.list()
    assert [m.id for m in models.data] == ["demo"]

    chat = api.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=8)
    assert chat.choices[0].message.content
    assert chat.usage.completion_tokens == 8

    text = api.completions.create(model="demo", prompt="Once upon", max_tokens=8)
    assert text.choices[0].text and text.usage.completion_tokens == 8

    pieces = [c.choices[0].delta.content or "" for c in api.chat.completions.create(
        model="demo", messages=MESSAGES, max_tokens=12, stream=True) if c.choices]
    assert len([p for p in pieces if p]) >= 2

    chunks = list(api.completions.create(model="demo", prompt="Hello", max_tokens=12, stream=True))
    assert len(chunks) >= 12 and any(c.choices and c.choices[0].text for c in chunks)


def sse_request(daemon, body: dict) -> tuple[socket.socket, bytes]:
    """Send a streaming request on a raw socket; return it and what was read up to the first event."""
    sock = socket.create_connection(("127.0.0.1", daemon.api_port), timeout=30)
    payload = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    seen = b""
    while b"\ndata: " not in seen and not seen.startswith(b"data: ") and b"\r\n\r\ndata: " not in seen:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed early: {seen!r}"
        seen += chunk
    return sock, seen


def slots(daemon) -> list[dict]:
    status, body, _ = daemon.request("GET", "/slots")
    assert status == 200, body
    return json.loads(body)


LONG = {"prompt": "Tell a long story.", "max_tokens": 7000, "stream": True, "ignore_eos": True}


def test_first_event_arrives_while_the_child_is_still_generating(start_llamad):
    daemon = start_llamad({"parallel": 1, "context": 8192})
    sock, seen = sse_request(daemon, LONG)
    try:
        assert b"HTTP/1.1 200" in seen and b"text/event-stream" in seen
        # The first event is here and the child's only slot is still busy with this request.
        assert [s["is_processing"] for s in slots(daemon)] == [True]
    finally:
        sock.close()


def test_client_disconnect_frees_the_slot(start_llamad):
    daemon = start_llamad({"parallel": 1, "context": 8192})
    sock, _ = sse_request(daemon, LONG)
    sock.close()
    wait_for(lambda: [s["is_processing"] for s in slots(daemon)] == [False], 10, "the slot to be free")
    # The child stopped early: fewer tokens than the 7000 requested (it would have run ~1 s more).
    # Its log line reaches the file through llamad's pipe and log thread, after the slot shows free.
    child_log = daemon.data_dir / "logs/llama/latest.txt"
    released = wait_for(lambda: [line for line in child_log.read_text().splitlines() if "stop processing" in line],
                        30, "the child to log the slot's release")
    n_tokens = int(released[-1].split("n_tokens = ")[1].split(",")[0])
    assert n_tokens < 7000
    # And the single slot serves the next request.
    chat = client(daemon).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4)
    assert chat.usage.completion_tokens == 4


def test_kill_9_of_the_child_restarts_it(start_llamad):
    daemon = start_llamad(toml="[supervisor]\nbackoff_initial = 0.1\n")
    first = daemon.backend_pid()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not alive(first), 10, "the child to die")
    health = wait_for(lambda: (h := daemon.health())["state"] == "ready" and h["backend"]["pid"] != first and h,
                      30, "a new ready child")
    daemon.seen_children.add(health["backend"]["pid"])
    assert health["backend"]["restarts"] == 1
    assert "SIGKILL" in daemon.log() and "out of memory" in daemon.log()
    chat = client(daemon).chat.completions.create(model="demo", messages=MESSAGES, max_tokens=4)
    assert chat.usage.completion_tokens == 4
    metrics = {s.name: s for f in text_string_to_metric_families(daemon.request("GET", "/metrics")[1].decode())
               for s in f.samples}
    assert metrics["llamad_backend_restarts_total"].value == 1


def test_health_port_answers_during_load_and_while_the_child_is_down(start_llamad, llama_server_bin, tmp_path):
    slow = tmp_path / "slow-llama-server"
    slow.write_text(f'#!/bin/sh\nsleep 3\nexec "{llama_server_bin}" "$@"\n')
    slow.chmod(0o755)
    daemon = start_llamad({"command": str(slow)}, toml="[supervisor]\nbackoff_initial = 3.0\n", wait="listening")

    assert daemon.health()["state"] == "starting"
    for path in ("/ping", "/", "/livez"):
        assert daemon.request("GET", path, port="health")[0] == 200
    assert daemon.request("HEAD", "/ping", port="health")[0] == 200
    status, body, _ = daemon.request("GET", "/readyz", port="health")
    assert status == 503 and json.loads(body)["reason"] == "loading model"
    assert daemon.request("GET", "/nope", port="health")[0] == 200  # any other path answers as /ping

    daemon.wait_state("ready")
    assert daemon.request("GET", "/readyz", port="health")[0] == 200
    pid = daemon.backend_pid()
    os.kill(pid, signal.SIGKILL)
    daemon.wait_state("backoff")
    assert daemon.request("GET", "/ping", port="health")[0] == 200
    status, body, _ = daemon.request("GET", "/readyz", port="health")
    assert status == 503 and "SIGKILL" in json.loads(body)["reason"]
    status, body, _ = daemon.request("GET", "/health")
    assert status == 503 and json.loads(body)["state"] == "backoff"


def test_health_requests_never_reach_the_child(start_llamad):
    daemon = start_llamad()
    child_log = daemon.data_dir / "logs/llama/latest.txt"
    # The child's output reaches the log through llamad's pipe, after readiness: wait for its last start-up line.
    wait_for(lambda: "listening on" in child_log.read_text(), 30, "the child's start-up lines")
    before = child_log.read_text()
    for _ in range(50):
        for path in ("/ping", "/", "/livez", "/readyz"):
            assert daemon.request("GET", path, port="health")[0] == 200
    time.sleep(0.2)
    assert child_log.read_text() == before
    # The control: a request that does reach the child shows in its log.
    assert daemon.request("POST", "/v1/completions", body={"prompt": "x", "max_tokens": 2})[0] == 200
    wait_for(lambda: child_log.read_text() != before, 30, "the child to log the completion")


class RecordingBackend:
    """An external backend that records every request it gets."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.paths: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.paths.append(self.path)
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def test_health_port_never_touches_an_external_backend(start_llamad):
    backend = RecordingBackend()
    try:
        daemon = start_llamad({"kind": "external", "url": f"http://127.0.0.1:{backend.port}"})
        for _ in range(20):
            for path in ("/ping", "/livez", "/readyz", "/"):
                assert daemon.request("GET", path, port="health")[0] == 200
        assert daemon.request("GET", "/ping")[0] == 200
        assert daemon.request("GET", "/health")[0] == 200
        assert backend.paths == []
        assert daemon.request("GET", "/v1/models")[0] == 200
        assert backend.paths == ["/v1/models"]
    finally:
        backend.server.shutdown()


def test_metrics_parse_and_include_the_child(start_llamad):
    daemon = start_llamad()
    client(daemon).completions.create(model="demo", prompt="x", max_tokens=2)
    status, body, headers = daemon.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["llamad_requests"].samples
                if s.name == "llamad_requests_total"}
    assert requests[(("code", "200"), ("method", "POST"), ("model", "demo"), ("route", "/v1/completions"))] == 1
    states = {s.labels["state"]: s.value for s in families["llamad_backend_state"].samples}
    assert states["ready"] == 1 and sum(states.values()) == 1
    assert any(name.startswith("llamacpp:") for name in families)
    meta = [line for line in body.decode().splitlines() if line.startswith(("# HELP ", "# TYPE "))]
    assert len(meta) == len(set(meta)) and len({" ".join(m.split()[:3]) for m in meta}) == len(meta)


def test_child_unreachable_is_a_502_in_openai_shape(start_llamad):
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    daemon = start_llamad({"kind": "external", "url": f"http://127.0.0.1:{port}"})
    status, body, _ = daemon.request("POST", "/v1/chat/completions", body={"messages": MESSAGES})
    assert status == 502
    error = json.loads(body)["error"]
    assert error["type"] == "server_error" and error["code"] == "backend_unreachable"
    with pytest.raises(openai.InternalServerError):
        client(daemon).chat.completions.create(model="demo", messages=MESSAGES)


def test_sigterm_exits_0_and_leaves_no_child(start_llamad):
    daemon = start_llamad()
    pid = daemon.backend_pid()
    assert daemon.stop(signal.SIGTERM) == 0
    assert not alive(pid) and children_of(daemon.proc.pid) == []


def test_sigterm_during_model_load_exits_0_and_leaves_no_child(start_llamad, llama_server_bin, tmp_path):
    slow = tmp_path / "slow-llama-server"
    slow.write_text(f'#!/bin/sh\nsleep 30\nexec "{llama_server_bin}" "$@"\n')
    slow.chmod(0o755)
    daemon = start_llamad({"command": str(slow)}, wait="listening")
    children = wait_for(daemon.children, 10, "the child")
    started = time.monotonic()
    assert daemon.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10  # the SIGTERM reached the sleeping child's group
    assert not any(alive(pid) for pid in children)


def test_sigint_stops_like_sigterm(start_llamad):
    daemon = start_llamad()
    pid = daemon.backend_pid()
    assert daemon.stop(signal.SIGINT) == 0
    assert not alive(pid)


def test_bad_config_exits_before_binding_with_one_line(tmp_path, llama_server_bin):
    port = free_port()
    config = tmp_path / "bad.toml"
    config.write_text(f'[api]\nlisten = "tcp:{port}"\n[backend]\nkind = "ollama"\n')
    proc = subprocess_run([TWISTD, "-n", "--pidfile=", "llamad", "--config", str(config)], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.decode().strip().splitlines() == [
        f"llamad: config error: backend.kind: unknown value 'ollama' "
        f"(expected one of: llama-server, llama-cpp-python, external, none) (from {config})"
    ]
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # nothing was bound


def subprocess_run(argv: list[str], cwd) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("PORT", "PORT_HEALTH", "MODEL_PATH", "MODEL_NAME")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, timeout=60)


def test_plugin_is_listed_by_twistd(tmp_path):
    proc = subprocess_run([TWISTD, "--help"], tmp_path)
    assert b"llamad" in proc.stdout
    proc = subprocess_run([TWISTD, "llamad", "--help"], tmp_path)
    assert proc.returncode == 0 and b"--config" in proc.stdout and b"--set" in proc.stdout


def test_connection_reuse_to_the_child(start_llamad):
    """Sequential requests on one client connection, through the pool, all succeed."""
    daemon = start_llamad()
    conn = http.client.HTTPConnection("127.0.0.1", daemon.api_port, timeout=30)
    for _ in range(20):
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "a", "max_tokens": 1}),
                     headers={"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200, response.read()
        json.loads(response.read())
    conn.close()


def test_corrupt_model_ends_in_failed_with_llama_cpps_words_then_sighup_retries(start_llamad, tmp_path, demo_model):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF but not really a model file" * 10)
    daemon = start_llamad({"model": str(model)}, wait="listening",
                          toml="[supervisor]\nbackoff_initial = 0.05\ncrash_loop_limit = 2\nfailed_retry_after = 0\n")
    health = daemon.wait_state("failed")
    reason = health["reason"]
    assert "exited with code" in reason and "it said: gguf_init_from_reader: this GGUF file is version" in reason
    status, body, _ = daemon.request("GET", "/readyz", port="health")
    assert status == 503 and "it said:" in json.loads(body)["reason"]
    status, body, _ = daemon.request("POST", "/v1/completions", body={"prompt": "a"})
    assert status == 503 and "backend failed" in json.loads(body)["error"]["message"]
    states = {s.labels["state"]: s.value for f in text_string_to_metric_families(
        daemon.request("GET", "/metrics")[1].decode()) if f.name == "llamad_backend_state" for s in f.samples}
    assert states["failed"] == 1
    # Mend the model, then SIGHUP: out of failed at once.
    model.write_bytes(open(demo_model, "rb").read())
    daemon.proc.send_signal(signal.SIGHUP)
    daemon.wait_state("ready")
    daemon.backend_pid()
    assert daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})[0] == 200
    # And POST /admin/restart (from loopback, auth off) gives a fresh child.
    first = daemon.backend_pid()
    assert daemon.request("POST", "/admin/restart")[0] == 200
    wait_for(lambda: (h := daemon.health())["state"] == "ready" and h["backend"]["pid"] not in (None, first), 30,
             "a fresh child")
    daemon.backend_pid()
