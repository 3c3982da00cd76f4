"""HTTP-level limits on port 8000, enforced by the front while a request arrives, in memory with a fake clock.

Each connection is driven byte by byte on a StringTransport; the front's deadlines are checked by its sweep,
every 0.5 s of the gateway's Clock, so a time-out happens only when a test advances that clock.  What got past
every limit is what the proxy saw.
"""

from __future__ import annotations

import pytest
from fakes import PROXIED, FakeProxy, PendingProxy
from twisted.internet.address import UNIXAddress
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from wire import GET_MODELS, KEY, POST_HEAD, answer, connect, make_gateway, parse, refused, send, server

from llamad.gateway.app import Gateway, api_factory
from llamad.gateway.front import FrontFactory, FrontProtocol
from llamad.gateway.guard import Auth, Cors

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # a logged failure fails the test


class Recording(FakeProxy):
    """A FakeProxy that keeps each request it relayed: method, target and body."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, bytes, bytes]] = []

    def relay(self, request, target, body, owner, first_byte=None, tap_for=None, sse_started=False, uri=None):
        self.seen.append((request.method, request.uri, body))
        return super().relay(request, target, body, owner, first_byte, tap_for, sse_started, uri)


def recording(**limits) -> tuple[FrontFactory, Recording]:
    """The front, with a proxy that records what got through."""
    gateway = make_gateway()
    gateway.proxy = proxy = Recording()
    return server(gateway, **limits), proxy


def sent(raw: bytes, **limits) -> tuple[StringTransport, Recording]:
    """``raw`` in one read on a fresh connection: its transport, and what reached the proxy."""
    factory, proxy = recording(**limits)
    protocol, transport = connect(factory)
    protocol.dataReceived(raw)
    return transport, proxy


def close(protocol: FrontProtocol) -> None:
    protocol.connectionLost(Failure(ConnectionDone()))


def frame(*chunks: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks)


# --- the head: its size, its target, the body's framing, malformed requests -----------------------


def test_a_long_request_line_is_414():
    transport, proxy = send(b"GET /" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", max_request_line=200)
    assert refused(transport, 414, "uri_too_long")["message"] == "request line over 200 bytes"


def test_too_many_headers_is_431():
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(5))
    transport, proxy = send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", max_headers=5)
    assert refused(transport, 431, "header_fields_too_large")["message"] == "more than 5 headers"


def test_a_long_header_line_is_431():
    transport, proxy = send(b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"a" * 300 + b"\r\n\r\n", max_header_line=300)
    assert refused(transport, 431, "header_fields_too_large")["message"] == "a header line over 300 bytes"


@pytest.mark.parametrize("count", [5, 20])  # over the total at the fourth header, whatever follows
def test_headers_over_16k_in_all_are_431(count):
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 4096) for i in range(count))
    transport, proxy = send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    error = refused(transport, 431, "header_fields_too_large")
    assert error["message"] == "request headers over 16384 bytes in all" and proxy.targets == []


def test_headers_under_16k_in_all_still_pass():
    few = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 4096) for i in range(3))
    transport, proxy = sent(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + few + b"\r\n")
    assert parse(transport.value())[0].status == 200 and len(proxy.seen) == 1


@pytest.mark.parametrize("line", [b"OPTIONS * HTTP/1.1", b"OPTIONS http://x/ HTTP/1.1", b"GET * HTTP/1.1",
                                  b"GET http://x/v1/models HTTP/1.1", b"POST v1/chat/completions HTTP/1.1"])
def test_a_target_that_is_not_a_path_is_400(line):
    transport, proxy = send(line + b"\r\nHost: x\r\n\r\n")
    refused(transport, 400, "invalid_request_target")
    assert proxy.targets == []


@pytest.mark.parametrize("value, code", [
    *((value, "bad_request") for value in [b"abc", b"-1", b"1.5", b"", b"+5", b"0x10", b"1 2", b"2, 2"]),
    (b"2\r\nContent-Length: 2", "bad_framing"),  # two lengths: which one frames the body?
    (b"3\r\nContent-Length: 2", "bad_framing"),
])
def test_a_bad_or_doubled_content_length_is_400(value, code):
    transport, proxy = send(POST_HEAD + b"Content-Length: " + value + b"\r\n\r\n{}")
    error = refused(transport, 400, code)
    assert "Content-Length" in error["message"]
    assert proxy.targets == []


@pytest.mark.parametrize("headers", [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n",
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
])
def test_ambiguous_body_framing_is_400(headers):
    transport, proxy = send(POST_HEAD + headers + b"\r\n2\r\n{}\r\n0\r\n\r\n")
    refused(transport, 400, "bad_framing")
    assert proxy.targets == []


@pytest.mark.parametrize("framing, body", [(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
                                           (b"Content-Length: 2\r\n", b"{}")])
def test_one_plain_framing_still_passes(framing, body):
    transport, proxy = sent(POST_HEAD + framing + b"\r\n" + body)
    assert parse(transport.value())[0].status == 200
    assert proxy.seen == [(b"POST", b"/v1/chat/completions", b"{}")]


@pytest.mark.parametrize("raw", [
    b"GET /\x01 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
    POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_any_other_malformed_request_is_a_json_400(raw):
    transport, proxy = send(raw)
    refused(transport, 400, "bad_request")
    assert proxy.targets == []


# --- the body's size ------------------------------------------------------------------------------


def test_a_content_length_over_the_limit_is_413_before_the_body():
    transport, proxy = send(POST_HEAD + b"Content-Length: 5000\r\n\r\n")
    error = refused(transport, 413, "payload_too_large")
    assert error["message"] == "request body of 5000 bytes is over the 1000-byte limit"
    assert proxy.targets == []


@pytest.mark.parametrize("digits", [19, 25, 5000])  # 19 fit in 64 bits, more do not
def test_a_content_length_too_long_for_int_is_413_not_a_crash(digits):
    transport, proxy = send(POST_HEAD + b"Content-Length: " + b"9" * digits + b"\r\n\r\n")
    refused(transport, 413, "payload_too_large")
    assert proxy.targets == []


def test_a_chunked_body_over_the_limit_is_413():
    transport, proxy = send(POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + frame(b"x" * 600, b"y" * 600))
    refused(transport, 413, "payload_too_large")
    assert proxy.targets == []


# --- time-outs, checked by the sweep --------------------------------------------------------------


def test_headers_not_in_within_the_header_timeout_are_408():
    factory = server(header_timeout=10)
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n")
    factory.clock.advance(9.6)
    assert transport.value() == b"" and not transport.disconnecting
    factory.clock.advance(0.5)
    error = refused(transport, 408, "request_timeout")
    assert error["message"] == "request headers not received within 10 s"
    assert factory.incomplete == {}


def test_a_stalled_body_is_408_and_each_byte_restarts_its_clock():
    factory = server(body_timeout=30, body_min_rate=0)  # the stall alone
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Content-Length: 900\r\n\r\n")
    for _ in range(5):  # minutes in all, never 30 s without a byte
        factory.clock.advance(29)
        protocol.dataReceived(b"x")
    assert transport.value() == b"" and not transport.disconnecting
    factory.clock.advance(29.6)
    assert transport.value() == b""
    factory.clock.advance(0.5)
    error = refused(transport, 408, "request_timeout")
    assert error["message"] == "request body stalled: no data for 30 s"
    assert factory.gateway.proxy.targets == [] and factory.incomplete == {}


def test_a_body_trickled_a_byte_every_5_s_is_408_once_its_time_is_spent():
    factory = server(body_timeout=30)  # and the default floor: 1 s more per 500 bytes
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Content-Length: 900\r\n\r\n")
    for _ in range(6):  # never 30 s without a byte
        factory.clock.advance(5)
        protocol.dataReceived(b"x")
    assert transport.value() == b""
    factory.clock.advance(0.5)  # 30 s + 6 bytes' worth (0.012 s) are spent
    error = refused(transport, 408, "request_timeout")
    assert error["message"] == "request body too slow: 6 bytes in 30 s (a body gets 30 s plus 1 s per 500 bytes)"
    assert factory.gateway.proxy.targets == [] and factory.incomplete == {}


def test_a_body_that_keeps_its_rate_may_take_longer_than_the_body_timeout():
    factory = server(body_timeout=30, body_min_rate=10)
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Content-Length: 614\r\n\r\n{\"prompt\": \"")
    for _ in range(6):  # 100 bytes every 9 s: 10 s more each time
        factory.clock.advance(9)
        protocol.dataReceived(b"x" * 100)
    factory.clock.advance(9)
    protocol.dataReceived(b'"}')
    assert parse(transport.value())[0].status == 200 and len(factory.gateway.proxy.targets) == 1


def test_a_complete_body_leaves_no_deadline_behind():
    factory = server(body_timeout=30)
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Content-Length: 2\r\n\r\n{}")
    answered = transport.value()
    assert parse(answered)[0].status == 200
    factory.clock.advance(60)  # past the body's deadlines, short of the idle time-out: no 408 may follow
    assert transport.value() == answered and not transport.disconnecting


def test_an_idle_kept_alive_connection_is_closed_quietly_after_75_s():
    factory = server()
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\n\r\n")
    answered = transport.value()
    factory.clock.advance(74.5)
    assert not transport.disconnecting
    factory.clock.advance(1)
    assert transport.disconnecting and transport.value() == answered  # closed, no 408 written


def test_no_408_while_a_request_is_being_answered():
    gateway = make_gateway()
    gateway.proxy = proxy = PendingProxy()
    factory = server(gateway)
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Content-Length: 2\r\n\r\n{}")
    factory.clock.advance(300)  # past every deadline
    assert transport.value() == b"" and not transport.disconnecting
    proxy.answer()
    [response] = parse(transport.value())
    assert (response.status, response.body) == (200, PROXIED) and not transport.disconnecting


# --- the API key, checked before the body -----------------------------------------------------------


def keyed(tmp_path, rate: str = "", origins: tuple[str, ...] = ()) -> tuple[FrontFactory, Gateway, Auth]:
    """The front of a gateway whose keys file holds alice's key (``rate``: ``":N"`` requests a minute)."""
    path = tmp_path / "api_keys"
    path.write_text(f"alice:{KEY}{rate}\n")
    auth = Auth(True, str(path), False, Clock())
    gateway = make_gateway(auth=auth, cors=Cors(origins))
    return server(gateway), gateway, auth


WITH_KEY = f"Authorization: Bearer {KEY}\r\n".encode()


@pytest.mark.parametrize("key", [b"", b"Authorization: Bearer wrong-key-wrong-key-1\r\n"])
def test_a_body_without_a_valid_key_is_401_before_it_arrives(tmp_path, key):
    factory, gateway, auth = keyed(tmp_path)
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + key + b"Content-Length: 1000\r\n\r\n")  # not one body byte
    error = refused(transport, 401, "invalid_api_key")
    assert error["param"] == "authorization"
    assert parse(transport.value())[0].headers[b"www-authenticate"] == b'Bearer realm="llamad"'
    assert gateway.proxy.targets == [] and factory.incomplete == {}


def test_the_early_401_is_the_guards_own_answer(tmp_path):
    factory, gateway, auth = keyed(tmp_path)
    early_protocol, early = connect(factory)
    early_protocol.dataReceived(POST_HEAD + b"Content-Length: 2\r\n\r\n")
    late_protocol, late = connect(factory, port=40001)
    late_protocol.dataReceived(GET_MODELS)  # no body: the guard answers the whole request
    (early_status, early_headers, early_body), (late_status, late_headers, late_body) = answer(early), answer(late)
    assert (early_status, early_body) == (late_status, late_body)
    assert early_headers[b"www-authenticate"] == late_headers[b"www-authenticate"]


def test_the_early_check_takes_no_rate_limit_slot(tmp_path):
    factory, gateway, auth = keyed(tmp_path, rate=":1")
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + WITH_KEY + b"Content-Length: 2\r\n\r\n")
    assert transport.value() == b""  # the key is good: the body is awaited
    protocol.dataReceived(b"{}")
    assert parse(transport.value())[0].status == 200 and len(gateway.proxy.targets) == 1
    assert len(auth.store.windows["alice"]) == 1  # counted once, by the guard
    second, transport = connect(factory, port=40001)
    second.dataReceived(POST_HEAD + WITH_KEY + b"Content-Length: 2\r\n\r\n")
    got, headers, body = answer(transport)  # over the limit: known before the body, still not counted
    assert got == 429 and headers[b"retry-after"] and len(auth.store.windows["alice"]) == 1


def test_the_early_check_leaves_public_paths_and_preflights_alone(tmp_path):
    factory, gateway, auth = keyed(tmp_path, origins=("https://a.example",))
    protocol, transport = connect(factory)
    protocol.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b""  # no key needed: no early answer
    protocol.dataReceived(b"{}")
    assert parse(transport.value())[0].status == 200
    protocol, transport = connect(factory, port=40001)
    protocol.dataReceived(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: https://a.example\r\n"
                          b"Access-Control-Request-Method: POST\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b""
    protocol.dataReceived(b"{}")
    assert transport.value().startswith(b"HTTP/1.1 204 ")
    assert gateway.proxy.targets == []


def test_the_early_401_carries_cors_headers(tmp_path):
    factory, gateway, auth = keyed(tmp_path, origins=("https://a.example",))
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Origin: https://a.example\r\nContent-Length: 2\r\n\r\n")
    got, headers, body = answer(transport)
    assert got == 401 and headers[b"access-control-allow-origin"] == b"https://a.example"


def test_api_factory_takes_its_limits_and_asks_the_gateways_guard_before_a_body(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(f"alice:{KEY}\n")
    gateway = make_gateway(auth=Auth(True, str(path), False, Clock()))
    factory = api_factory(gateway, 1000, 10, body_timeout=5, max_incomplete_per_client=3, body_min_rate=7)
    assert (factory.max_body_bytes, factory.header_timeout, factory.body_timeout, factory.max_incomplete_per_client,
            factory.body_min_rate, factory.clock) == (1000, 10, 5, 3, 7, gateway.clock)
    protocol, transport = connect(factory)
    protocol.dataReceived(POST_HEAD + b"Content-Length: 1000\r\n\r\n")
    assert answer(transport)[0] == 401 and gateway.proxy.targets == []


# --- requests still arriving, per client ----------------------------------------------------------


def test_a_client_with_too_many_requests_arriving_gets_429_and_the_count_drops():
    factory = server(max_incomplete_per_client=2)
    first, _ = connect(factory, port=1)
    second, _ = connect(factory, port=2)
    first.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    second.dataReceived(POST_HEAD + b"Content-Length: 10\r\n\r\n{")
    third, transport = connect(factory, port=3)
    third.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    error = refused(transport, 429, "too_many_incomplete_requests")
    assert error["message"] == "more than 2 requests from this client are still arriving"
    other, transport = connect(factory, host="10.0.0.2")
    other.dataReceived(GET_MODELS)  # another client is not held to this one's count
    assert parse(transport.value())[0].status == 200
    assert factory.incomplete == {"10.0.0.1": 2}
    first.dataReceived(b"Host: x\r\n\r\n")  # its request is in: the client has room again
    assert factory.incomplete == {"10.0.0.1": 1}
    fourth, transport = connect(factory, port=4)
    fourth.dataReceived(GET_MODELS)
    assert parse(transport.value())[0].status == 200
    close(second)  # gone with its body half sent
    assert factory.incomplete == {}


def test_zero_means_no_limit_and_a_unix_socket_is_not_counted():
    factory = server(max_incomplete_per_client=0)
    connections = [connect(factory, port=port) for port in range(100)]
    for protocol, _ in connections:
        protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    assert factory.incomplete == {} and not any(transport.disconnecting for _, transport in connections)
    factory = server(max_incomplete_per_client=1)
    transports = []
    for _ in range(5):
        protocol = factory.buildProtocol(UNIXAddress(b"/run/llamad.sock"))
        transport = StringTransport(peerAddress=UNIXAddress(None))
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
        transports.append(transport)
    assert factory.incomplete == {} and not any(transport.disconnecting for transport in transports)


FATES = {
    "answered": [GET_MODELS],
    "pipelined": [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\n"],
    "head cut": [b"GET /v1/models HTTP/1.1\r\nHost: "],
    "body cut": [POST_HEAD + b"Content-Length: 10\r\n\r\n{"],
    "answered, then a head cut": [GET_MODELS, b"GET /v1/mo"],
    "chunked cut": [POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{"],
    "headers too slow": [b"GET /v1/models HTTP/1.1\r\n", 10.5],  # the sweep finds it at most 0.5 s late
    "body too slow": [POST_HEAD + b"Content-Length: 10\r\n\r\n{", 30.5],
    "413": [POST_HEAD + b"Content-Length: 5000\r\n\r\n"],
    "431": [b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 4096) for i in range(5))],
    "bad framing": [POST_HEAD + b"Transfer-Encoding: identity\r\n\r\n"],
    "malformed": [b"GET / HTTP/9.9\r\n\r\n"],
    "bad target": [b"OPTIONS * HTTP/1.1\r\n\r\n"],
    "connected, silent": [],
    "keep-alive ping": [b"\r\n"],
}


@pytest.mark.parametrize("limit", [8, 64])  # 8: above what one round leaves arriving, below a leak
def test_incomplete_request_counts_never_leak(limit):
    factory, proxy = recording(max_incomplete_per_client=limit, body_timeout=30, header_timeout=10)
    for round_ in range(20):
        protocols = []
        for port, steps in enumerate(FATES.values()):
            protocol, transport = connect(factory, port=port)
            protocols.append(protocol)
            for step in steps:
                if isinstance(step, float):
                    factory.clock.advance(step)
                elif not transport.disconnecting:
                    protocol.dataReceived(step)
            assert b"too_many_incomplete_requests" not in transport.value(), (round_, port)
            assert sum(factory.incomplete.values()) <= limit
        for protocol in protocols:
            close(protocol)
        assert factory.incomplete == {}, round_
    assert proxy.seen and all(uri.startswith(b"/") for _, uri, _ in proxy.seen)
