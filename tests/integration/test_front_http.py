"""Port 8000's HTTP/1.1 front in a real daemon, through real clients and the real child: each request, good or
bad, gets its status and error code; the OpenAI client streams and counts tokens; and a config that still sets
``api.fast_path`` (which once chose twisted.web's server instead) boots with a warning and is served the same."""

from __future__ import annotations

import json

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import raw

pytestmark = pytest.mark.integration

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
BODY = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
GET = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"

# Each raw request, and what it must get: the status, and the error code of an error.
CASES = {
    "completion": (HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY), (200, None)),
    "chunked body": (HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(BODY), BODY), (200, None)),
    "over the body limit": (HEAD + b"Content-Length: 5000\r\n\r\n", (413, "payload_too_large")),
    "bad length": (HEAD + b"Content-Length: abc\r\n\r\n", (400, "bad_request")),
    "two lengths": (HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}", (400, "bad_framing")),
    "length and chunked": (HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}", (400, "bad_framing")),
    "gzip framing": (HEAD + b"Transfer-Encoding: gzip\r\n\r\n{}", (400, "bad_framing")),
    "not JSON": (HEAD + b"Content-Length: 3\r\nConnection: close\r\n\r\nabc", (400, "invalid_json")),
    "NaN": (HEAD + b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"prompt\":NaN}", (400, "invalid_json")),
    "GET on an inference route": (b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                                  (405, "method_not_allowed")),
    "tricky path": (b"GET /v1/../health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (400, "invalid_path")),
    "absolute target": (b"GET http://x/v1/models HTTP/1.1\r\nHost: x\r\n\r\n", (400, "invalid_request_target")),
    "too many headers": (GET + b"".join(b"X-%d: v\r\n" % i for i in range(70)) + b"\r\n",
                         (431, "header_fields_too_large")),
    "long header line": (GET + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n", (431, "header_fields_too_large")),
    "long request line": (b"GET /v1/models?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", (414, "uri_too_long")),
    "method not allowed": (b"DELETE /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                           (405, "method_not_allowed")),
    "unknown method": (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                       (405, "method_not_allowed")),
    "HEAD health": (b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", (200, None)),
    "HTTP/1.0 models": (b"GET /v1/models HTTP/1.0\r\n\r\n", (200, None)),
}


def answer(response: bytes) -> tuple[int, str | None]:
    head, _, body = response.partition(b"\r\n\r\n")
    code = None
    if b"application/json" in head.lower() and body.startswith(b'{"error"'):
        code = json.loads(body)["error"]["code"]
    return (int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0), code


def test_each_request_gets_its_answer(start_llamad):
    daemon = start_llamad(toml="[api]\nmax_body_bytes = 1000\n")
    got = {name: answer(raw(daemon, request)) for name, (request, _) in CASES.items()}
    assert got == {name: expected for name, (_, expected) in CASES.items()}
    # HTTP/1.0: no chunked framing, the connection ends the body.
    response = raw(daemon, CASES["HTTP/1.0 models"][0])
    assert response.startswith(b"HTTP/1.0 200") and b"chunked" not in response.lower()


def test_the_openai_client_streams_and_counts_tokens(start_llamad):
    daemon = start_llamad()
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True))
    assert chunks and all(c.choices for c in chunks)  # the usage event llamad asked for is not passed on
    assert chunks[-1].choices[0].finish_reason is not None
    with_usage = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 8
    assert client.completions.create(model="demo", prompt="a", max_tokens=3).usage.completion_tokens == 3
    exposition = text_string_to_metric_families(daemon.request("GET", "/metrics")[1].decode())
    completion = [sample.value for family in exposition for sample in family.samples
                  if sample.name == "llamad_tokens_total" and sample.labels["kind"] == "completion"]
    assert sum(completion) == 19, completion


@pytest.mark.parametrize("value", ["false", "true"])
def test_a_config_that_still_sets_api_fast_path_boots_says_it_does_nothing_and_is_served(start_llamad, value):
    daemon = start_llamad(toml=f"[api]\nfast_path = {value}\nmax_body_bytes = 1000\n")
    warned = [line for line in daemon.log().splitlines() if "api.fast_path" in line]
    assert warned and "no longer does anything" in warned[0], daemon.log()
    for name in ("completion", "over the body limit", "two lengths"):
        request, expected = CASES[name]
        assert answer(raw(daemon, request)) == expected, name
