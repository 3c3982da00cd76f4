"""Activity and idle policy, driven by Clock: only inference counts, and the timer restarts when it ends."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet.task import Clock
from wire import POST_HEAD, build, connect, json_of, read_chunked, server

from llamad.activity import Activity, IdleWatch


def watch(timeout: float = 10, result: bool = True):
    clock = Clock()
    activity = Activity(clock)
    fired: list[float] = []

    def on_idle() -> bool:
        fired.append(clock.seconds())
        return result

    idle = IdleWatch(clock, activity, timeout, on_idle)
    idle.startService()
    return clock, activity, idle, fired


def test_idle_fires_timeout_after_boot_without_traffic():
    clock, activity, idle, fired = watch()
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [10]
    clock.advance(100)
    assert fired == [10]  # once, until activity ends again


def test_timer_restarts_when_activity_ends_not_when_it_begins():
    clock, activity, idle, fired = watch()
    clock.advance(5)
    activity.begin(True)
    clock.advance(30)  # a long request: never idle while in flight
    assert fired == []
    activity.end(True)
    clock.advance(9.9)
    assert fired == []
    clock.advance(0.1)
    assert fired == [45]


def test_overlapping_requests_keep_it_busy_until_the_last_ends():
    clock, activity, idle, fired = watch()
    activity.begin(True)
    activity.begin(True)
    activity.end(True)
    clock.advance(20)
    assert fired == [] and activity.idle_seconds() == 0
    activity.end(True)
    clock.advance(4)
    assert activity.idle_seconds() == 4
    clock.advance(6)
    assert fired == [30]


def test_one_timer_serves_a_stream_of_requests():
    clock, activity, idle, fired = watch()
    for _ in range(50):  # a request every 0.1 s for 5 s: the countdown is never set and cancelled per request
        activity.begin(True)
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(0.05)
        activity.end(True)
        assert len(clock.getDelayedCalls()) == 1
        clock.advance(0.05)
    last_end = clock.seconds() - 0.05
    clock.advance(last_end + 10 - clock.seconds() - 0.01)
    assert fired == []
    clock.advance(0.01)
    assert fired == [last_end + 10]  # still exactly timeout after the last request ended


def test_monitoring_requests_never_touch_the_timer():
    clock, activity, idle, fired = watch()
    clock.advance(6)
    for _ in range(50):
        activity.begin(False)  # /v1/models, /props, /slots ...
        activity.end(False)
    assert activity.last_activity == 0
    clock.advance(4)
    assert fired == [10]


def test_not_ready_to_act_means_try_again_later():
    clock, activity, idle, fired = watch(result=False)
    clock.advance(10)
    clock.advance(10)
    assert fired == [10, 20]


def test_zero_timeout_never_fires():
    clock, activity, idle, fired = watch(timeout=0)
    clock.advance(1e6)
    assert fired == []


def test_drained_waits_for_every_request():
    clock = Clock()
    activity = Activity(clock)
    activity.begin(False)
    activity.begin(True)
    done = activity.drained()
    activity.end(True)
    assert not done.called
    activity.end(False)
    assert done.called


# --- through the API -------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_model_list_comes_from_the_config_while_unloaded():
    from llamad.supervisor import State

    http, clock, backend, status, metrics, proxy = build(State.STOPPED, lazy=True)
    response = await http.get("http://x/v1/models")
    assert response.code == 200
    assert [m["id"] for m in (await json_of(response))["data"]] == ["demo"]
    assert backend.start_requests == 0 and proxy.targets == []


@pytest_twisted.ensureDeferred
async def test_cold_start_header_on_a_request_that_waited():
    from llamad.supervisor import State

    http, clock, backend, status, metrics, proxy = build(State.STOPPED, lazy=True)
    pending = http.post("http://x/v1/completions", data=b'{"prompt": "a"}')
    clock.advance(1.5)
    backend.state = State.READY
    backend.waiters[0].callback(None)
    http.flush()
    response = await pending
    assert response.code == 200
    assert response.headers.getRawHeaders(b"x-llamad-cold-start") == [b"1.500"]
    assert backend.start_requests == 1


@pytest_twisted.ensureDeferred
async def test_waiting_stream_gets_loading_comments_then_the_events():
    from llamad.supervisor import State

    http, clock, backend, status, metrics, proxy = build(State.STOPPED, lazy=True, wait=60)
    pending = http.post("http://x/v1/chat/completions", data=json.dumps({"stream": True, "messages": []}))
    clock.advance(3)
    clock.advance(3)
    backend.state = State.READY
    backend.waiters[0].callback(None)
    http.flush()
    response = await pending
    assert response.code == 200 and response.headers.getRawHeaders(b"content-type") == [b"text/event-stream"]
    body = await response.content()
    assert body.startswith(b": loading\n\n: loading\n\n: cold-start 6.000\n\n")
    assert body.endswith(b'{"proxied": true}')


@pytest_twisted.ensureDeferred
async def test_start_failure_after_the_stream_started_is_an_sse_error_event():
    from llamad.supervisor import State, StartFailed

    http, clock, backend, status, metrics, proxy = build(State.STOPPED, lazy=True, wait=60)
    pending = http.post("http://x/v1/chat/completions", data=json.dumps({"stream": True, "messages": []}))
    clock.advance(3)
    backend.waiters[0].errback(StartFailed("model file is corrupt"))
    http.flush()
    response = await pending
    body = await response.content()
    assert response.code == 200 and body.startswith(b": loading\n\n")
    event = json.loads(body.split(b"data: ", 1)[1])
    assert event["error"]["message"] == "backend start failed: model file is corrupt"
    assert proxy.targets == []


def test_a_stream_that_leaves_during_a_cold_start_stops_its_loading_comments():
    from twisted.internet.error import ConnectionDone
    from twisted.internet.task import LoopingCall
    from twisted.python.failure import Failure

    from llamad.supervisor import State

    http, clock, backend, status, metrics, proxy = build(State.STOPPED, lazy=True, wait=60)

    def timers() -> list:
        """What is due on the clock, but the fronts' sweeps."""
        return [call for call in clock.getDelayedCalls() if not isinstance(call.func, LoopingCall)]

    protocol, transport = connect(server(http.gateway))
    body = json.dumps({"stream": True, "messages": []}).encode()
    protocol.dataReceived(POST_HEAD + b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    clock.advance(3)
    head, _, written = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and read_chunked(written + b"0\r\n\r\n")[0] == b": loading\n\n"
    assert len(timers()) == 2  # the next comment, and the wait's time-out
    protocol.connectionLost(Failure(ConnectionDone()))  # the client goes away
    assert timers() == []
    clock.advance(30)
    assert transport.value().partition(b"\r\n\r\n")[2] == written  # no more comments to nobody
    assert backend.start_requests == 1 and backend.waiters == []  # the start goes on; the waiter left
    assert proxy.targets == []
