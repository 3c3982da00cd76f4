"""A llama-gguf-inference deployment moved to ``twistd -n llamad`` as it is: its variables, keys file and clients."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers import PRODUCTION, TESTING, raw, status_of, volume, wait_for
from llamad.supervisor import free_port

pytestmark = pytest.mark.integration

def connects(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
    except OSError:
        return False
    return True


def test_its_environment_sets_llamads_config_and_the_rest_is_named_at_boot(start_llamad, tmp_path):
    env = {
        "HOST": "127.0.0.1", "INSTANCE_ID": "worker-7", "CORS_ORIGINS": "https://app.example,https://b.example",
        "MAX_CONCURRENT_REQUESTS": "1", "MAX_QUEUE_SIZE": "0", "REQUEST_TIMEOUT": "300", "CLIENT_HEADER_TIMEOUT": "20",
        "HEALTH_TIMEOUT": "2", "MAX_REQUEST_BODY_SIZE": "52428800",
        # Theirs alone: each is named once at boot with why it does nothing here.
        "PORT_BACKEND": "8080", "BACKEND_PORT": "8080", "WORKER_TYPE": "instruct",
        "DEBUG_SHELL": "false", "BACKEND_CONNECT_TIMEOUT": "10",
    }
    daemon = start_llamad(env=env, data_dir=volume(tmp_path, keys=None))
    log = daemon.log()
    for line, source in [("max_concurrent = 1", "env MAX_CONCURRENT_REQUESTS"),
                         ("max_queue = 1000000", "env MAX_QUEUE_SIZE (0: unlimited, taken as 1000000)"),
                         ("request_timeout = 300.0", "env REQUEST_TIMEOUT"),
                         ("header_timeout = 20.0", "env CLIENT_HEADER_TIMEOUT"),
                         ("body_timeout = 20.0", "env CLIENT_HEADER_TIMEOUT"),
                         ("health_timeout = 2.0", "env HEALTH_TIMEOUT"),
                         ("max_body_bytes = 52428800", "env MAX_REQUEST_BODY_SIZE"),
                         ('cors_origins = ["https://app.example", "https://b.example"]', "env CORS_ORIGINS"),
                         (f'listen = "tcp:{daemon.api_port}:interface=127.0.0.1"', "env PORT, env HOST"),
                         (f'listen = "tcp:{daemon.health_port}:interface=127.0.0.1"', "env PORT_HEALTH, env HOST"),
                         ("enabled = false", "default")]:
        assert any(text.strip().startswith(line) and text.rstrip().endswith(f"# {source}")
                   for text in log.splitlines()), line
    for name in ("PORT_BACKEND", "BACKEND_PORT", "WORKER_TYPE", "DEBUG_SHELL", "BACKEND_CONNECT_TIMEOUT"):
        assert log.count(f"config: {name} is ignored: ") == 1, name
    assert "llamad picks a free loopback port for the child" in log

    # HOST: both ports on that interface only (127.0.0.2 is loopback too, and finds nothing there).
    assert connects("127.0.0.1", daemon.api_port) and connects("127.0.0.1", daemon.health_port)
    assert not connects("127.0.0.2", daemon.api_port) and not connects("127.0.0.2", daemon.health_port)
    # INSTANCE_ID names the log files, as their start.sh did.
    boot = Path((daemon.data_dir / "logs" / "_boot" / "latest.txt").read_text().strip())
    assert boot.name.endswith("_boot_worker-7.log") and boot.exists()
    # The CORS list is theirs, comma-separated.
    status, _, headers = daemon.request("OPTIONS", "/v1/chat/completions", headers={
        "origin": "https://b.example", "access-control-request-method": "POST"})
    assert status == 204 and headers["access-control-allow-origin"] == "https://b.example"
    # No key file, nothing set: auth stays off, as llamad's own default.
    assert daemon.request("GET", "/v1/models")[0] == 200


def test_its_keys_file_turns_auth_on_and_its_clients_get_in(start_llamad, tmp_path):
    daemon = start_llamad(env={"MAX_REQUESTS_PER_MINUTE": "3"}, data_dir=volume(tmp_path))
    log = daemon.log()
    assert any(line.strip().startswith("enabled = true") and line.rstrip().endswith("# default (keys file present)")
               for line in log.splitlines())
    assert f"auth enabled: {daemon.data_dir / 'api_keys.txt'} exists" in log and "AUTH_ENABLED=false" in log
    assert any(line.strip().startswith("default_rate = 3") and line.rstrip().endswith("# env MAX_REQUESTS_PER_MINUTE")
               for line in log.splitlines())

    assert daemon.request("GET", "/v1/models")[0] == 401
    # Their clients send the key bare in Authorization, or as a Bearer token; x-api-key works too.
    status, body, _ = daemon.request("POST", "/v1/chat/completions", headers={"authorization": PRODUCTION},
                                     body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert status == 200 and json.loads(body)["choices"]
    assert daemon.request("GET", "/v1/models", headers={"authorization": f"Bearer {PRODUCTION}"})[0] == 200
    assert daemon.request("GET", "/v1/models", headers={"x-api-key": PRODUCTION})[0] == 200
    assert daemon.request("GET", "/v1/models", headers={"authorization": PRODUCTION})[0] == 429  # its 4th this minute
    # MAX_REQUESTS_PER_MINUTE limits a key whose line sets no rate; each key has its own window.
    assert [daemon.request("GET", "/v1/models", headers={"authorization": TESTING})[0] for _ in range(4)] == [
        200, 200, 200, 429]
    status, body, headers = daemon.request("GET", "/v1/models", headers={"authorization": TESTING})
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert json.loads(body)["error"]["message"] == "Rate limit of 3 requests per minute exceeded"

    # /metrics: their JSON view to who asks for JSON, Prometheus text to everyone else.
    status, body, headers = daemon.request("GET", "/metrics", headers={"accept": "application/json"})
    assert status == 200 and headers["content-type"] == "application/json"
    view = json.loads(body)["gateway"]
    assert view["requests_unauthorized"] == 4 and view["requests_authenticated"] == 6
    assert view["bytes_sent"] > 0 and view["uptime_seconds"] >= 0 and view["requests_active"] == 0
    assert view["requests_total"] == view["requests_success"] + view["requests_error"] >= 10
    assert set(view) >= {"queue_depth", "queue_rejections", "queue_wait_seconds_total"}
    assert view["queue_wait_seconds_total"] >= 0
    status, body, headers = daemon.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain") and b"llamad_requests_total" in body


def test_auth_off_by_their_variable_and_metrics_behind_a_key(start_llamad, tmp_path):
    daemon = start_llamad(env={"AUTH_ENABLED": "false"}, data_dir=volume(tmp_path))
    assert daemon.request("GET", "/v1/models")[0] == 200
    assert "auth enabled:" not in daemon.log()
    daemon.stop()

    daemon = start_llamad(env={"METRICS_AUTH_ENABLED": "true"}, data_dir=volume(tmp_path / "second"))
    assert daemon.request("GET", "/metrics", headers={"accept": "application/json"})[0] == 401
    status, body, _ = daemon.request("GET", "/metrics", headers={"accept": "application/json",
                                                                  "authorization": TESTING})
    assert status == 200 and json.loads(body)["gateway"]["requests_unauthorized"] == 1


def test_its_limits_and_their_error_codes(start_llamad, tmp_path):
    env = {"MAX_REQUEST_BODY_SIZE": "2000", "MAX_HEADERS": "20", "MAX_HEADER_LINE_SIZE": "1024",
           "MAX_REQUEST_LINE_SIZE": "512", "AUTH_ENABLED": "false"}
    daemon = start_llamad(env=env, data_dir=volume(tmp_path))

    def error_of(response: bytes) -> tuple[int, str]:
        body = json.loads(response.split(b"\r\n\r\n", 1)[1])
        return status_of(response), body["error"]["code"]

    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    assert error_of(raw(daemon, head + b"Content-Length: 2001\r\n\r\n")) == (413, "payload_too_large")
    big = b"x" * 1500
    chunked = head + b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(big), big, len(big), big)
    assert error_of(raw(daemon, chunked)) == (413, "payload_too_large")

    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"

    def headers(n: int) -> bytes:
        return b"".join(b"X-H%d: v\r\n" % i for i in range(n))

    assert error_of(raw(daemon, get + headers(20) + b"\r\n")) == (431, "header_fields_too_large")  # 21 in all
    assert status_of(raw(daemon, get + headers(18) + b"Connection: close\r\n\r\n")) == 200  # 20 in all
    assert error_of(raw(daemon, get + b"X-Long: " + b"a" * 1100 + b"\r\n\r\n")) == (431, "header_fields_too_large")
    assert status_of(raw(daemon, get + b"X-Long: " + b"a" * 900 + b"\r\nConnection: close\r\n\r\n")) == 200
    assert error_of(raw(daemon, b"GET /v1/models?" + b"a" * 600 + b" HTTP/1.1\r\n\r\n")) == (414, "uri_too_long")
    assert status_of(raw(daemon, b"GET /v1/models?" + b"a" * 400 + b" HTTP/1.1\r\nConnection: close\r\n\r\n")) == 200

    # What the head alone could not hold, over their limits, is 431 too: no bare 400 from below.
    assert error_of(raw(daemon, get + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 1000) for i in range(19)) + b"\r\n")) == (
        431, "header_fields_too_large")
    assert daemon.request("GET", "/v1/models")[0] == 200  # and it keeps serving


def test_its_health_port_answers_any_get_path(start_llamad, tmp_path):
    """A platform set up for the old health server (200 on any path) polls whatever path it was given."""
    daemon = start_llamad(data_dir=volume(tmp_path, keys=None))
    for path in ("/health", "/", "/ping", "/anything/else", "/healthz?x=1"):
        assert daemon.request("GET", path, port="health")[:2] == (200, b""), path
        assert daemon.request("HEAD", path, port="health")[0] == 200, path
    assert daemon.request("GET", "/livez", port="health")[0] == 200
    assert json.loads(daemon.request("GET", "/readyz", port="health")[1])["status"] == "ready"
    assert daemon.request("POST", "/health", port="health")[0] == 405


def test_gateway_port_is_the_api_port_when_port_is_unset(start_llamad, tmp_path):
    port = free_port()
    daemon = start_llamad(env={"PORT": "", "GATEWAY_PORT": str(port), "CORS_ORIGINS": '["*"]'},
                          data_dir=volume(tmp_path, keys=None), wait="listening")
    daemon.api_port = port
    daemon.wait_state("ready")
    assert f'listen = "tcp:{port}"' in daemon.log() and "# env GATEWAY_PORT" in daemon.log()
    # A TOML list in the environment is a list, not one literal origin: every origin passes the preflight.
    status, _, headers = daemon.request("OPTIONS", "/v1/chat/completions", headers={
        "origin": "https://anywhere.example", "access-control-request-method": "POST"})
    assert status == 204 and headers["access-control-allow-origin"] == "*"
    wait_for(lambda: daemon.request("GET", "/v1/models")[0] == 200, 10, "the proxy")
