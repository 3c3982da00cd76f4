"""Port 8000's front (llamad.gateway.front) and the framed relay behind it, in memory with a fake clock.

The protocol is driven byte by byte on a StringTransport; its deadlines are checked by the factory's sweep,
which runs on the gateway's Clock, so a time-out happens only when a test advances that clock.  The
limits it enforces while a request arrives are tested in test_limits.py.
"""

from __future__ import annotations

import json
from itertools import accumulate

import pytest
from fakes import PROXIED, FakeProxy, PendingProxy, TCPTransport
from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from wire import DONE, EVENTS, GET_MODELS, POST_HEAD, USAGE, connect, make_gateway, parse, read_chunked, send, server

from llamad.gateway.app import Gateway
from llamad.gateway.front import FrontFactory, FrontProtocol
from llamad.gateway.guard import Cors
from llamad.gateway.proxy import Relay
from llamad.gateway.routes import ROUTES
from llamad.gateway.immediate_write import write_now
from llamad.gateway import front as front_module
from llamad.gateway import proxy as proxy_module
from llamad.gateway.upstream import UpstreamPool, _Connection, dechunk
from llamad.gateway.usage import UsageTap

GET_PING = b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n"

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # a logged failure fails the test


def close(protocol: FrontProtocol) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


def frame(*events: bytes) -> bytes:
    """Each event as one chunk, as llama-server writes a stream."""
    return b"".join(b"%x\r\n%s\r\n" % (len(event), event) for event in events)


# --- serving: a bug, CORS, a UNIX socket ---------------------------------------------------------


class Failures:
    """Stands in for a module's logger: keeps what it was told to log as a failure."""

    def __init__(self) -> None:
        self.logged: list[str] = []

    def failure(self, format: str, *args: object, **kw: object) -> None:
        self.logged.append(format)


@pytest.mark.parametrize("started", [False, True])
def test_a_bug_while_answering_is_a_500_or_a_cut_never_a_stuck_connection(monkeypatch, started):
    gateway = make_gateway()
    logged = Failures()
    monkeypatch.setattr(front_module, "log", logged)

    def broken(request):
        if started:
            request.write(b"partial")
        raise RuntimeError("a bug")

    monkeypatch.setattr(gateway, "serve", broken)
    transport, proxy = send(GET_PING, gateway=gateway)
    assert logged.logged == ["error answering {method} {path}"]
    if started:
        assert transport.disconnecting  # cut: the client sees an incomplete answer
    else:
        response = parse(transport.value())[0]
        assert response.status == 500 and json.loads(response.body)["error"]["code"] == "internal_error"


def test_a_cors_preflight_is_204_without_a_body_length_and_answers_carry_cors_headers():
    gateway = make_gateway(cors=Cors(("https://app.example",)))
    preflight = (b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: https://app.example\r\n"
                 b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n\r\n")
    transport, proxy = send(preflight + GET_MODELS.replace(b"Host: x", b"Host: x\r\nOrigin: https://app.example"),
                            gateway=gateway)
    head, _, rest = transport.value().partition(b"\r\n\r\n")  # a 204 has no body, whatever its headers say
    assert head.startswith(b"HTTP/1.1 204 ") and b"content-length" not in head.lower()
    assert len(proxy.targets) == 1  # the GET; the preflight never reached the proxy
    assert b"access-control-allow-origin: https://app.example" in head
    (second,) = parse(rest)
    assert second.status == 200 and second.headers[b"access-control-allow-origin"] == b"https://app.example"


def test_a_unix_socket_is_served_and_not_counted_per_client():
    factory = server()
    protocol = factory.buildProtocol(UNIXAddress(b"/run/llamad.sock"))
    transport = StringTransport(peerAddress=UNIXAddress(None))  # no setTcpNoDelay, no host
    protocol.makeConnection(transport)
    protocol.dataReceived(GET_PING)
    assert parse(transport.value())[0].status == 200 and factory.incomplete == {}


# --- llamad's own routes --------------------------------------------------------------------------


def test_llamads_own_routes_in_the_table_are_kleins_with_the_same_methods_and_the_front_serves_each():
    """routes.ROUTES says which routes llamad answers; Klein's table routes them: the two cannot drift."""
    table = {route.path: set(route.methods) for route in ROUTES if route.answered_by == "llamad"}
    klein = {rule.rule: set(rule.methods or ()) for rule in Gateway.app.url_map.iter_rules()}
    assert klein == table
    for path, methods in sorted(table.items()):
        for method in sorted(methods):
            gateway = make_gateway()
            protocol, transport = connect(server(gateway), host="127.0.0.1")  # loopback: admin routes without auth
            protocol.dataReceived(b"%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method.encode(), path.encode()))
            [response] = parse(transport.value(), head_request=method == "HEAD")
            assert response.status == 200 and gateway.proxy.targets == [], (method, path)


def test_ping_is_an_empty_200():
    transport, proxy = send(GET_PING)
    [response] = parse(transport.value())
    assert (response.status, response.headers[b"content-length"], response.body) == (200, b"0", b"")
    assert not transport.disconnecting and proxy.targets == []


def test_health_is_json():
    transport, proxy = send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    [response] = parse(transport.value())
    assert response.status == 200 and response.headers[b"content-type"] == b"application/json"
    assert json.loads(response.body)["status"] == "ok"


def test_head_health_keeps_the_content_length_and_sends_no_body():
    get, _ = send(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _ = send(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
    [response] = parse(head.value(), head_request=True)
    assert head.value().endswith(b"\r\n\r\n")  # the head only
    length = parse(get.value())[0].headers[b"content-length"]
    assert response.status == 200 and response.headers[b"content-length"] == length != b"0"


def test_delete_health_is_a_json_405_with_allow():
    transport, proxy = send(b"DELETE /health HTTP/1.1\r\nHost: x\r\n\r\n")
    [response] = parse(transport.value())
    assert response.status == 405 and response.headers[b"allow"] == b"GET, HEAD"
    assert json.loads(response.body)["error"]["code"] == "method_not_allowed"


def test_metrics_is_prometheus_text():
    transport, proxy = send(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    [response] = parse(transport.value())
    assert response.status == 200 and response.headers[b"content-type"].startswith(b"text/plain")
    assert b'llamad_requests_total{code="200",method="GET",model="-",route="/metrics"} 1.0' in response.body


# --- keep-alive and pipelining --------------------------------------------------------------------


def test_two_pipelined_requests_are_answered_in_order_on_one_connection():
    transport, proxy = send(GET_MODELS + GET_PING)
    models, ping = parse(transport.value())
    assert (models.status, models.body) == (200, PROXIED)
    assert (ping.status, ping.body) == (200, b"")
    assert not transport.disconnecting


def test_a_pipelined_request_waits_for_the_answer_before_it():
    gateway = make_gateway()
    gateway.proxy = proxy = PendingProxy()
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(GET_MODELS + GET_PING)
    assert transport.value() == b""  # /ping is answered at once, but only after /v1/models
    proxy.answer()
    assert [(r.status, r.body) for r in parse(transport.value())] == [(200, PROXIED), (200, b"")]


def test_http_1_0_gets_a_1_0_answer_ended_by_the_close():
    transport, proxy = send(b"GET /v1/models HTTP/1.0\r\n\r\n")
    [response] = parse(transport.value())
    assert (response.version, response.status, response.body) == (b"HTTP/1.0", 200, PROXIED)
    assert b"transfer-encoding" not in response.headers and response.headers[b"connection"] == b"close"
    assert transport.disconnecting


def test_connection_close_closes_after_the_answer():
    transport, proxy = send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    [response] = parse(transport.value())
    assert (response.status, response.body, response.headers[b"connection"]) == (200, PROXIED, b"close")
    assert transport.disconnecting


def test_expect_100_continue_is_answered_before_the_body_is_sent():
    factory = server()
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b"HTTP/1.1 100 Continue\r\n\r\n"
    protocol.dataReceived(b"{}")
    interim, final = parse(transport.value())
    assert (interim.status, final.status, final.body) == (100, 200, PROXIED)


def test_a_pipelined_head_after_a_large_body_in_the_same_read_is_not_431():
    body = b"{" + b" " * 29998 + b"}"
    post = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    transport, proxy = send(post + b"GET /ping HTTP/1.1\r\n", max_body_bytes=100000)
    assert [r.status for r in parse(transport.value())] == [200] and not transport.disconnecting


def test_nothing_is_written_after_a_connection_close_answer():
    transport, proxy = send(b"GET /ping HTTP/1.1\r\nConnection: close\r\n\r\n" + GET_PING)
    assert [r.status for r in parse(transport.value())] == [200]


def test_an_upgrade_request_is_answered_then_the_connection_closes():
    transport, proxy = send(b"GET /ping HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert parse(transport.value())[0].status == 200 and transport.disconnecting


# --- the client going away ------------------------------------------------------------------------


def pending_post() -> tuple[FrontFactory, FrontProtocol, TCPTransport, PendingProxy]:
    """A POST on a fresh connection, held by the proxy until the test answers it."""
    gateway = make_gateway()
    gateway.proxy = proxy = PendingProxy()
    factory = server(gateway)
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Content-Length: 2\r\n\r\n{}")
    return factory, protocol, transport, proxy


def test_the_client_going_away_cancels_the_proxied_request():
    factory, protocol, transport, proxy = pending_post()
    [(request, _)] = proxy.pending
    close(protocol)
    assert proxy.cancelled == [request] and transport.value() == b""
    assert b'llamad_requests_total{code="499",method="POST",model="demo",route="/v1/chat/completions"} 1.0' in \
        factory.gateway.metrics.exposition()


# --- the child's chunks, passed on as they came ---------------------------------------------------


class FramedHandler:
    """A handler that takes a chunked body framed, recording each ``chunks`` call."""

    framed = True

    def __init__(self) -> None:
        self.lasts: list[bool] = []
        self.calls: list[tuple[bytes, bool]] = []
        self.sizes: list[int] = []  # data bytes of the chunks starting in each call
        self.plain: list[bytes] = []
        self.done = False
        self.failure: tuple[str, bool] | None = None

    def response_started(self, status, reason, headers, length, producer):
        self.status = status

    def body(self, data):
        self.plain.append(data)

    def chunks(self, framed, whole, size, last=False):
        self.calls.append((framed, whole))
        self.sizes.append(size)
        self.lasts.append(last)

    def finished(self):
        self.done = True

    def failed(self, reason, started, sent=True, unanswered=False):
        self.failure = (reason, started)


CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
ONE_BY_ONE = [b"5\r\nhello\r\n", b"6;ext=1\r\n world\r\n", b"1\r\n!\r\n"]
CHUNKS = b"".join(ONE_BY_ONE)
# One SSE event per chunk, as a model server writes them (one with a chunk extension).
EVENT_BY_EVENT = [b"9\r\ndata: 1\n\n\r\n", b"a;ext=1\r\ndata: 22\n\n\r\n", b"b\r\ndata: 333\n\n\r\n"]
EVENT_CHUNKS = b"".join(EVENT_BY_EVENT)
EVENT_ENDS = set(accumulate(map(len, EVENT_BY_EVENT)))  # offsets in EVENT_CHUNKS where a chunk ends


def exchange(handler, *reads: bytes) -> _Connection:
    """One exchange with the child on a pooled connection: its response arrives in ``reads``."""
    connection = _Connection(UpstreamPool(None, Clock(), "127.0.0.1", 1, max_idle=4))
    connection.makeConnection(TCPTransport())
    connection.send(b"GET / HTTP/1.1\r\n\r\n", handler, head_request=False)
    for data in reads:
        connection.dataReceived(data)
    return connection


def framed_exchange(*reads: bytes) -> tuple[FramedHandler, _Connection]:
    handler = FramedHandler()
    return handler, exchange(handler, *reads)


@pytest.mark.parametrize("end", [b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"])
def test_framed_chunks_split_anywhere_pass_unchanged_marked_at_boundaries_and_the_end(end):
    raw = CHUNKED_HEAD + EVENT_CHUNKS + end
    ends = EVENT_ENDS | {len(EVENT_CHUNKS)}
    for cut in range(1, len(raw)):
        handler, connection = framed_exchange(raw[:cut], raw[cut:])
        assert b"".join(framed for framed, _ in handler.calls) == EVENT_CHUNKS + end, cut  # the child's end too
        assert handler.lasts[-1] and not any(handler.lasts[:-1]), cut
        passed = 0
        for (framed, whole), last in zip(handler.calls, handler.lasts):
            passed += len(framed)
            if not last:
                assert whole == (passed in ends), (cut, passed)
        assert sum(handler.sizes) == len(dechunk(EVENT_CHUNKS)), cut  # each chunk's data counted once
        assert handler.done and handler.plain == [] and connection.pool.idle == [connection], cut


def test_a_boundary_after_data_that_does_not_end_an_event_is_not_called_whole():
    """Safe either way: a relay that needs whole events holds such a read until one ends."""
    for cut in range(1, len(CHUNKS)):
        handler, _ = framed_exchange(CHUNKED_HEAD + CHUNKS[:cut], CHUNKS[cut:])
        assert [whole for _, whole in handler.calls] == [False, False], cut
        assert sum(handler.sizes) == len(dechunk(CHUNKS)), cut


def test_data_that_looks_like_the_next_size_line_is_not_mistaken_for_a_boundary():
    # The first chunk's data ends in CRLF and "b"; the read ends after the next chunk's size line "b".
    tricky = b"c\r\ndata: x\n\n\r\nb\r\n" + b"b\r\n"
    handler, _ = framed_exchange(CHUNKED_HEAD + tricky, b"data: 333\n\n\r\n")
    assert [whole for _, whole in handler.calls] == [False, True]


def test_a_framed_body_still_open_is_not_done():
    handler, connection = framed_exchange(CHUNKED_HEAD + EVENT_CHUNKS)
    assert not handler.done and handler.calls == [(EVENT_CHUNKS, True)] and handler.lasts == [False]
    assert connection.pool.idle == []


def test_a_bad_chunk_size_fails_the_framed_exchange():
    handler, connection = framed_exchange(CHUNKED_HEAD + b"5\r\nhello\r\nzz\r\n")
    assert handler.failure == ("bad chunked encoding from upstream", True) and not handler.done


def test_dechunk_returns_the_data_of_whole_chunks():
    assert dechunk(CHUNKS) == b"hello world!"
    assert dechunk(CHUNKS + b"0\r\nX-Trailer: 1\r\n\r\n") == b"hello world!"
    assert dechunk(b"") == b""


class ChildProxy(FakeProxy):
    """The real relay and upstream parser, fed the child's response in the given reads instead of a socket."""

    def __init__(self, *reads: bytes) -> None:
        super().__init__()
        self.reads = reads

    def relay(self, request, target, body, owner, first_byte=None, tap_for=None, sse_started=False, uri=None):
        relay = Relay(request, owner, first_byte, tap_for, sse_started)
        exchange(relay, *self.reads)
        return relay


STREAM_BODY = b'{"stream": true, "messages": []}'  # no include_usage: llamad asks, and hides the answer
CHILD_STREAM = CHUNKED_HEAD + frame(*EVENTS, USAGE, DONE) + b"0\r\n\r\n"


def stream(gateway: Gateway, *reads: bytes) -> bytes:
    """A streamed chat completion relayed from the child's ``reads``: what the client got after the head."""
    gateway.proxy = ChildProxy(*reads)
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_BODY), STREAM_BODY))
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Transfer-Encoding: chunked" in head
    return body


def test_a_relayed_stream_passes_the_childs_chunks_unchanged_but_the_usage_event():
    gateway = make_gateway()
    body = stream(gateway, CHUNKED_HEAD, *(frame(event) for event in [*EVENTS, USAGE, DONE]), b"0\r\n\r\n")
    assert body == frame(*EVENTS, DONE) + b"0\r\n\r\n"
    assert b'llamad_tokens_total{kind="prompt",model="demo"} 12.0' in gateway.metrics.exposition()


def test_bytes_sent_counts_a_relayed_streams_body_bytes_not_its_framing():
    gateway = make_gateway()
    stream(gateway, CHUNKED_HEAD, frame(*EVENTS), b"0\r\n\r\n")
    assert gateway.bytes_sent == len(b"".join(EVENTS))


def test_a_relayed_stream_split_anywhere_loses_only_the_usage_event():
    gateway = make_gateway()
    for cut in range(1, len(CHILD_STREAM)):
        body = stream(gateway, CHILD_STREAM[:cut], CHILD_STREAM[cut:])
        assert read_chunked(body) == (b"".join(EVENTS) + DONE, b""), cut


def test_a_stream_that_never_ends_on_a_chunk_boundary_flows_on_without_a_tap_to_serve():
    # The client asked for the usage itself: nothing is removed, so no read is held back, however the
    # child's chunks fall across reads (held ones would never reach the client, and nothing would pause).
    body = b'{"stream": true, "stream_options": {"include_usage": true}, "messages": []}'
    gateway = make_gateway()
    big = b"data: " + b"x" * 1000 + b"\n\n"
    raw = frame(big, big, big)
    reads = [CHUNKED_HEAD + raw[:700], raw[700:1500], raw[1500:2700]]  # none ends where a chunk does
    gateway.proxy = ChildProxy(*reads)
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert transport.value().partition(b"\r\n\r\n")[2] == raw[:2700]


def test_a_stripped_stream_without_event_ends_is_held_only_up_to_a_bound(monkeypatch):
    monkeypatch.setattr(proxy_module, "MAX_HELD", 1500)
    gateway = make_gateway()
    big = b"data: " + b"x" * 1000 + b"\n\n"
    raw = frame(big, big, USAGE, DONE) + b"0\r\n\r\n"
    cuts = [700, 1500, 2200]  # no read ends on a chunk boundary until the last
    reads = [CHUNKED_HEAD + raw[:cuts[0]], raw[cuts[0]:cuts[1]], raw[cuts[1]:cuts[2]], raw[cuts[2]:]]
    body = stream(gateway, *reads)
    # Past the bound the stream goes on as it came: the usage event included, the tokens still counted.
    assert read_chunked(body) == (big + big + USAGE + DONE, b"")
    assert b'llamad_tokens_total{kind="prompt",model="demo"} 12.0' in gateway.metrics.exposition()


# --- the usage tap on whole chunks ----------------------------------------------------------------


@pytest.mark.parametrize("sse", [True, False])
def test_without_stripping_every_chunk_passes_and_the_usage_is_found_at_finish(sse):
    tap = UsageTap(sse, strip_usage_event=False)
    assert all(tap.passes(frame(event)) for event in [*EVENTS, USAGE, DONE])
    tap.finish()
    assert tap.usage == (12, 3)


def test_stripping_refuses_the_usage_chunk_and_data_not_ending_an_event():
    tap = UsageTap(True, strip_usage_event=True)
    assert tap.passes(frame(EVENTS[0])) and tap.passes(frame(*EVENTS[1:]))
    assert not tap.passes(frame(USAGE))
    assert not tap.passes(frame(EVENTS[0][:20]))  # half an event
    assert not tap.passes(frame(EVENTS[0], USAGE, DONE))


# --- write_now ------------------------------------------------------------------------------------


def test_write_now_on_a_transport_other_than_tcp_writes_the_usual_way():
    transport = StringTransport()
    write_now(transport, b"hello")
    write_now(transport, b" world")
    assert transport.value() == b"hello world"


# --- no garbage for the cycle collector --------------------------------------------------------------


class AnsweringChild(TCPTransport):
    """A pooled connection to the child that answers each request written to it, on the next turn of
    the clock as a socket would."""

    def __init__(self, answer: bytes, clock: Clock) -> None:
        super().__init__()
        self.answer = answer
        self.clock = clock

    def write(self, data: bytes) -> None:
        self.clock.callLater(0, self.protocol.dataReceived, self.answer)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    CHUNKED_HEAD + frame(*EVENTS, USAGE, DONE) + b"0\r\n\r\n",
])
def test_a_proxied_request_leaves_no_reference_cycle(answer):
    """Each request's objects are freed by their reference counts: the cycle collector, whose passes
    cost a daemon under load about a tenth of its CPU, has nothing of them to find."""
    import gc

    from llamad.gateway.proxy import Proxy

    gateway = make_gateway()
    gateway.proxy = proxy = Proxy(None, gateway.clock, 600)
    pool = proxy._upstream(gateway.models["demo"].backend.target().origin).pool
    connection = _Connection(pool)
    child = AnsweringChild(answer, gateway.clock)
    connection.makeConnection(child)
    child.protocol = connection
    pool._idle(connection)
    protocol, transport = connect(server(gateway))
    body = b'{"messages": [], "stream": true}' if answer.startswith(CHUNKED_HEAD) else b"{}"
    request = POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    protocol.dataReceived(request)  # the first one makes what lives on (metric children, caches)
    gateway.clock.advance(0)
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(20):
            protocol.dataReceived(request)
            gateway.clock.advance(0)
        assert gc.collect() == 0
    finally:
        if enabled:
            gc.enable()
    assert [r.status for r in parse(transport.value())] == [200] * 21


# --- the child's time to answer -------------------------------------------------------------------------


class SilentChild(TCPTransport):
    """A pooled connection to a child that takes each request and never answers."""

    def __init__(self, clock: Clock, answer_after: float | None = None) -> None:
        super().__init__()
        self.clock = clock
        self.answer_after = answer_after

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.answer_after is not None:
            answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
            self.clock.callLater(self.answer_after, self.protocol.dataReceived, answer)


def proxied_through(child_for, timeout: float) -> tuple[Gateway, FrontProtocol, TCPTransport, TCPTransport]:
    from llamad.gateway.proxy import Proxy

    gateway = make_gateway()
    gateway.proxy = proxy = Proxy(None, gateway.clock, timeout)
    pool = proxy._upstream(gateway.models["demo"].backend.target().origin).pool
    connection = _Connection(pool)
    child = child_for(gateway.clock)
    connection.makeConnection(child)
    child.protocol = connection
    pool._idle(connection)
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(POST_HEAD + b"Content-Length: 2\r\n\r\n{}")
    assert child.value().startswith(b"POST /v1/chat/completions ")  # the child has the request
    return gateway, protocol, transport, child


def test_a_child_that_does_not_start_answering_in_request_timeout_gets_a_504_and_its_connection_closed():
    gateway, _, transport, child = proxied_through(SilentChild, 5)
    gateway.clock.advance(4.9)
    assert transport.value() == b""
    gateway.clock.advance(0.6)  # the sweep finds it at most half a second late
    [response] = parse(transport.value())
    assert response.status == 504 and json.loads(response.body)["error"]["code"] == "backend_timeout"
    assert child.disconnecting  # llama.cpp sees the close and frees the slot
    assert gateway.proxy.sweeper is None and not gateway.proxy.active  # nothing left to watch


def test_a_child_that_answers_in_time_is_not_cut_and_the_sweep_stops():
    gateway, _, transport, child = proxied_through(lambda clock: SilentChild(clock, answer_after=3), 5)
    gateway.clock.advance(3)
    assert [r.status for r in parse(transport.value())] == [200]
    gateway.clock.advance(10)
    assert [r.status for r in parse(transport.value())] == [200] and not child.disconnecting
    assert gateway.proxy.sweeper is None  # no timer left once nothing waits for an answer
