"""What a llama-gguf-inference deployment still met, in memory on port 8000's front.

``/metrics`` for ``curl | jq`` (``api.metrics_format``), a bare ``OPTIONS`` with an ``Origin``, ``/reload``'s
fields, one error code per case (and docs/api.md listing every code, checked against the code both ways),
any ``MAX_HEADER_LINE_SIZE`` that can work, and llama-server's errors answered in llamad's error shape.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import pytest_twisted
from fakes import TCPTransport
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from wire import (
    GATEWAY_FIELDS, GET_MODELS, KEY, POST_HEAD, Response, client, connect, make_gateway, parse, refused, send, server,
)

from llamad.config import ConfigError, load
from llamad.gateway import proxy as proxy_module
from llamad.gateway.app import Gateway, wants_json
from llamad.errors import _TYPES, backend_error_body
from llamad.gateway.guard import Auth, Cors
from llamad.gateway.proxy import Proxy
from llamad.gateway.upstream import _Connection

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = b"https://app.example"

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # a logged failure fails the test


# --- /metrics: JSON for a plain client with api.metrics_format = "json" ---------------------------


@pytest.mark.parametrize("accept, by_default, is_json", [
    (None, True, True),  # curl -s URL | jq .
    ("*/*", True, True),
    ("application/json", True, True),
    ("text/plain", True, False),
    ("text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True, False),  # Prometheus
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True, False),
    ("application/openmetrics-text; version=1.0.0", True, False),
    ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited", True, False),
    (None, False, False),  # the default: text unless JSON is asked for
    ("*/*", False, False),
    ("application/json", False, True),
])
def test_json_goes_to_who_names_no_prometheus_format_when_it_is_the_default(accept, by_default, is_json):
    assert wants_json(accept.encode() if accept else None, by_default) is is_json


def metrics_of(gateway: Gateway, accept: bytes | None) -> Response:
    extra = b"Accept: " + accept + b"\r\n" if accept is not None else b""
    transport, _ = send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n", gateway=gateway)
    [response] = parse(transport.value())
    return response


@pytest.mark.parametrize("metrics_format, accept, is_json", [
    ("json", None, True),
    ("json", b"*/*", True),
    ("json", b"text/plain;version=0.0.4", False),
    ("json", b"application/openmetrics-text;version=1.0.0", False),
    ("prometheus", b"*/*", False),
    ("prometheus", None, False),
])
def test_metrics_answers_in_the_configured_format(metrics_format, accept, is_json):
    response = metrics_of(make_gateway(metrics_format=metrics_format), accept)
    assert response.status == 200 and b"accept" in response.headers[b"vary"].lower()
    if is_json:
        assert response.headers[b"content-type"] == b"application/json"
        assert set(json.loads(response.body)["gateway"]) == GATEWAY_FIELDS
    else:
        assert response.headers[b"content-type"].startswith(b"text/plain")
        assert b"llamad_requests_total" in response.body


@pytest_twisted.ensureDeferred
async def test_an_http_client_like_curl_gets_json_with_the_json_format():
    http = client(make_gateway(metrics_format="json"))
    response = await http.get("http://x/metrics", headers={"accept": "*/*"})
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    assert set(json.loads(await response.content())["gateway"]) == GATEWAY_FIELDS
    response = await http.get("http://x/metrics", headers={"accept": "text/plain"})
    assert b"llamad_requests_total" in await response.content()


def test_metrics_format_is_a_checked_key_with_no_variable() -> None:
    environ = {"MODEL_PATH": "/m.gguf"}
    assert load(environ=environ, check_files=False).config.api.metrics_format == "prometheus"
    loaded = load(environ=environ, options={"api.metrics_format": "json"}, check_files=False)
    assert loaded.config.api.metrics_format == "json" and loaded.sources["api.metrics_format"] == "option"
    with pytest.raises(ConfigError, match=r"api.metrics_format: unknown value 'text' \(expected one of: "
                                          r"prometheus, json\)"):
        load(environ=environ, options={"api.metrics_format": "text"}, check_files=False)


# --- OPTIONS with an Origin: 204 and the preflight's CORS headers --------------------------------


def options(path: bytes, *extra: bytes, gateway: Gateway | None = None) -> Response:
    head = b"OPTIONS " + path + b" HTTP/1.1\r\nHost: x\r\n" + b"".join(line + b"\r\n" for line in extra)
    transport, _ = send(head + b"\r\n", gateway=gateway or make_gateway(cors=Cors((ORIGIN.decode(),))))
    [response] = parse(transport.value())
    return response


def cors_of(response: Response) -> dict[bytes, bytes]:
    return {name: value for name, value in response.headers.items() if name.startswith(b"access-control-")}


@pytest.mark.parametrize("path", [b"/v1/chat/completions", b"/health", b"/metrics", b"/anything/else"])
def test_a_bare_options_with_an_origin_is_answered_as_the_preflight_is(path):
    bare = options(path, b"Origin: " + ORIGIN)
    preflight = options(path, b"Origin: " + ORIGIN, b"Access-Control-Request-Method: POST")
    assert bare.status == preflight.status == 204
    assert cors_of(bare) == cors_of(preflight) and cors_of(bare)[b"access-control-allow-origin"] == ORIGIN
    assert set(cors_of(bare)) == {b"access-control-allow-origin", b"access-control-expose-headers",
                                  b"access-control-allow-methods", b"access-control-allow-headers",
                                  b"access-control-max-age"}


def test_a_bare_options_needs_no_key_and_never_reaches_the_child(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{KEY}\n")
    gateway = make_gateway(cors=Cors(("*",)), auth=Auth(True, str(keys), False, Clock()))
    response = options(b"/v1/chat/completions", b"Origin: https://any.example", gateway=gateway)
    assert response.status == 204 and response.headers[b"access-control-allow-origin"] == b"*"
    assert gateway.proxy.targets == []


def test_a_bare_options_from_an_origin_not_allowed_is_the_preflights_403():
    response = options(b"/v1/chat/completions", b"Origin: https://evil.example")
    error = json.loads(response.body)["error"]
    assert (response.status, error["code"]) == (403, "cors_origin_denied")


def test_without_cors_an_options_is_a_request_like_any_other():
    gateway = make_gateway()
    response = options(b"/v1/chat/completions", b"Origin: " + ORIGIN, gateway=gateway)
    assert response.status == 405 and cors_of(response) == {}  # an inference route takes POST
    response = options(b"/props", b"Origin: " + ORIGIN, gateway=gateway)
    assert response.status == 200 and len(gateway.proxy.targets) == 1


@pytest_twisted.ensureDeferred
async def test_an_http_clients_bare_options_gets_the_preflights_answer():
    http = client(make_gateway(cors=Cors((ORIGIN.decode(),))))
    response = await http.request("OPTIONS", "http://x/v1/models", headers={"origin": ORIGIN})
    assert response.code == 204
    assert response.headers.getRawHeaders(b"access-control-allow-origin") == [ORIGIN]
    assert response.headers.getRawHeaders(b"access-control-allow-methods") == [b"GET, POST, OPTIONS"]


# --- POST /reload: llama-gguf-inference's fields beside llamad's -----------------------------------


def test_reload_answers_both_sets_of_fields(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{KEY}\nbob:{'b' * 24}\n")
    gateway = make_gateway(auth=Auth(True, str(keys), False, Clock()))
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(b"POST /reload HTTP/1.1\r\nHost: x\r\nAuthorization: " + KEY.encode()
                          + b"\r\nContent-Length: 0\r\n\r\n")
    [response] = parse(transport.value())
    assert response.status == 200
    assert json.loads(response.body) == {"status": "ok", "keys_loaded": 2, "reloaded": True, "keys": 2}


# --- one code per case --------------------------------------------------------------------------


@pytest.mark.parametrize("value", [b"abc", b"-1", b"1.5", b"0x10", b"1 2"])
def test_a_content_length_that_is_not_a_number_is_their_bad_request(value):
    transport, _ = send(POST_HEAD + b"Content-Length: " + value + b"\r\n\r\n{}")
    refused(transport, 400, "bad_request")


def test_two_content_lengths_are_an_ambiguous_framing():
    transport, _ = send(POST_HEAD + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}")
    refused(transport, 400, "bad_framing")


@pytest_twisted.ensureDeferred
async def test_an_expired_key_is_their_invalid_api_key(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text(f"alice:{KEY}:60:2020-01-01T00:00:00\n")
    http = client(make_gateway(auth=Auth(True, str(keys), False, Clock())))
    response = await http.get("http://x/v1/models", headers={"authorization": KEY})
    error = json.loads(await response.content())["error"]
    assert (response.code, error["code"], error["message"]) == (401, "invalid_api_key", "API key has expired")


# Calls that make an error answer on port 8000, and where their code (and status) are.
_CODE_AT = {"ApiError": 2, "NotDelivered": 2, "Unanswered": 2, "refuse": 2, "Denied": 2,
            "error_body": 2, "sse_error_event": 1, "_break": 1}
_SSE_DEFAULT = "stream_interrupted"  # sse_error_event's code when a call gives none


def codes_in_the_code() -> dict[str, set[int | None]]:
    """Every error code llamad's sources can send, with the statuses it is sent with (None: not a constant
    there, or an SSE event), found by reading each call that makes an error and each code table."""
    found: dict[str, set[int | None]] = {}
    for path in sorted((ROOT / "llamad").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_FRAMING_ERRORS" for t in node.targets):
                for row in node.value.elts:  # (needle, message, code): a 400 each
                    found.setdefault(row.elts[-1].value, set()).add(400)
                continue
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name not in _CODE_AT:
                continue
            at = _CODE_AT[name]
            arg = node.args[at] if len(node.args) > at else next(
                (k.value for k in node.keywords if k.arg == "code"), None)
            status = node.args[0].value if at == 2 and node.args and isinstance(node.args[0], ast.Constant) else None
            if arg is None:
                codes = [_SSE_DEFAULT] if name == "sse_error_event" else [_TYPES[status][1]] if status else []
            elif isinstance(arg, ast.Constant):
                codes = [arg.value]
            elif isinstance(arg, ast.BoolOp):  # err.code or "backend_unavailable"
                codes = [value.value for value in arg.values if isinstance(value, ast.Constant)]
            else:
                codes = []  # passed on from a variable: its constant is found where it was made
            for code in codes:
                found.setdefault(code, set()).add(status)
    return found


def codes_in_the_docs() -> dict[str, set[int]]:
    """docs/api.md's table of error codes: code -> the statuses it lists."""
    text = (ROOT / "docs" / "api.md").read_text().split("## Error codes", 1)[1]
    table = text[text.index("| code |"):].split("\n\n", 1)[0].splitlines()[2:]
    listed: dict[str, set[int]] = {}
    for row in table:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        code = re.fullmatch(r"`([a-z_]+)`", cells[0])
        assert code is not None, row
        assert code.group(1) not in listed, f"{code.group(1)} listed twice"
        listed[code.group(1)] = {int(s) for s in re.findall(r"\b[1-5]\d\d\b", cells[1])}
        assert cells[2] and cells[3], row  # its meaning, and how llama-gguf-inference had it
    return listed


def test_docs_list_every_error_code_the_code_sends_and_no_other():
    sent, listed = codes_in_the_code(), codes_in_the_docs()
    assert len(sent) > 30  # the scan finds them
    assert sorted(set(sent) - set(listed)) == [], "sent but not in docs/api.md"
    assert sorted(set(listed) - set(sent)) == [], "in docs/api.md but sent nowhere"
    for code, statuses in sent.items():
        assert statuses - {None} <= listed[code], f"{code}: sent with {statuses}, listed with {listed[code]}"


# --- MAX_HEADER_LINE_SIZE: every value that can work ---------------------------------------------


@pytest.mark.parametrize("value", ["50", "7", "64", "65536"])
def test_any_header_line_limit_that_can_work_is_taken(value):
    loaded = load(environ={"MODEL_PATH": "/m.gguf", "MAX_HEADER_LINE_SIZE": value}, check_files=False)
    assert loaded.config.api.max_header_line == int(value)


@pytest.mark.parametrize("value", ["6", "0", "-1"])
def test_a_header_line_limit_no_request_can_meet_says_why(value):
    with pytest.raises(ConfigError) as caught:
        load(environ={"MODEL_PATH": "/m.gguf", "MAX_HEADER_LINE_SIZE": value}, check_files=False)
    assert str(caught.value) == (
        f"api.max_header_line: must be >= 7, got {value}: every HTTP/1.1 request has a Host header, whose line is "
        "7 bytes at the shortest ('Host: x', counted without its CRLF), so a smaller limit refuses every request "
        "(from env MAX_HEADER_LINE_SIZE)")


def test_a_50_byte_header_line_limit_is_enforced_to_the_byte():
    def status(raw: bytes) -> int:
        transport, _ = send(raw, max_header_line=50)
        return int(transport.value().split(b" ", 2)[1])

    line = b"X-Fifty: " + b"a" * 41  # 50 bytes
    assert status(b"GET /v1/models HTTP/1.1\r\n" + line + b"\r\n\r\n") == 200
    assert status(b"GET /v1/models HTTP/1.1\r\n" + line + b"a\r\n\r\n") == 431
    # The smallest limit still serves a request with the shortest Host.
    transport, _ = send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", max_header_line=7)
    assert parse(transport.value())[0].status == 200


# --- llama-server's errors, answered in llamad's shape -------------------------------------------


LLAMA_400 = b'{"error":{"code":400,"message":"\'messages\' is required","type":"invalid_request_error"}}'
SHAPED_400 = {"message": "'messages' is required", "type": "invalid_request_error", "param": None,
              "code": "invalid_request_error"}


@pytest.mark.parametrize("status, body, error", [
    (400, LLAMA_400, SHAPED_400),
    (400, b'{"error":{"code":400,"message":"too long","type":"exceed_context_size_error","n_prompt_tokens":9,'
          b'"n_ctx":4}}',
     {"message": "too long", "type": "exceed_context_size_error", "param": None, "code": "exceed_context_size_error",
      "n_prompt_tokens": 9, "n_ctx": 4}),
    (404, b'{"error":{"message":"File Not Found","type":"not_found_error","code":404}}',
     {"message": "File Not Found", "type": "not_found_error", "param": None, "code": "not_found_error"}),
    # A backend that already speaks OpenAI's shape keeps its string code and param.
    (400, b'{"error":{"message":"m","type":"invalid_request_error","param":"max_tokens","code":"integer_below_min"}}',
     {"message": "m", "type": "invalid_request_error", "param": "max_tokens", "code": "integer_below_min"}),
    # Other shapes: the message is found, the rest is OpenAI's for the status.
    (500, b'{"error":"boom"}', {"message": "boom", "type": "server_error", "param": None, "code": "server_error"}),
    (422, b'{"message":"bad field","code":422}',
     {"message": "bad field", "type": "invalid_request_error", "param": None, "code": "invalid_request_error"}),
    (503, b'[1, 2]', {"message": "[1, 2]", "type": "server_error", "param": None, "code": "server_error"}),
    (502, b'{"err', {"message": '{"err', "type": "server_error", "param": None, "code": "server_error"}),
    (500, b"", {"message": "backend answered 500", "type": "server_error", "param": None, "code": "server_error"}),
])
def test_a_backend_error_body_gets_llamads_shape(status, body, error):
    assert json.loads(backend_error_body(status, body)) == {"error": error}


class Child(TCPTransport):
    """A pooled connection to the child that answers the request written to it in ``reads``, on the next
    turn of the clock as a socket would."""

    def __init__(self, reads: tuple[bytes, ...], clock: Clock) -> None:
        super().__init__()
        self.reads = reads
        self.clock = clock

    def write(self, data: bytes) -> None:
        super().write(data)
        for read in self.reads:
            self.clock.callLater(0, self.protocol.dataReceived, read)


def child_answers(gateway: Gateway, *reads: bytes) -> Child:
    """The real proxy, relay and pool, with one kept-alive connection to a child that answers ``reads``."""
    gateway.proxy = proxy = Proxy(None, gateway.clock, 600)
    pool = proxy._upstream(gateway.models["demo"].backend.target().origin).pool
    child = Child(reads, gateway.clock)
    connection = _Connection(pool)
    connection.makeConnection(child)
    child.protocol = connection
    pool._idle(connection)
    return child


def relayed(request: bytes, *reads: bytes) -> tuple[Response, Child, Gateway]:
    """``request`` through port 8000 to a child that answers ``reads``: the client's response."""
    gateway = make_gateway()
    child = child_answers(gateway, *reads)
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(request)
    gateway.clock.advance(0)
    [response] = parse(transport.value())
    return response, child, gateway


CHAT = POST_HEAD + b"Content-Length: 2\r\n\r\n{}"


def head(status: bytes, *lines: bytes) -> bytes:
    return b"HTTP/1.1 " + status + b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"


def error_400(framing: str) -> bytes:
    if framing == "length":
        return head(b"400 Bad Request", b"Content-Type: application/json; charset=utf-8",
                    b"Content-Length: %d" % len(LLAMA_400)) + LLAMA_400
    return (head(b"400 Bad Request", b"Content-Type: application/json; charset=utf-8", b"Transfer-Encoding: chunked")
            + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (20, LLAMA_400[:20], len(LLAMA_400) - 20, LLAMA_400[20:]))


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_childs_json_error_split_anywhere_reaches_the_client_in_llamads_shape(framing):
    raw = error_400(framing)
    for cut in range(1, len(raw), 7):
        response, _, gateway = relayed(CHAT, raw[:cut], raw[cut:])
        assert response.status == 400, cut
        assert json.loads(response.body) == {"error": SHAPED_400}, cut
        assert int(response.headers[b"content-length"]) == len(response.body), cut
        assert response.headers[b"content-type"] == b"application/json; charset=utf-8", cut
    assert b'llamad_requests_total{code="400",method="POST",model="demo",route="/v1/chat/completions"} 1.0' in \
        gateway.metrics.exposition()


def test_an_http_1_0_client_gets_the_shaped_error_too():
    request = CHAT.replace(b"HTTP/1.1", b"HTTP/1.0")
    response, _, _ = relayed(request, error_400("chunked"))
    assert response.status == 400 and json.loads(response.body) == {"error": SHAPED_400}


def test_a_successful_answer_passes_as_it_came():
    # Even one that looks like an error: only a status from 400 up is an error.
    body = b'{"error":{"code":400,"message":"not an error","type":"x"}}'
    answer = head(b"200 OK", b"Content-Type: application/json", b"Content-Length: %d" % len(body)) + body
    response, _, _ = relayed(b"GET /props HTTP/1.1\r\nHost: x\r\n\r\n", answer)
    assert (response.status, response.body, response.headers[b"content-length"]) == (200, body, b"%d" % len(body))


def test_an_error_that_is_not_json_passes_as_it_came():
    answer = head(b"500 Internal Server Error", b"Content-Type: text/plain", b"Content-Length: 4") + b"oops"
    response, _, _ = relayed(GET_MODELS, answer)
    assert (response.status, response.body, response.headers[b"content-type"]) == (500, b"oops", b"text/plain")


def test_an_error_body_too_large_to_be_a_message_is_a_502_and_closes_the_child(monkeypatch):
    monkeypatch.setattr(proxy_module, "MAX_ERROR_BODY", 100)
    body = b'{"error": {"message": "' + b"x" * 200 + b'"}}'
    answer = head(b"400 Bad Request", b"Content-Type: application/json", b"Content-Length: %d" % len(body))
    response, child, _ = relayed(CHAT, answer, body[:60], body[60:])
    error = json.loads(response.body)["error"]
    assert (response.status, error["code"]) == (502, "backend_error")
    assert error["message"] == "backend answered 400 with an error body over 100 bytes"
    assert child.disconnecting


def test_an_error_answer_that_breaks_off_is_a_502():
    answer = head(b"400 Bad Request", b"Content-Type: application/json", b"Content-Length: 500") + b'{"error":'
    gateway = make_gateway()
    child = child_answers(gateway, answer)
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(CHAT)
    gateway.clock.advance(0)
    assert transport.value() == b""  # held: nothing of it reached the client yet
    child.protocol.connectionLost(Failure(ConnectionDone()))
    [response] = parse(transport.value())
    error = json.loads(response.body)["error"]
    assert (response.status, error["code"]) == (502, "backend_unreachable")
    assert error["message"].startswith("backend error answer broke off: ")


def test_the_answer_to_a_head_request_passes_as_it_came():
    answer = head(b"404 Not Found", b"Content-Type: application/json", b"Content-Length: 74")
    gateway = make_gateway()
    child_answers(gateway, answer)
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(b"HEAD /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    gateway.clock.advance(0)
    [response] = parse(transport.value(), head_request=True)
    assert response.status == 404 and response.headers[b"content-length"] == b"0"  # as the upstream reads a HEAD
