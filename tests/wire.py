"""Port 8000 in memory, for unit tests: a gateway built from the fakes on a Clock, requests into its front
(raw bytes, or treq's client over an in-memory connection), and the responses read back."""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from treq.testing import StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.web.resource import Resource

from fakes import FakeBackend, FakeProxy, TCPTransport
from llamad.activity import Activity
from llamad.gateway.app import Gateway, api_factory
from llamad.gateway.front import FrontFactory, FrontProtocol
from llamad.fleet.gate import Gate
from llamad.fleet.runtime import ModelRuntime
from llamad.metrics import Metrics
from llamad.status import Status
from llamad.supervisor import State

KEY = "k" * 24
POST_HEAD = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
GET_MODELS = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"

# The fields of /metrics in JSON (what llama-gguf-inference's gateway answered).
GATEWAY_FIELDS = {"requests_total", "requests_success", "requests_error", "requests_active", "requests_authenticated",
                  "requests_unauthorized", "bytes_sent", "queue_depth", "queue_rejections",
                  "queue_wait_seconds_total", "uptime_seconds"}


# --- a gateway on the fakes ------------------------------------------------------------------------------


def build(state: State = State.READY, lazy: bool = False, wait: float = 10, max_concurrent: int = 4,
          max_queue: int = 8, **gateway_kw):
    """One model's gateway behind treq's client: ``(http, clock, backend, status, metrics, proxy)``."""
    clock = Clock()
    backend = FakeBackend(state)
    status = Status(clock, backend, "demo", lazy=lazy)
    metrics = Metrics()
    proxy = FakeProxy()
    gate = Gate(clock, status, backend, max_concurrent, max_queue, wait, metrics)
    gateway = one_model_gateway(clock, status, gate, proxy, metrics, **gateway_kw)
    return client(gateway), clock, backend, status, metrics, proxy


def client(gateway: Gateway) -> StubTreq:
    """treq's functions, each request over an in-memory connection to ``gateway``'s front."""
    stub = StubTreq(Resource())
    stub._agent._serverFactory = server(gateway, max_body_bytes=10485760)  # the front, not treq's own Site
    stub.gateway = gateway
    return stub


async def json_of(response) -> dict:
    return json.loads(await response.content())


def make_gateway(**kw: Any) -> Gateway:
    """One model's Gateway on a Clock, with a ready FakeBackend and a FakeProxy."""
    clock = Clock()
    backend = FakeBackend()
    status = Status(clock, backend, "demo", lazy=False)
    metrics = Metrics()
    gate = Gate(clock, status, backend, 4, 8, 10, metrics)
    return one_model_gateway(clock, status, gate, FakeProxy(), metrics, **kw)


def one_model_gateway(clock: Clock, status: Status, gate: Gate, proxy: Any, metrics: Metrics, **kw: Any) -> Gateway:
    """The Gateway of one model (``status.model_id``) behind ``gate``, its activity the process-wide one."""
    activity = Activity(clock)
    runtime = ModelRuntime(status.model_id, gate.backend, gate, activity)
    return Gateway(clock, status, {runtime.id: runtime}, proxy, metrics, activity, **kw)


# --- raw bytes into the front (llamad.gateway.front) ------------------------------------------------------


class Response(NamedTuple):
    """One response as the client reads it."""

    version: bytes
    status: int
    headers: dict[bytes, bytes]  # lower-case names
    body: bytes  # de-chunked


def server(gateway: Gateway | None = None, **limits) -> FrontFactory:
    """The front's factory with a 1000-byte body limit unless told, its sweep started (on the gateway's Clock)."""
    factory = api_factory(gateway or make_gateway(), **{"max_body_bytes": 1000, **limits})
    factory.doStart()
    return factory


def connect(factory: FrontFactory, port: int = 40000, host: str = "10.0.0.1") -> tuple[FrontProtocol, TCPTransport]:
    address = IPv4Address("TCP", host, port)
    protocol = factory.buildProtocol(address)
    transport = TCPTransport(peerAddress=address)
    protocol.makeConnection(transport)
    return protocol, transport


def send(raw: bytes, **limits) -> tuple[TCPTransport, FakeProxy]:
    """``raw`` in one read on a fresh connection: its transport, and the proxy that saw what got through."""
    factory = server(**limits)
    protocol, transport = connect(factory)
    protocol.dataReceived(raw)
    return transport, factory.gateway.proxy


def read_chunked(data: bytes) -> tuple[bytes, bytes]:
    """A chunked body at the start of ``data`` (llamad sends no trailers): its data, and what follows it."""
    body = b""
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line, 16)
        if size == 0:
            assert data.startswith(b"\r\n")
            return body, data[2:]
        assert data[size:size + 2] == b"\r\n"
        body, data = body + data[:size], data[size + 2:]


def parse(data: bytes, head_request: bool = False) -> list[Response]:
    """Every response in ``data``, in order; a body without a length or chunks runs to the end."""
    responses = []
    while data:
        head, _, data = data.partition(b"\r\n\r\n")
        status_line, *lines = head.split(b"\r\n")
        version, status = status_line.split(b" ")[:2]
        headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
        if head_request or status == b"100":
            body = b""
        elif b"content-length" in headers:
            length = int(headers[b"content-length"])
            body, data = data[:length], data[length:]
        elif headers.get(b"transfer-encoding") == b"chunked":
            body, data = read_chunked(data)
        else:
            body, data = data, b""
        responses.append(Response(version, int(status), headers, body))
    return responses


# --- the answer -------------------------------------------------------------------------------------------


def only_response(transport) -> Response:
    """The one response written on ``transport``."""
    responses = parse(transport.value())
    assert len(responses) == 1
    return responses[0]


def error_of(transport) -> tuple[int, str, str]:
    """Status, error code and message of the one (error) response written on ``transport``."""
    response = only_response(transport)
    err = json.loads(response.body)["error"]
    return response.status, err["code"], err["message"]


def answer(transport) -> tuple[int, dict[bytes, bytes], dict]:
    """The one response on ``transport``: status, headers (lower-case names), JSON body."""
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status_line, *lines = head.split(b"\r\n")
    headers = {name.strip().lower(): value.strip() for name, value in (line.split(b":", 1) for line in lines)}
    assert int(headers[b"content-length"]) == len(body)
    return int(status_line.split(b" ")[1]), headers, json.loads(body)


def refused(transport, status: int, code: str) -> dict:
    """Assert an OpenAI-shaped JSON refusal, and that the connection is closing."""
    got, headers, body = answer(transport)
    assert (got, body["error"]["code"]) == (status, code), body
    assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
    assert headers[b"content-type"] == b"application/json" and headers[b"connection"] == b"close"
    assert transport.disconnecting
    return body["error"]


# --- a streamed chat completion, as llama-server sends it ---------------------------------------------------


def chunk_event(n: int, content: str) -> bytes:
    body = {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": content}}], "created": 1,
            "id": "chatcmpl-1", "model": "demo", "object": "chat.completion.chunk"}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


FINAL = (b'data: {"choices":[{"finish_reason":"stop","index":0,"delta":{}}],"created":1,"id":"chatcmpl-1",'
         b'"model":"demo","object":"chat.completion.chunk","timings":{"predicted_n":3}}\n\n')
USAGE = (b'data: {"choices":[],"created":1,"id":"chatcmpl-1","model":"demo","object":"chat.completion.chunk",'
         b'"usage":{"completion_tokens":3,"prompt_tokens":12,"total_tokens":15}}\n\n')
DONE = b"data: [DONE]\n\n"
EVENTS = [chunk_event(0, "Hel"), chunk_event(1, "lo \"usage\" \n\n"), chunk_event(2, "!"), FINAL]
