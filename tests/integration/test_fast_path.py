"""Port 8000's two servers, the fast path (httptools) and twisted.web (``api.fast_path = false``), side by side:
the same requests, good and bad, get the same answers from both, through real clients and the real child."""

from __future__ import annotations

import json

import openai
import pytest

from helpers import raw

pytestmark = pytest.mark.integration

HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
BODY = json.dumps({"prompt": "a", "max_tokens": 2}).encode()
GET = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"

# Each raw request, then what must be the same on both servers: the status and the error code.
CASES = {
    "completion": HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(BODY), BODY),
    "chunked body": HEAD + b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (
        len(BODY), BODY),
    "over the body limit": HEAD + b"Content-Length: 5000\r\n\r\n",
    "bad length": HEAD + b"Content-Length: abc\r\n\r\n",
    "two lengths": HEAD + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
    "length and chunked": HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
    "gzip framing": HEAD + b"Transfer-Encoding: gzip\r\n\r\n{}",
    "not JSON": HEAD + b"Content-Length: 3\r\nConnection: close\r\n\r\nabc",
    "NaN": HEAD + b"Content-Length: 13\r\nConnection: close\r\n\r\n{\"prompt\":NaN}",
    "GET on an inference route": b"GET /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "tricky path": b"GET /v1/../health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "absolute target": b"GET http://x/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
    "too many headers": GET + b"".join(b"X-%d: v\r\n" % i for i in range(70)) + b"\r\n",
    "long header line": GET + b"X-Long: " + b"a" * 9000 + b"\r\n\r\n",
    "long request line": b"GET /v1/models?" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
    "method not allowed": b"DELETE /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "unknown method": b"BREW /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "HEAD health": b"HEAD /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    "HTTP/1.0 models": b"GET /v1/models HTTP/1.0\r\n\r\n",
}


def answer(response: bytes) -> tuple[int, str | None]:
    head, _, body = response.partition(b"\r\n\r\n")
    code = None
    if b"application/json" in head.lower() and body.startswith(b'{"error"'):
        code = json.loads(body)["error"]["code"]
    return (int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/") else 0), code


def test_both_servers_answer_the_same(start_llamad):
    limits = "max_body_bytes = 1000\n"
    fast = start_llamad(toml=f"[api]\n{limits}")
    web = start_llamad(toml=f"[api]\nfast_path = false\n{limits}")
    for name, request in CASES.items():
        got = {which: answer(raw(daemon, request)) for which, daemon in (("fast", fast), ("twisted.web", web))}
        assert got["fast"] == got["twisted.web"], (name, got)
        assert got["fast"][0] in (200, 400, 405, 413, 414, 431), (name, got)
    # HTTP/1.0: no chunked framing, the connection ends the body.
    response = raw(fast, CASES["HTTP/1.0 models"])
    assert response.startswith(b"HTTP/1.0 200") and b"chunked" not in response.lower()


@pytest.mark.parametrize("fast_path", [True, False])
def test_the_openai_client_streams_and_counts_tokens_on_both(start_llamad, fast_path):
    daemon = start_llamad(toml=f"[api]\nfast_path = {str(fast_path).lower()}\n")
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "hi"}]
    chunks = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True))
    assert chunks and all(c.choices for c in chunks)  # the usage event llamad asked for is not passed on
    assert chunks[-1].choices[0].finish_reason is not None
    with_usage = list(client.chat.completions.create(model="demo", messages=messages, max_tokens=8, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 8
    assert client.completions.create(model="demo", prompt="a", max_tokens=3).usage.completion_tokens == 3
    body = daemon.request("GET", "/metrics")[1].decode()
    completion = [line for line in body.splitlines() if line.startswith('llamad_tokens_total{kind="completion"}')]
    assert completion == ['llamad_tokens_total{kind="completion"} 19.0'], completion
