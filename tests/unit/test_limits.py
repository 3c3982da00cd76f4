"""HTTP-level limits on port 8000, driven byte by byte on an in-memory channel with a fake clock."""

from __future__ import annotations

import pytest
from fakes import FakeBackend, FakeProxy, Recorder
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from wire import KEY, POST_HEAD, answer, make_site, refused, site_connect, site_send

from llamad.activity import Activity
from llamad.gateway.app import Gateway, api_site
from llamad.fleet.gate import Gate
from llamad.gateway.guard import Auth, Cors, GuardResource
from llamad.metrics import Metrics
from llamad.status import Status

pytestmark = pytest.mark.usefixtures("no_tracebacks")  # a logged failure fails the test


def close(channel) -> None:
    channel.connectionLost(Failure(ConnectionDone()))


# --- head size, targets, framing, malformed requests ---------------------------------


def test_request_line_and_headers_over_16k_in_all_are_431():
    many = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 4096) for i in range(20))
    transport, recorder = site_send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    error = refused(transport, 431, "header_fields_too_large")
    assert error["message"] == "request headers over 16384 bytes in all"
    assert recorder.seen == []


def test_headers_under_16k_in_all_still_pass():
    few = b"".join(b"X-H%d: %s\r\n" % (i, b"a" * 4096) for i in range(3))
    transport, recorder = site_send(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + few + b"\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ") and len(recorder.seen) == 1


@pytest.mark.parametrize("line", [b"OPTIONS * HTTP/1.1", b"GET * HTTP/1.1", b"GET http://x/v1/models HTTP/1.1",
                                  b"POST v1/chat/completions HTTP/1.1"])
def test_a_target_that_is_not_a_path_is_400(line):
    transport, recorder = site_send(line + b"\r\nHost: x\r\n\r\n")
    refused(transport, 400, "invalid_request_target")
    assert recorder.seen == []


@pytest.mark.parametrize("value, code", [
    *((value, "bad_request") for value in [b"abc", b"-1", b"1.5", b"", b"+5", b"0x10", b"1 2", b"2, 2"]),
    (b"2\r\nContent-Length: 2", "bad_framing"),  # two lengths: which one frames the body?
    (b"3\r\nContent-Length: 2", "bad_framing"),
])
def test_a_bad_or_doubled_content_length_is_400(value, code):
    transport, recorder = site_send(POST_HEAD + b"Content-Length: " + value + b"\r\n\r\n{}")
    error = refused(transport, 400, code)
    assert "Content-Length" in error["message"]
    assert recorder.seen == []


def test_a_content_length_too_long_for_int_is_413_not_a_crash():
    transport, recorder = site_send(POST_HEAD + b"Content-Length: " + b"9" * 5000 + b"\r\n\r\n")
    refused(transport, 413, "payload_too_large")
    assert recorder.seen == []


@pytest.mark.parametrize("headers", [
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: identity\r\n",
    b"Transfer-Encoding: gzip, chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding: chunked\r\nContent-Length: 2\r\n",
    b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n",
])
def test_ambiguous_body_framing_is_400(headers):
    transport, recorder = site_send(POST_HEAD + headers + b"\r\n2\r\n{}\r\n0\r\n\r\n")
    refused(transport, 400, "bad_framing")
    assert recorder.seen == []


@pytest.mark.parametrize("framing, body", [(b"Transfer-Encoding: chunked\r\n", b"2\r\n{}\r\n0\r\n\r\n"),
                                           (b"Content-Length: 2\r\n", b"{}")])
def test_one_plain_framing_still_passes(framing, body):
    transport, recorder = site_send(POST_HEAD + framing + b"\r\n" + body)
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert recorder.seen == [(b"POST", b"/v1/chat/completions", b"{}")]


@pytest.mark.parametrize("raw", [
    b"GET /\x01 HTTP/1.1\r\n\r\n",
    b"GET / HTTP/1.1 extra\r\n\r\n",
    b"GET / HTTP/2.0\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
    POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
])
def test_any_other_malformed_request_is_a_json_400(raw):
    transport, recorder = site_send(raw)
    refused(transport, 400, "bad_request")
    assert recorder.seen == []


# --- body time-out ---------------------------------------------------------------------


def test_a_stalled_body_is_408_and_each_byte_restarts_the_clock():
    site, recorder, clock = make_site(body_timeout=30, body_min_rate=0)  # the stall alone
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + b"Content-Length: 900\r\n\r\n")
    for _ in range(5):  # minutes in all, never 30 s without a byte
        clock.advance(29)
        channel.dataReceived(b"x")
    assert transport.value() == b"" and not transport.disconnecting
    clock.advance(29.9)
    assert transport.value() == b""
    clock.advance(0.2)
    error = refused(transport, 408, "request_timeout")
    assert error["message"] == "request body stalled: no data for 30 s"
    assert recorder.seen == [] and site.incomplete_requests == {}


def test_a_body_trickled_a_byte_every_5_s_is_408_once_its_time_is_spent():
    site, recorder, clock = make_site(body_timeout=30)  # and the default floor: 1 s more per 500 bytes
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + b"Content-Length: 900\r\n\r\n")
    for _ in range(6):  # never 30 s without a byte
        clock.advance(5)
        channel.dataReceived(b"x")
    assert transport.value() == b""
    clock.advance(0.01)
    assert transport.value() == b""
    clock.advance(0.01)  # 30 s + 6 bytes' worth (0.012 s) are spent
    error = refused(transport, 408, "request_timeout")
    assert error["message"] == "request body too slow: 6 bytes in 30 s (a body gets 30 s plus 1 s per 500 bytes)"
    assert recorder.seen == [] and site.incomplete_requests == {}


def test_a_body_that_keeps_its_rate_may_take_longer_than_the_body_timeout():
    site, recorder, clock = make_site(body_timeout=30, body_min_rate=10)
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + b"Content-Length: 614\r\n\r\n{\"prompt\": \"")
    for _ in range(6):  # 100 bytes every 9 s: 10 s more each time
        clock.advance(9)
        channel.dataReceived(b"x" * 100)
    clock.advance(9)
    channel.dataReceived(b'"}')
    assert transport.value().startswith(b"HTTP/1.1 200 ") and len(recorder.seen) == 1


def test_a_complete_body_leaves_no_timer_behind():
    site, recorder, clock = make_site(body_timeout=30)
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + b"Content-Length: 2\r\n\r\n{}")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    clock.advance(60)  # the idle timeout is longer; no 408 may follow the answer
    assert b"408" not in transport.value() and not transport.disconnecting


# --- the key, checked before the body ------------------------------------------------------


def keyed_guard(tmp_path, rate: str = "", origins: tuple[str, ...] = ()):
    path = tmp_path / "api_keys"
    path.write_text(f"alice:{KEY}{rate}\n")
    recorder = Recorder()
    auth = Auth(True, str(path), False, Clock())
    guard = GuardResource(recorder, auth, Cors(origins), lambda request, code: None,
                          {b"/ping": frozenset({b"GET", b"HEAD"})}, recorder.render)
    site, _, clock = make_site(guard, early_check=guard.early_refusal)
    return site, recorder, auth


@pytest.mark.parametrize("key", [b"", b"Authorization: Bearer wrong-key-wrong-key-1\r\n"])
def test_a_body_without_a_valid_key_is_401_before_the_body_arrives(tmp_path, key):
    site, recorder, auth = keyed_guard(tmp_path)
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + key + b"Content-Length: 1000\r\n\r\n")
    got, headers, body = answer(transport)
    assert got == 401 and headers[b"www-authenticate"] == b'Bearer realm="llamad"'
    assert body["error"]["param"] == "authorization" and body["error"]["code"] == "invalid_api_key"
    assert transport.disconnecting and recorder.seen == [] and site.incomplete_requests == {}


def test_the_early_401_is_the_guards_own_answer(tmp_path):
    site, recorder, auth = keyed_guard(tmp_path)
    early_channel, early = site_connect(site)
    early_channel.dataReceived(POST_HEAD + b"Content-Length: 2\r\n\r\n")
    late_channel, late = site_connect(site, port=40001)
    late_channel.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # no body: the guard answers
    (early_status, early_headers, early_body), (late_status, late_headers, late_body) = answer(early), answer(late)
    assert (early_status, early_body) == (late_status, late_body)
    assert early_headers[b"www-authenticate"] == late_headers[b"www-authenticate"]


def test_the_early_check_takes_no_rate_limit_slot(tmp_path):
    site, recorder, auth = keyed_guard(tmp_path, rate=":1")
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + f"Authorization: Bearer {KEY}\r\n".encode() + b"Content-Length: 2\r\n\r\n")
    assert transport.value() == b""  # the key is good: the body is awaited
    channel.dataReceived(b"{}")
    assert transport.value().startswith(b"HTTP/1.1 200 ") and len(recorder.seen) == 1
    assert len(auth.store.windows["alice"]) == 1  # counted once, by the guard
    second, transport = site_connect(site, port=40001)
    second.dataReceived(POST_HEAD + f"Authorization: Bearer {KEY}\r\n".encode() + b"Content-Length: 2\r\n\r\n")
    got, headers, body = answer(transport)  # over the limit: known before the body, still not counted
    assert got == 429 and headers[b"retry-after"] and len(auth.store.windows["alice"]) == 1


def test_the_early_check_leaves_public_paths_and_preflights_alone(tmp_path):
    site, recorder, auth = keyed_guard(tmp_path, origins=("https://a.example",))
    channel, transport = site_connect(site)
    channel.dataReceived(b"GET /ping HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b""  # no key needed: no early answer
    channel.dataReceived(b"{}")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    channel, transport = site_connect(site, port=40001)
    channel.dataReceived(b"OPTIONS /v1/chat/completions HTTP/1.1\r\nHost: x\r\nOrigin: https://a.example\r\n"
                         b"Access-Control-Request-Method: POST\r\nContent-Length: 2\r\n\r\n")
    assert transport.value() == b""
    channel.dataReceived(b"{}")
    assert transport.value().startswith(b"HTTP/1.1 204 ")


def test_the_early_401_carries_cors_headers(tmp_path):
    site, recorder, auth = keyed_guard(tmp_path, origins=("https://a.example",))
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + b"Origin: https://a.example\r\nContent-Length: 2\r\n\r\n")
    got, headers, body = answer(transport)
    assert got == 401 and headers[b"access-control-allow-origin"] == b"https://a.example"


def test_api_site_asks_the_gateways_guard_before_a_body(tmp_path):
    path = tmp_path / "api_keys"
    path.write_text(f"alice:{KEY}\n")
    clock = Clock()
    backend = FakeBackend()
    status = Status(clock, backend, "demo", lazy=False)
    metrics = Metrics()
    proxy = FakeProxy()
    gate = Gate(clock, status, backend, 4, 8, 10, metrics)
    gateway = Gateway(clock, status, gate, proxy, metrics, Activity(clock), Auth(True, str(path), False, clock))
    site = api_site(gateway, 1000, 10, body_timeout=5, max_incomplete_per_client=3)
    site.reactor = clock
    assert (site.protocol.body_timeout, site.protocol.max_incomplete_per_client) == (5, 3)
    channel, transport = site_connect(site)
    channel.dataReceived(POST_HEAD + b"Content-Length: 1000\r\n\r\n")
    assert answer(transport)[0] == 401 and proxy.targets == []


# --- requests still arriving, per client ----------------------------------------------------


def test_a_client_with_too_many_requests_arriving_gets_429(tmp_path):
    site, recorder, clock = make_site(max_incomplete_per_client=2)
    first, _ = site_connect(site, port=1)
    second, _ = site_connect(site, port=2)
    first.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    second.dataReceived(POST_HEAD + b"Content-Length: 10\r\n\r\n{")
    third, transport = site_connect(site, port=3)
    third.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    error = refused(transport, 429, "too_many_incomplete_requests")
    assert error["message"] == "more than 2 requests from this client are still arriving"
    other, transport = site_connect(site, host="10.0.0.2")
    other.dataReceived(b"GET /v1/models HTTP/1.1\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")
    assert site.incomplete_requests == {"10.0.0.1": 2}
    first.dataReceived(b"Host: x\r\n\r\n")  # its request is in: the client has room again
    assert site.incomplete_requests == {"10.0.0.1": 1}
    fourth, transport = site_connect(site, port=4)
    fourth.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 ")


def test_zero_means_no_limit_and_a_unix_socket_is_not_counted():
    site, recorder, clock = make_site(max_incomplete_per_client=0)
    channels = [site_connect(site, port=port)[0] for port in range(100)]
    for channel in channels:
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    assert site.incomplete_requests == {} and not any(c.transport.disconnecting for c in channels)
    site, recorder, clock = make_site(max_incomplete_per_client=1)
    channels = [site_connect(site, host="")[0] for _ in range(5)]
    for channel in channels:
        channel.dataReceived(b"GET /v1/models HTTP/1.1\r\n")
    assert site.incomplete_requests == {} and not any(c.transport.disconnecting for c in channels)


FATES = {
    "answered": [b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"],
    "pipelined": [b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nGET /c HTTP/1.1\r\n"],
    "head cut": [b"GET /v1/models HTTP/1.1\r\nHost: "],
    "body cut": [POST_HEAD + b"Content-Length: 10\r\n\r\n{"],
    "answered, then a head cut": [b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /v1/mo"],
    "chunked cut": [POST_HEAD + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{"],
    "headers too slow": [b"GET /v1/models HTTP/1.1\r\n", 10.0],
    "body too slow": [POST_HEAD + b"Content-Length: 10\r\n\r\n{", 30.0],
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
    site, recorder, clock = make_site(max_incomplete_per_client=limit, body_timeout=30, header_timeout=10)
    for round_ in range(20):
        channels = []
        for port, steps in enumerate(FATES.values()):
            channel, transport = site_connect(site, port=port)
            channels.append(channel)
            for step in steps:
                if isinstance(step, float):
                    clock.advance(step)
                elif not transport.disconnecting:
                    channel.dataReceived(step)
            assert b"too_many_incomplete_requests" not in transport.value(), (round_, port)
            assert sum(site.incomplete_requests.values()) <= limit
        for channel in channels:
            close(channel)
        assert site.incomplete_requests == {}, round_
    assert recorder.seen and all(uri.startswith(b"/") for _, uri, _ in recorder.seen)


@pytest.mark.parametrize("target", [b"/v1/chat/completions#", b"/v1/completions#frag", b"/props?model=a#x"])
def test_api_site_refuses_a_target_with_a_fragment(target):
    clock = Clock()
    backend = FakeBackend()
    status = Status(clock, backend, "demo", lazy=False)
    metrics = Metrics()
    proxy = FakeProxy()
    gateway = Gateway(clock, status, Gate(clock, status, backend, 4, 8, 10, metrics), proxy, metrics, Activity(clock))
    site = api_site(gateway, 1000)
    site.reactor = clock
    channel, transport = site_connect(site)
    channel.dataReceived(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}" % target)
    got, headers, body = answer(transport)
    assert (got, body["error"]["code"]) == (400, "invalid_request_target") and "fragment" in body["error"]["message"]
    assert proxy.targets == []
