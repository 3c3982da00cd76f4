"""The proxy over real loopback TCP, in this process, against synthetic backends.

Synthetic backends make failure and speed cases exact: a backend that streams
without end, one that never answers, one that dies mid-stream.
"""

from __future__ import annotations

import json
import socket

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from llamad.activity import Activity
from llamad.gateway.app import Gateway, api_site
from llamad.gateway.gate import Gate
from llamad.gateway.proxy import Proxy
from llamad.metrics import Metrics
from llamad.status import Status
from llamad.supervisor import ExternalBackend

pytestmark = pytest.mark.integration

CHUNK = b"data: " + b"x" * 65526 + b"\n\n"


class EndlessStream:
    """A push producer writing SSE chunks as fast as its consumer accepts them."""

    def __init__(self, request, counter: list[int]) -> None:
        self.request = request
        self.counter = counter
        self.paused = False
        self.stopped = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        reactor.callLater(0, self.pump)

    def stopProducing(self) -> None:
        self.stopped = True

    def pump(self) -> None:
        while not (self.paused or self.stopped):
            self.request.write(CHUNK)
            self.counter[0] += len(CHUNK)
            if self.counter[0] % (len(CHUNK) * 16) == 0:
                reactor.callLater(0, self.pump)  # let the reactor breathe
                return


class Backend(Resource):
    isLeaf = True

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.sent = [0]
        self.requests: list = []

    def render_POST(self, request):
        self.requests.append(request)
        if self.mode == "silent":
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/event-stream")
        if self.mode == "endless":
            producer = EndlessStream(request, self.sent)
            request.registerProducer(producer, True)
            producer.resumeProducing()
        elif self.mode == "dies":
            request.write(b'data: {"n": 1}\n\n')
            reactor.callLater(0.05, request.channel.transport.abortConnection)
        return NOT_DONE_YET


def gateway_for(port: int, request_timeout: float = 600) -> tuple[int, object]:
    backend = ExternalBackend(f"http://127.0.0.1:{port}")
    status = Status(reactor, backend, "synthetic", lazy=False)
    metrics = Metrics()
    gate = Gate(reactor, status, backend, 4, 8, 5, metrics)
    gateway = Gateway(reactor, status, gate, Proxy(reactor, reactor, request_timeout), metrics, Activity(reactor))
    listening = reactor.listenTCP(0, api_site(gateway), interface="127.0.0.1")
    return listening.getHost().port, listening


def serve(mode: str, request_timeout: float = 600) -> tuple[Backend, object, int, object]:
    """A synthetic backend and a gateway in front of it: (backend, its port, the gateway's port, its listener)."""
    backend = Backend(mode)
    backend_port = reactor.listenTCP(0, Site(backend), interface="127.0.0.1")
    port, api = gateway_for(backend_port.getHost().port, request_timeout)
    return backend, backend_port, port, api


def raw_post(port: int, body: bytes = b'{"stream": true}', extra: bytes = b"") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"%sContent-Length: %d\r\n\r\n%s" % (extra, len(body), body))
    return sock


async def read_until_closed(sock: socket.socket, seconds: float) -> bytes:
    sock.setblocking(False)
    data = b""
    for _ in range(int(seconds / 0.05)):
        await deferLater(reactor, 0.05)
        try:
            while chunk := sock.recv(65536):
                data += chunk
            return data  # recv returned b"": closed
        except BlockingIOError:
            continue
    raise AssertionError(f"connection not closed after {seconds} s; got {data[:200]!r}")


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_backend():
    backend, backend_port, port, api = serve("endless")
    sock = raw_post(port)
    try:
        await deferLater(reactor, 1.5)
        stalled = backend.sent[0]
        await deferLater(reactor, 0.5)
        # The client reads nothing: the backend is paused once the socket
        # buffers fill, so what it sent stops growing and stays small.
        assert backend.sent[0] == stalled
        assert stalled < 64 * 2**20
        # Reading resumes the flow.
        sock.setblocking(False)
        drained = 0
        for _ in range(40):
            await deferLater(reactor, 0.02)
            try:
                while chunk := sock.recv(1 << 20):
                    drained += len(chunk)
            except BlockingIOError:
                pass
        assert drained > 0 and backend.sent[0] > stalled
    finally:
        sock.close()
        await deferLater(reactor, 0.2)
        # The client went away: the backend request was cancelled too.
        assert backend.requests[0].finished or backend.requests[0]._disconnected
        await api.stopListening()
        await backend_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_timeout_before_the_response_starts_is_504():
    backend, backend_port, port, api = serve("silent", request_timeout=0.3)
    sock = raw_post(port, extra=b"Connection: close\r\n")
    try:
        data = await read_until_closed(sock, 5)
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504"), data
    assert json.loads(body)["error"]["code"] == "backend_timeout"
    await api.stopListening()
    await backend_port.stopListening()
    # The timeout also closed the request to the backend.
    await deferLater(reactor, 0.1)
    assert all(request.channel is None for request in backend.requests)


@pytest_twisted.ensureDeferred
async def test_backend_dying_mid_stream_sends_one_sse_error_event():
    backend, backend_port, port, api = serve("dies")
    sock = raw_post(port)
    try:
        data = await read_until_closed(sock, 5)
    finally:
        sock.close()
    assert data.count(b"HTTP/1.1") == 1 and data.startswith(b"HTTP/1.1 200")
    body = data.partition(b"\r\n\r\n")[2]
    assert b'data: {"n": 1}' in body
    events = [line for line in body.split(b"\r\n") if line.startswith(b"data: {\"error\"")]
    assert len(events) == 1
    assert json.loads(events[0][6:])["error"]["code"] == "stream_interrupted"
    await api.stopListening()
    await backend_port.stopListening()
