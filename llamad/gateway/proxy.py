"""The streaming relay between a client request and the child.

Each chunk from the child is written to the client as it arrives.  The child
connection's transport is registered as the request's streaming producer, so a
slow client pauses the read from the child.  Cancelling the Deferred that
:meth:`Proxy.forward` returns (Klein does this when the client goes away)
closes the child connection, which makes llama.cpp free the slot.
"""

from __future__ import annotations

import typing
from typing import Callable

from twisted.internet import defer, error
from twisted.internet.interfaces import IConsumer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import client
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IBodyProducer, IRequest, IResponse, UNKNOWN_LENGTH
from zope.interface import implementer

from llamad.backends import Target
from llamad.gateway import headers as header_rules
from llamad.gateway.errors import ApiError, sse_error_event

log = Logger(namespace="llamad.proxy")

CONNECT_TIMEOUT = 10
# Shorter than llama.cpp's keep-alive (5 s), so a pooled connection is never
# reused just as the child closes it.
POOL_IDLE_SECONDS = 3


@implementer(IBodyProducer)
class BytesProducer:
    """A request body already in memory, written in one go."""

    def __init__(self, body: bytes) -> None:
        self.body = body
        self.length = len(body)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.body)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _NoDelayClientProtocol(client.HTTP11ClientProtocol):
    def connectionMade(self) -> None:
        # The request's head and body go out as separate writes: no Nagle delay.
        self.transport.setTcpNoDelay(True)


class _QuietClientFactory(client._HTTP11ClientFactory):
    noisy = False  # one log line per pooled connection is noise

    def buildProtocol(self, addr: object) -> client.HTTP11ClientProtocol:
        return _NoDelayClientProtocol(self._quiescentCallback)


class _QuietPool(client.HTTPConnectionPool):
    _factory = _QuietClientFactory


def make_agent(reactor: object, max_per_host: int) -> client.Agent:
    """An Agent over a persistent pool sized for the child's slots."""
    pool = _QuietPool(reactor, persistent=True)
    pool.maxPersistentPerHost = max(2, max_per_host)
    pool.cachedConnectionTimeout = POOL_IDLE_SECONDS
    pool.retryAutomatically = True
    return client.Agent(reactor, connectTimeout=CONNECT_TIMEOUT, pool=pool)


class Tap(typing.Protocol):
    """Sees the body on its way to the client and may hold back or drop bytes."""

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class _Relay(Protocol):
    """Writes the child's body to the client, chunk by chunk."""

    def __init__(self, request: IRequest, done: defer.Deferred[None], sse: bool,
                 first_byte: Callable[[], None] | None, tap: Tap | None) -> None:
        self.request = request
        self.done = done
        self.sse = sse
        self.first_byte = first_byte
        self.tap = tap

    def connectionMade(self) -> None:
        self.request.registerProducer(self.transport, True)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        if self.tap is not None:
            data = self.tap.feed(data)
            if not data:
                return
        if self.first_byte is not None:
            self.first_byte()
            self.first_byte = None
        self.request.write(data)

    def connectionLost(self, reason: Failure = defer.CancelledError) -> None:  # type: ignore[assignment]
        if self.done.called:  # the client went away and cancelled us
            return
        self.request.unregisterProducer()
        if self.tap is not None:
            rest = self.tap.finish()
            if rest:
                self.request.write(rest)
        if reason.check(client.ResponseDone, PotentialDataLoss):
            self.done.callback(None)
            return
        log.warn("backend stream broke: {why}", why=reason.getErrorMessage())
        channel = getattr(self.request, "channel", None)
        transport = channel.transport if channel is not None else None
        if self.sse:
            # One error event, a proper end of the response, then close.
            self.request.write(sse_error_event("backend connection lost mid-stream"))
            self.request.finish()
            if transport is not None:
                transport.loseConnection()
        elif transport is not None:
            # No way to say "failed" inside a started plain body: cut the
            # connection so the client sees an incomplete response.
            transport.abortConnection()
        self.done.callback(None)


class Proxy:
    """Forwards one request to the child and relays its response."""

    def __init__(self, agent: client.Agent, clock: IReactorTime, request_timeout: float) -> None:
        self.agent = agent
        self.clock = clock
        self.request_timeout = request_timeout

    def forward(
        self,
        request: IRequest,
        target: Target,
        body: bytes,
        first_byte: Callable[[], None] | None = None,
        tap_for: Callable[[bool], Tap] | None = None,
    ) -> defer.Deferred[None]:
        """Relay ``request`` to ``target``; fires when the response is written.

        Failures before the response starts raise :class:`ApiError` (502, 504).
        """
        relay: list[_Relay] = []
        pending: list[defer.Deferred[IResponse]] = []
        timed_out = [False]

        def cancel(_: defer.Deferred[None]) -> None:
            for d in pending:
                d.cancel()
            for r in relay:
                r.transport.stopProducing()

        result: defer.Deferred[None] = defer.Deferred(cancel)
        out_headers = header_rules.to_backend(request.requestHeaders, target.key)
        if b'"stream"' in body:
            # llama-server closes the connection after a streamed response
            # without saying so; say it for it, so the pool does not offer
            # that connection to the next request.  (A false match only costs
            # one reconnect.)
            out_headers.setRawHeaders(b"connection", [b"close"])
        url = target.origin + request.uri
        producer = BytesProducer(body) if body or request.method in (b"POST", b"PUT", b"PATCH") else None

        def send(retry: bool) -> None:
            d = self.agent.request(request.method, url, out_headers, producer)
            pending[:] = [d]
            d.addCallbacks(got_response, failed, errbackArgs=(retry,))

        def on_timeout() -> None:
            timed_out[0] = True
            for d in pending:
                d.cancel()

        timer = self.clock.callLater(self.request_timeout, on_timeout) if self.request_timeout > 0 else None

        def got_response(response: IResponse) -> None:
            pending.clear()
            if timer is not None and timer.active():
                timer.cancel()
            if result.called:
                return
            request.setResponseCode(response.code, response.phrase)
            for name, values in header_rules.to_client(response.headers).getAllRawHeaders():
                request.responseHeaders.setRawHeaders(name, values)
            content_type = response.headers.getRawHeaders(b"content-type", [b""])[0]
            sse = content_type.startswith(b"text/event-stream")
            tap = tap_for(sse) if tap_for is not None else None
            if response.length is not UNKNOWN_LENGTH and response.length is not None and not (tap and sse):
                request.setHeader(b"content-length", b"%d" % response.length)
            r = _Relay(request, result, sse, first_byte, tap)
            relay.append(r)
            response.deliverBody(r)

        def failed(reason: Failure, retry: bool) -> None:
            pending.clear()
            if result.called:
                return
            if timed_out[0]:
                result.errback(ApiError(504, f"backend did not start responding within {self.request_timeout:g} s"))
                return
            if retry and reason.check(client.ResponseNeverReceived):
                # A pooled connection the child closed as we reused it: once more.
                send(False)
                return
            if timer is not None and timer.active():
                timer.cancel()
            if not reason.check(
                error.ConnectError, client.ResponseNeverReceived, client.RequestTransmissionFailed,
                error.ConnectionLost, defer.CancelledError,
            ):
                log.failure("unexpected proxy failure", reason)
            result.errback(ApiError(502, f"backend unreachable: {reason.getErrorMessage()}"))

        send(True)
        return result
