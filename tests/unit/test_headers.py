"""Which headers cross the proxy, and the OpenAI-shaped error bodies."""

from __future__ import annotations

import json

import pytest
from twisted.web.http_headers import Headers

from llamad.errors import error_body, sse_error_event
from llamad.gateway import headers as rules
from llamad.gateway.headers import HOP_BY_HOP


def raw(headers: Headers) -> dict[bytes, list[bytes]]:
    return {name.lower(): list(values) for name, values in headers.getAllRawHeaders()}


def to_backend(headers: Headers, key: str) -> Headers:
    """The header lines for the child, read back as Headers."""
    out = Headers()
    for line in rules.to_backend(headers, key):
        name, _, value = line.partition(b": ")
        out.addRawHeader(name, value)
    return out


def to_client(headers: Headers) -> Headers:
    """The child's headers, as the (lower, name, value) triples the upstream parser gives, filtered."""
    pairs = [(name.lower(), name, value) for name, values in headers.getAllRawHeaders() for value in values]
    out = Headers()
    for _, name, value in rules.to_client(pairs):
        out.addRawHeader(name, value)
    return out


def client_request(**extra: list[bytes]) -> Headers:
    headers = Headers({
        b"Authorization": [b"Bearer client-key"],
        b"X-Api-Key": [b"client-key"],
        b"Host": [b"example.com"],
        b"Content-Length": [b"12"],
        b"Content-Type": [b"application/json"],
        b"Accept": [b"text/event-stream"],
        b"X-Trace": [b"a", b"b"],
    })
    for name, values in extra.items():
        headers.setRawHeaders(name.replace("_", "-").encode(), values)
    return headers


def test_to_backend_strips_credentials_and_framing() -> None:
    out = raw(to_backend(client_request(), "child-key"))
    assert out == {
        b"content-type": [b"application/json"],
        b"accept": [b"text/event-stream"],
        b"x-trace": [b"a", b"b"],
        b"authorization": [b"Bearer child-key"],
    }


@pytest.mark.parametrize("name", sorted(HOP_BY_HOP))
def test_to_backend_strips_each_hop_by_hop_header(name: bytes) -> None:
    headers = client_request()
    headers.setRawHeaders(name.title(), [b"x"])
    out = raw(to_backend(headers, "k"))
    assert name not in out
    assert out[b"x-trace"] == [b"a", b"b"]


def test_hop_by_hop_set_is_complete() -> None:
    assert HOP_BY_HOP == {
        b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"proxy-connection",
        b"te", b"trailer", b"transfer-encoding", b"upgrade",
    }


def test_to_backend_strips_headers_named_in_connection() -> None:
    headers = client_request(X_Hop=[b"1"], X_Other=[b"2"], X_Kept=[b"3"])
    headers.setRawHeaders(b"Connection", [b"close, X-Hop", b" x-other ,"])
    out = raw(to_backend(headers, "k"))
    assert b"x-hop" not in out and b"x-other" not in out and b"connection" not in out
    assert out[b"x-kept"] == [b"3"]


def test_to_backend_connection_can_name_a_normal_header() -> None:
    headers = client_request(Connection=[b"Accept"])
    assert b"accept" not in raw(to_backend(headers, "k"))


def test_to_backend_without_key_adds_no_authorization() -> None:
    out = raw(to_backend(client_request(), ""))
    assert b"authorization" not in out
    assert b"x-api-key" not in out


def test_to_backend_leaves_input_untouched() -> None:
    headers = client_request()
    to_backend(headers, "k")
    assert headers.getRawHeaders(b"authorization") == [b"Bearer client-key"]


def test_to_client_strips_hop_by_hop_server_and_date() -> None:
    headers = Headers({
        b"Content-Type": [b"text/event-stream"],
        b"Cache-Control": [b"no-cache"],
        b"Server": [b"llama.cpp"],
        b"Date": [b"Thu, 01 Jan 1970 00:00:00 GMT"],
        b"Transfer-Encoding": [b"chunked"],
        b"Keep-Alive": [b"timeout=5"],
        b"Connection": [b"keep-alive, X-Private"],
        b"X-Private": [b"1"],
        b"Set-Cookie": [b"a=1", b"b=2"],
    })
    assert raw(to_client(headers)) == {
        b"content-type": [b"text/event-stream"],
        b"cache-control": [b"no-cache"],
        b"set-cookie": [b"a=1", b"b=2"],
    }


def test_to_client_keeps_content_length_and_authorization_like_fields() -> None:
    headers = Headers({b"Content-Length": [b"42"], b"WWW-Authenticate": [b"Bearer"]})
    assert raw(to_client(headers)) == {b"content-length": [b"42"], b"www-authenticate": [b"Bearer"]}


# --- error bodies -----------------------------------------------------------------


@pytest.mark.parametrize(
    "status, kind, code",
    [
        (400, "invalid_request_error", "bad_request"),
        (401, "invalid_request_error", "invalid_api_key"),
        (413, "invalid_request_error", "payload_too_large"),
        (414, "invalid_request_error", "uri_too_long"),
        (431, "invalid_request_error", "header_fields_too_large"),
        (429, "rate_limit_error", "rate_limit_exceeded"),
        (502, "server_error", "backend_unreachable"),
        (503, "server_error", "backend_unavailable"),
        (504, "server_error", "backend_timeout"),
    ],
)
def test_error_body_shape(status: int, kind: str, code: str) -> None:
    assert error_body(status, "boom") == {"error": {"message": "boom", "type": kind, "param": None, "code": code}}


def test_error_body_explicit_code_wins() -> None:
    assert error_body(503, "full", "queue_full")["error"]["code"] == "queue_full"


@pytest.mark.parametrize("status, kind", [(418, "invalid_request_error"), (507, "server_error")])
def test_error_body_unknown_status(status: int, kind: str) -> None:
    assert error_body(status, "x") == {"error": {"message": "x", "type": kind, "param": None, "code": None}}


def test_error_body_is_json_serialisable() -> None:
    body = error_body(502, 'child said "no"\n')
    assert json.loads(json.dumps(body)) == body


def test_sse_error_event_is_one_event() -> None:
    event = sse_error_event("backend went away\n\ndata: fake")
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    assert event.count(b"\n") == 2
    payload = json.loads(event[len(b"data: "):-2])
    assert payload == {
        "error": {
            "message": "backend went away\n\ndata: fake", "type": "server_error", "param": None,
            "code": "stream_interrupted",
        }
    }


def test_sse_error_event_custom_code() -> None:
    payload = json.loads(sse_error_event("t", "timeout")[6:])
    assert payload["error"]["code"] == "timeout"
