"""The streaming relay between a client request and the child.

Each chunk from the child is written to the client as it arrives.  The child
connection's transport is registered as the request's streaming producer, so a
slow client pauses the read from the child.  Cancelling the relay that
:meth:`Proxy.relay` returns (the client went away) closes the child
connection, which makes llama.cpp free the slot.  The relay tells its
:class:`RelayOwner` how it ended with plain calls: no Deferred per request.

An error answer from the child with a JSON body (llama-server's own shape, a
numeric ``code``) is the one response held whole: it is small, and it is
answered in llamad's error shape (:func:`~llamad.errors.backend_error_body`).
"""

from __future__ import annotations

import json
import typing
from typing import Callable
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest

from llamad.backends import Target
from llamad.gateway import headers as header_rules
from llamad.errors import ApiError, backend_error_body, sse_error_event
from llamad.gateway.upstream import Exchange, UpstreamPool, dechunk, fetch

log = Logger(namespace="llamad.proxy")

MAX_POOLS = 4  # the child's port changes on restart; old pools are dropped
SWEEP_INTERVAL = 0.5  # seconds between checks of the relays still waiting for the child's answer
MAX_HELD = 1 << 20  # bytes of chunks held for a whole SSE event; past it the stream is passed on as it came
MAX_ERROR_BODY = 1 << 16  # bytes of a child's JSON error held to reshape it; a larger one is a 502


class Tap(typing.Protocol):
    """Sees the body on its way to the client and may hold back or drop bytes."""

    strip: bool  # it may drop bytes: it must see whole events

    def feed(self, data: bytes) -> bytes: ...

    def passes(self, framed: bytes) -> bool:
        """Whether whole chunks go to the client as they are (then they count as seen), else call ``feed``."""

    def finish(self) -> bytes: ...

    def keep_all(self) -> bytes:
        """Drop nothing from here on (the stream cannot be cut into events); returns what it held back."""


class RelayOwner(typing.Protocol):
    """Told once how a relay ended."""

    def relayed(self) -> None:
        """The response is written (or, once started, ended as well as its kind allows)."""

    def not_relayed(self, failure: Failure) -> None:
        """No response was started: an :class:`ApiError` (502, 504, 503), :class:`NotDelivered`, or
        ``CancelledError`` when the client went away."""


class NotDelivered(ApiError):
    """The backend could not be reached: not one byte of the request got to it, so it may be sent again."""


class Unanswered(ApiError):
    """The backend took the request and closed the connection before any response byte: a child
    that was dying (an inference request has no effect a client sees until it is answered)."""


class _Upstream:
    """A parsed backend origin and its connection pool."""

    def __init__(self, origin: bytes, reactor: IReactorTCP, clock: IReactorTime, max_idle: int) -> None:
        url = urlsplit(origin.decode())
        if url.scheme != "http" or url.hostname is None:
            raise ValueError(f"unsupported backend URL {origin.decode()!r} (http://host:port only)")
        port = url.port or 80
        self.prefix = url.path.rstrip("/").encode()
        self.host_header = b"Host: " + url.netloc.encode()
        self.pool = UpstreamPool(reactor, clock, url.hostname, port, max_idle)


class Relay:
    """Receives the child's response and writes it to the client request."""

    # Defaults kept on the class: a relay sets only what differs (one is made per request).
    deadline = 0.0  # when the child must have started answering (0: no limit); the proxy's sweep looks
    ended = False
    started = False
    tap: Tap | None = None
    error_body: list[bytes] | None = None  # a child's error: an SSE event (sse_started), else reshaped JSON
    error_status = 0
    error_size = 0
    error_framed = False  # held as the child's chunks came
    producer: IPushProducer | None = None
    exchange: Exchange | None = None
    held: list[bytes] | None = None  # chunks up to the next chunk boundary, while whole ones are needed
    held_size = 0  # their data bytes
    held_bytes = 0

    def __init__(self, request: IRequest, owner: RelayOwner, first_byte: Callable[[], None] | None,
                 tap_for: Callable[[bool], Tap] | None, sse_started: bool, active: set[Relay] | None = None) -> None:
        """``active``: the proxy's relays in flight, which this one leaves at its end."""
        self.request = request
        self.owner = owner
        self.active = active
        self.first_byte = first_byte
        self.tap_for = tap_for
        self.sse_started = sse_started  # an SSE response llamad already started (cold start)
        self.sse = sse_started
        # The front's request takes the child's chunks as they came: no decoding, no re-framing.
        self.framed = getattr(request, "passes_chunks", False)

    def response_started(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]],
                         length: int | None, producer: IPushProducer) -> None:
        if self.ended:
            return
        self.started = True
        request = self.request
        if self.sse_started:
            # Status and headers are out already: a child error becomes one SSE error event.
            if status != 200:
                self.error_body = []
            elif self.tap_for is not None:
                self.tap = self.tap_for(True)
            self.producer = producer
            request.registerProducer(producer, True)
            return
        request.setResponseCode(status, reason or None)
        content_type = b""
        keep_length = True
        add = request.responseHeaders.addRawHeader
        for lower, name, value in header_rules.to_client(headers):
            if lower == b"content-type":
                content_type = value
            elif lower == b"content-length":
                continue  # set below, unless a tap may change the body
            add(name, value)
        if status >= 400 and self._reshapes(content_type):
            self.error_body, self.error_status = [], status  # its Content-Length is set at the end
            self.producer = producer
            request.registerProducer(producer, True)
            return
        self.sse = content_type.startswith(b"text/event-stream")
        if self.tap_for is not None:
            self.tap = self.tap_for(self.sse)
            keep_length = not self.sse
        if length is not None and keep_length:
            request.responseHeaders.addRawHeader(b"content-length", b"%d" % length)  # the child's was not copied
        self.producer = producer
        request.registerProducer(producer, True)

    def _reshapes(self, content_type: bytes) -> bool:
        """Whether an error answer is held whole to be answered in llamad's shape: one with a JSON body."""
        return b"json" in content_type.lower() and self.request.method != b"HEAD"

    def body(self, data: bytes) -> None:
        if self.ended:
            return
        if self.error_body is not None:
            self._hold_error(data)
            return
        if self.tap is not None:
            data = self.tap.feed(data)
            if not data:
                return
        self._first_byte()
        self.request.write(data)

    def _first_byte(self) -> None:
        if self.first_byte is not None:
            self.first_byte()
            self.first_byte = None

    def chunks(self, framed: bytes, whole: bool, size: int, last: bool = False) -> None:
        """Pass the child's chunks on unchanged.  Where the tap may drop an event (or a child's error
        becomes an SSE event) they are held up to a chunk boundary, and chunks the tap must change are
        decoded, fed, and what is left written as one chunk of its own.  A child's JSON error is held
        whole."""
        if self.ended:
            return
        if self.error_body is not None:
            if not self.sse_started:
                self.error_framed = True
                self._hold_error(framed)
                return
            needs_whole = True
        else:
            needs_whole = self.tap is not None and self.tap.strip
        if self.held or (needs_whole and not whole and not last):
            if self.held is None:
                self.held = []
            self.held.append(framed)
            self.held_size += size
            self.held_bytes += len(framed)
            if not whole and not last:
                if self.held_bytes <= MAX_HELD or self.error_body is not None:
                    return
                rest = self.tap.keep_all() if self.tap is not None else b""  # no event end in sight
                if rest:
                    self.request.write(rest)
            framed, size = b"".join(self.held), self.held_size
            self.held, self.held_size, self.held_bytes = None, 0, 0
        if self.error_body is None and (self.tap is None or self.tap.passes(framed)):
            self._first_byte()
            self.request.write_framed(framed, size, last)
        else:
            self.body(dechunk(framed))

    def finished(self) -> None:
        if self.ended:
            return
        if self.error_body is not None:
            if self.sse_started:
                self.request.write(sse_error_event(_error_message(b"".join(self.error_body)), "backend_error"))
            else:
                held = b"".join(self.error_body)
                body = backend_error_body(self.error_status, dechunk(held) if self.error_framed else held)
                self.request.setHeader(b"content-length", b"%d" % len(body))
                self._first_byte()
                self.request.write(body)
        self._flush_tap()
        self.request.unregisterProducer()
        self._settle(None)

    def _hold_error(self, data: bytes) -> None:
        """Keep a child's error until its end; one too large to be an error message ends as a 502."""
        assert self.error_body is not None
        self.error_body.append(data)
        self.error_size += len(data)
        if self.error_size > MAX_ERROR_BODY and not self.sse_started:
            if self.exchange is not None:
                self.exchange.cancel()
            self._unsent(ApiError(502, f"backend answered {self.error_status} with an error body over "
                                       f"{MAX_ERROR_BODY} bytes", "backend_error"))

    def _unsent(self, error: ApiError) -> None:
        """End a response of which the client got nothing yet (an error being held) with ``error``."""
        self.request.unregisterProducer()
        self._settle(Failure(error))

    def _settle(self, failure: Failure | None) -> None:
        """The end, told to the owner once.  The exchange, which points back here, is let go: no
        reference cycle is left for the garbage collector per request."""
        self.ended = True
        self.exchange = None
        if self.active is not None:
            self.active.discard(self)
        if failure is None:
            self.owner.relayed()
        else:
            self.owner.not_relayed(failure)

    def _flush_tap(self) -> None:
        if self.tap is not None:
            rest = self.tap.finish()
            if rest:
                self.request.write(rest)

    def failed(self, reason: str, started: bool, sent: bool = True, unanswered: bool = False) -> None:
        if self.ended:
            return
        if not started:
            error = Unanswered if unanswered else NotDelivered if not sent else ApiError
            self._settle(Failure(error(502, f"backend unreachable: {reason}", "backend_unreachable")))
            return
        if self.error_body is not None and not self.sse_started:
            self._unsent(ApiError(502, f"backend error answer broke off: {reason}", "backend_unreachable"))
            return
        log.warn("backend stream broke: {why}", why=reason)
        self._break("backend connection lost mid-stream", "stream_interrupted")

    def cancel(self) -> None:
        """The client went away: close the child's connection (llama.cpp frees the slot)."""
        if self.ended:
            return
        if self.exchange is not None:
            self.exchange.cancel()
        self._settle(Failure(defer.CancelledError()))

    def timed_out(self, seconds: float) -> None:
        if self.ended or self.started:
            return
        if self.exchange is not None:
            self.exchange.cancel()
        self._settle(Failure(ApiError(504, f"backend did not start responding within {seconds:g} s",
                                      "backend_timeout")))

    def cut(self, message: str) -> None:
        """End this exchange now (shutdown after ``api.drain_timeout``)."""
        if self.ended:
            return
        if self.exchange is not None:
            self.exchange.cancel()
        if not self.started:
            self._settle(Failure(ApiError(503, message, "shutting_down", {b"retry-after": b"5"})))
        elif self.error_body is not None and not self.sse_started:
            self._unsent(ApiError(503, message, "shutting_down", {b"retry-after": b"5"}))
        else:
            self._break(message, "shutting_down")

    def _break(self, message: str, code: str) -> None:
        """A started response cannot get a status any more: end it as well as its kind allows."""
        self.request.unregisterProducer()
        channel = getattr(self.request, "channel", None)
        transport = channel.transport if channel is not None else None
        if self.sse:
            # One error event, a proper end of the response, then close: never a second status line.
            self._flush_tap()
            self.request.write(sse_error_event(message, code))
            self.request.finish()
            if transport is not None:
                transport.loseConnection()
        elif transport is not None:
            # No way to say "failed" inside a started plain body: cut the
            # connection so the client sees an incomplete response.
            transport.abortConnection()
        self._settle(None)


def _error_message(body: bytes) -> str:
    """The message of a child's JSON error body, or the body itself."""
    try:
        error = json.loads(body).get("error", {})
        return str(error.get("message", error)) if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        return body.decode("utf-8", "replace")[:500] or "backend error"


class Proxy:
    """Forwards one request to the child and relays its response."""

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, request_timeout: float, max_idle: int = 8) -> None:
        self.reactor = reactor
        self.clock = clock
        self.request_timeout = request_timeout
        self.max_idle = max_idle
        self.upstreams: dict[bytes, _Upstream] = {}
        self.active: set[Relay] = set()
        self.sweeper: IDelayedCall | None = None

    def _sweep(self) -> None:
        """504 for each relay whose child has not started answering by its deadline.  One timer for
        every request in flight, while any waits for its answer: none is set and cancelled per request."""
        self.sweeper = None
        now = self.clock.seconds()
        waiting = False
        for relay in [relay for relay in self.active if not relay.started and relay.deadline]:
            if relay.deadline <= now:
                relay.timed_out(self.request_timeout)
            else:
                waiting = True
        if waiting:
            self.sweeper = self.clock.callLater(SWEEP_INTERVAL, self._sweep)

    def _upstream(self, origin: bytes) -> _Upstream:
        upstream = self.upstreams.get(origin)
        if upstream is None:
            if len(self.upstreams) >= MAX_POOLS:
                for old in list(self.upstreams):
                    self.upstreams.pop(old).pool.close()
            upstream = self.upstreams[origin] = _Upstream(origin, self.reactor, self.clock, self.max_idle)
        return upstream

    def fetch(self, target: Target, path: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        """A small GET on the backend, e.g. its /metrics: (status, body)."""
        return fetch(self._upstream(target.origin).pool, path, target.key, timeout)

    def relay(
        self,
        request: IRequest,
        target: Target,
        body: bytes,
        owner: RelayOwner,
        first_byte: Callable[[], None] | None = None,
        tap_for: Callable[[bool], Tap] | None = None,
        sse_started: bool = False,
        uri: bytes | None = None,
    ) -> Relay:
        """Relay ``request`` to ``target``; ``owner`` is told how it ended.  Cancel the returned relay
        when the client goes away.

        Failures before the response starts are :class:`ApiError` (502, 504).
        ``sse_started``: llamad already sent an SSE response's head (cold start).  ``uri``: the path to
        send, when it is not the client's (``/upstream/<id>/...``).
        """
        upstream = self._upstream(target.origin)
        method = request.method
        lines = [b"%s %s%s HTTP/1.1" % (method, upstream.prefix, request.uri if uri is None else uri),
                 upstream.host_header]
        lines += header_rules.to_backend(request.requestHeaders, target.key)
        if body or method in (b"POST", b"PUT", b"PATCH"):
            lines.append(b"Content-Length: %d" % len(body))
        if b'"stream"' in body:
            # llama-server closes the connection after a streamed response
            # without saying so; ask for that, so the connection is not pooled.
            # (A false match only costs one reconnect.)
            lines.append(b"Connection: close")
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body

        relay = Relay(request, owner, first_byte, tap_for, sse_started, self.active)
        if self.request_timeout > 0:
            relay.deadline = self.clock.seconds() + self.request_timeout
            if self.sweeper is None:
                self.sweeper = self.clock.callLater(SWEEP_INTERVAL, self._sweep)
        self.active.add(relay)
        relay.exchange = upstream.pool.request(data, relay, head_request=method == b"HEAD")
        return relay

    def cut_all(self, message: str) -> int:
        """End every exchange in flight; returns how many there were."""
        relays = list(self.active)
        for relay in relays:
            relay.cut(message)
        return len(relays)
