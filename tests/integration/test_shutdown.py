"""Graceful drain on SIGTERM: in-flight streams finish, new inference is refused, then exit 0."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest

from helpers import alive, wait_for

pytestmark = pytest.mark.integration


def stream(daemon, max_tokens: int, out: list) -> threading.Thread:
    """A raw streamed completion in a thread; appends its whole body to ``out``."""

    def run() -> None:
        body = json.dumps({"prompt": "x", "max_tokens": max_tokens, "stream": True, "ignore_eos": True}).encode()
        sock = socket.create_connection(("127.0.0.1", daemon.api_port), timeout=60)
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        data = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except OSError:
                break
            if not chunk or data.endswith(b"\r\n0\r\n\r\n"):
                break
            data += chunk
            if data.endswith(b"0\r\n\r\n") and (b"[DONE]" in data or b'"error"' in data):
                break
        sock.close()
        out.append(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def in_flight(daemon) -> float:
    body = daemon.request("GET", "/metrics")[1].decode()
    return float(body.split("\nllamad_in_flight_requests ")[1].split()[0])


def test_four_streams_finish_during_the_drain(start_llamad):
    # A generous drain_timeout: the streams must finish on their own, however slow the machine.
    daemon = start_llamad({"parallel": 4, "context": 16384}, toml="[api]\ndrain_timeout = 300\n")
    pid = daemon.backend_pid()
    bodies: list = []
    threads = [stream(daemon, 2000, bodies) for _ in range(4)]
    wait_for(lambda: in_flight(daemon) == 4, 30, "four streams in flight")
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: daemon.request("GET", "/readyz", port="health")[0] == 503, 5, "readiness 503")
    status, body, headers = daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})
    assert status == 503 and headers["retry-after"] and json.loads(body)["error"]["code"] == "shutting_down"
    daemon.proc.send_signal(signal.SIGHUP)  # a reload sent during the drain (systemctl reload): logged, not fatal
    for thread in threads:
        thread.join(300)
    assert daemon.proc.wait(300) == 0
    drain_seconds = time.monotonic() - started
    assert len(bodies) == 4 and all(b"data: [DONE]" in b for b in bodies), [b[-200:] for b in bodies]
    assert "SIGHUP ignored: llamad is shutting down" in daemon.log()
    assert not alive(pid)
    print(f"drain with 4 streams: {drain_seconds:.2f} s")


def test_streams_past_drain_timeout_are_cut_with_an_sse_error(start_llamad):
    daemon = start_llamad({"parallel": 1, "context": 16384}, toml="[api]\ndrain_timeout = 1\n")
    bodies: list = []
    thread = stream(daemon, 15000, bodies)
    wait_for(lambda: in_flight(daemon) == 1, 30, "the stream in flight")
    daemon.proc.send_signal(signal.SIGTERM)
    thread.join(30)
    # On a loaded machine llama-server can take until supervisor.stop_timeout (30 s) to stop; still exit 0.
    assert daemon.proc.wait(60) == 0
    assert b"data: [DONE]" not in bodies[0]
    event = bodies[0].split(b"data: {\"error\"")[1]
    assert b"shutting down" in event


def test_a_second_sigterm_skips_the_drain(start_llamad):
    # A drain that would outlast the test: only the second signal can end it, which the log says.
    daemon = start_llamad({"parallel": 1, "context": 16384}, toml="[api]\ndrain_timeout = 3600\n")
    bodies: list = []
    thread = stream(daemon, 15000, bodies)
    wait_for(lambda: in_flight(daemon) == 1, 30, "the stream in flight")
    daemon.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: daemon.request("GET", "/readyz", port="health")[0] == 503, 5, "the drain")
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(60) == 0
    assert "second signal: cut 1 request(s) still in flight" in daemon.log()
    thread.join(10)
    assert bodies and b'"error"' in bodies[0] and b"data: [DONE]" not in bodies[0]
