"""The proxy over real loopback TCP, in this process, against synthetic backends.

Synthetic backends make failure and speed cases exact: a backend that streams
without end, one that never answers, one that dies mid-stream.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from wire import one_model_gateway

from llamad.gateway.app import api_factory
from llamad.fleet.gate import Gate
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
        self.producers: list[EndlessStream] = []

    def render_POST(self, request):
        self.requests.append(request)
        if self.mode == "silent":
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/event-stream")
        if self.mode == "endless":
            producer = EndlessStream(request, self.sent)
            self.producers.append(producer)
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
    gateway = one_model_gateway(reactor, status, gate, Proxy(reactor, reactor, request_timeout), metrics)
    listening = reactor.listenTCP(0, api_factory(gateway), interface="127.0.0.1")
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


async def until(predicate, what: str, seconds: float = 30, interval: float = 0.02):
    """Poll ``predicate`` while the reactor runs; a generous deadline, since only a broken feature reaches it."""
    deadline = time.monotonic() + seconds
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await deferLater(reactor, interval)
    return value


def read_available(sock: socket.socket) -> tuple[bytes, bool]:
    """What a non-blocking socket has now, and whether the peer has closed it."""
    data = b""
    try:
        while chunk := sock.recv(1 << 20):
            data += chunk
    except BlockingIOError:
        return data, False
    return data, True


async def read_until_closed(sock: socket.socket, seconds: float = 30) -> bytes:
    sock.setblocking(False)
    data = b""

    def closed() -> bool:
        nonlocal data
        chunk, done = read_available(sock)
        data += chunk
        return done

    try:
        await until(closed, "the connection to close", seconds, interval=0.05)
    except AssertionError as e:
        raise AssertionError(f"{e}; got {data[:200]!r}") from None
    return data


async def stops_growing(counter: list[int], limit: int, checks: int = 10, interval: float = 0.05) -> int:
    """Wait until ``counter[0]`` is unchanged over ``checks`` consecutive polls, failing once it passes ``limit``.

    The producer writes on every reactor turn while it may, and each poll is a reactor turn, so a value that
    holds over ten polls is a paused producer however slow the machine; a growing one never settles.
    """
    last, same = counter[0], 0

    def settled() -> bool:
        nonlocal last, same
        now = counter[0]
        assert now <= limit, f"sent {now} bytes to a client that reads nothing: no backpressure"
        same = same + 1 if now == last else 0
        last = now
        return same >= checks

    await until(settled, "the backend to stop sending", interval=interval)
    return last


@pytest_twisted.ensureDeferred
async def test_slow_client_pauses_the_backend():
    backend, backend_port, port, api = serve("endless")
    sock = raw_post(port)
    try:
        await until(lambda: backend.sent[0] > 0, "the backend to start streaming")
        # The client reads nothing: the backend is paused once the socket
        # buffers fill, so what it sent stops growing and stays small.
        stalled = await stops_growing(backend.sent, limit=64 * 2**20)
        assert stalled > 0 and backend.producers[0].paused and not backend.producers[0].stopped
        # Reading resumes the flow.
        sock.setblocking(False)
        drained = 0

        def flowing() -> bool:
            nonlocal drained
            data, closed = read_available(sock)
            assert not closed, "the gateway closed a stream that was only slow"
            drained += len(data)
            return drained > 0 and backend.sent[0] > stalled

        await until(flowing, "the backend to resume once the client reads")
        # The client goes away: the backend request is cancelled too.
        sock.close()
        await until(lambda: backend.requests[0].finished or backend.requests[0]._disconnected,
                    "the backend request to be cancelled")
        assert backend.producers[0].stopped  # and it stops generating
    finally:
        sock.close()
        await api.stopListening()
        await backend_port.stopListening()


@pytest_twisted.ensureDeferred
async def test_timeout_before_the_response_starts_is_504():
    backend, backend_port, port, api = serve("silent", request_timeout=1.0)
    sock = raw_post(port, extra=b"Connection: close\r\n")
    try:
        data = await read_until_closed(sock)
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 504"), data
    assert json.loads(body)["error"]["code"] == "backend_timeout"
    await api.stopListening()
    await backend_port.stopListening()
    # The timeout also closed the request to the backend (which got it: the backend is silent, not unreachable).
    await until(lambda: len(backend.requests) == 1 and backend.requests[0].channel is None,
                "the backend request to be closed")


@pytest_twisted.ensureDeferred
async def test_backend_dying_mid_stream_sends_one_sse_error_event():
    backend, backend_port, port, api = serve("dies")
    sock = raw_post(port)
    try:
        data = await read_until_closed(sock)
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
