"""A llama-gguf-inference deployment on ``twistd -n llamad``, as it is: the rest of what it met.

Its scripts' ``curl -s $GATEWAY_URL/metrics | jq .``, a bare ``OPTIONS`` with an ``Origin``, ``POST /reload``'s
fields, its code for a bad ``Content-Length``, ``MAX_HEADER_LINE_SIZE=50``, and llama-server's errors reaching
the real ``openai`` client in the same shape as llamad's own.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import KEYS, PRODUCTION, TESTING, raw, status_of, volume

pytestmark = pytest.mark.integration

ORIGIN = "https://app.example"
PROMETHEUS_ACCEPT = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"


def curl_json(url: str) -> dict:
    """What their scripts ran: ``curl -s URL | jq .`` (curl sends ``Accept: */*``)."""
    curl = subprocess.run(["curl", "-s", url], capture_output=True, check=True, timeout=30)
    if shutil.which("jq"):
        out = subprocess.run(["jq", "."], input=curl.stdout, capture_output=True, check=True, timeout=30)
        assert out.returncode == 0
    return json.loads(curl.stdout)


def error_of(response: bytes) -> tuple[int, dict]:
    return status_of(response), json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


def test_their_scripts_their_browsers_and_their_codes(start_llamad, tmp_path):
    env = {"CORS_ORIGINS": ORIGIN, "MAX_REQUESTS_PER_MINUTE": "100"}
    daemon = start_llamad(env=env, toml='[api]\nmetrics_format = "json"\n', data_dir=volume(tmp_path, KEYS))
    key = {"authorization": PRODUCTION}  # their clients send it bare
    assert daemon.request("POST", "/v1/chat/completions", headers=key,
                          body={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})[0] == 200

    # 1. /metrics: JSON to curl, Prometheus text to Prometheus.
    view = curl_json(f"{daemon.base_url}/metrics")["gateway"]
    assert view["requests_total"] >= 1 and view["requests_authenticated"] >= 1 and view["uptime_seconds"] >= 0
    status, body, headers = daemon.request("GET", "/metrics")  # no Accept at all
    assert status == 200 and headers["content-type"] == "application/json" and "gateway" in json.loads(body)
    status, body, headers = daemon.request("GET", "/metrics", headers={"accept": PROMETHEUS_ACCEPT})
    assert status == 200 and headers["content-type"].startswith("text/plain")
    names = {family.name for family in text_string_to_metric_families(body.decode())}
    assert "llamad_requests" in names

    # 2. OPTIONS with an Origin and nothing else: 204 and the preflight's CORS headers, no key needed.
    for path in ("/v1/chat/completions", "/v1/models", "/health"):
        status, body, bare = daemon.request("OPTIONS", path, headers={"origin": ORIGIN})
        _, _, preflight = daemon.request("OPTIONS", path, headers={"origin": ORIGIN,
                                                                   "access-control-request-method": "POST"})
        assert (status, body) == (204, b""), path
        assert bare["access-control-allow-origin"] == ORIGIN and "POST" in bare["access-control-allow-methods"]
        assert {k: v for k, v in bare.items() if k.startswith("access-control-")} == \
            {k: v for k, v in preflight.items() if k.startswith("access-control-")}, path

    # 3. POST /reload: their fields, and llamad's.
    (daemon.data_dir / "api_keys.txt").write_text(KEYS + f"third:{'t' * 24}\n")
    status, body, _ = daemon.request("POST", "/reload", headers={"authorization": TESTING})
    assert status == 200 and json.loads(body) == {"status": "ok", "keys_loaded": 3, "reloaded": True, "keys": 3}

    # 4. A Content-Length that is not a number: their code.
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, error = error_of(raw(daemon, head + b"Content-Length: abc\r\n\r\n{}"))
    assert (status, error["code"], error["param"]) == (400, "bad_request", None)


def test_their_header_line_size_of_50_serves_and_is_enforced_to_the_byte(start_llamad, tmp_path):
    daemon = start_llamad(env={"MAX_HEADER_LINE_SIZE": "50"}, data_dir=volume(tmp_path, KEYS))
    assert any(line.strip().startswith("max_header_line = 50") and line.rstrip().endswith("# env MAX_HEADER_LINE_SIZE")
               for line in daemon.log().splitlines())
    # Their client's request fits (a bare key: "Authorization: sk-prod-..." is 41 bytes); the line limit
    # counts a line without its CRLF.
    get = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: " + PRODUCTION.encode() + b"\r\n"
    fifty = b"X-Fifty: " + b"a" * 41
    assert status_of(raw(daemon, get + fifty + b"\r\nConnection: close\r\n\r\n")) == 200
    status, error = error_of(raw(daemon, get + fifty + b"a\r\n\r\n"))
    assert (status, error["code"]) == (431, "header_fields_too_large")


def test_a_header_line_size_no_request_can_meet_stops_the_boot_saying_why(start_llamad, tmp_path):
    with pytest.raises(AssertionError, match="twistd exited with 2") as caught:
        start_llamad(env={"MAX_HEADER_LINE_SIZE": "6"}, data_dir=volume(tmp_path, keys=None), wait="listening")
    assert ("api.max_header_line: must be >= 7, got 6: every HTTP/1.1 request has a Host header, whose line is 7 "
            "bytes at the shortest ('Host: x', counted without its CRLF), so a smaller limit refuses every request "
            "(from env MAX_HEADER_LINE_SIZE)") in str(caught.value)


@pytest.fixture
def client(start_llamad, tmp_path):
    daemon = start_llamad(data_dir=volume(tmp_path, KEYS))
    return openai.OpenAI(base_url=daemon.base_url + "/v1", api_key=PRODUCTION, max_retries=0)


def test_llama_servers_errors_reach_the_openai_client_in_llamads_shape(client):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=messages, max_tokens=-5)
    error = caught.value
    assert (error.status_code, error.code, error.param, error.type) == (
        400, "invalid_request_error", None, "invalid_request_error")
    assert "max_tokens" in error.body["message"] and set(error.body) == {"message", "type", "param", "code"}

    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body={"model": "demo", "max_tokens": 2}, cast_to=object)
    error = caught.value
    assert (error.code, error.param, error.type) == ("invalid_request_error", None, "invalid_request_error")
    assert error.body["message"] == "'messages' is required"

    with pytest.raises(openai.NotFoundError) as caught:
        client.post("/no/such/route", body={}, cast_to=object)
    error = caught.value
    assert (error.status_code, error.code, error.param, error.type) == (404, "not_found_error", None, "not_found_error")
    assert error.body["message"] == "File Not Found"

    # A stream asked for with the same bad field is refused before it starts: the same shape.
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="demo", messages=messages, max_tokens=-5, stream=True)
    assert (caught.value.code, caught.value.param) == ("invalid_request_error", None)

    # llamad's own errors and the child's now read alike; successful answers are as they were.
    with pytest.raises(openai.AuthenticationError) as caught:
        client.with_options(api_key="sk-wrong-0123456789abcdef").models.list()
    assert (caught.value.code, caught.value.param, caught.value.type) == (
        "invalid_api_key", "authorization", "invalid_request_error")
    answer = client.chat.completions.create(model="demo", messages=messages, max_tokens=2)
    assert answer.choices and answer.usage.completion_tokens >= 1
