"""Port 8000's HTTP/1.1 server: requests parsed in C by httptools (llhttp, as uvicorn uses), no twisted.web.

twisted.web's parser, ``Request`` and its per-request machinery cost more CPU
than the whole relay; on 2 cores every 100 us spent here is throughput taken
from the model.  This protocol parses with llhttp, enforces the same limits as
:mod:`llamad.gateway.limits` (408, 413, 414, 431, 429 for too many requests
still arriving from one client, 400 for ambiguous framing), and hands each
complete request to the :class:`~llamad.gateway.app.Gateway` as a
:class:`FrontRequest`, the small part of twisted.web's ``IRequest`` that the
guard, the gateway's own routes and the proxy use.

Time-outs (headers, a stalled or too slow body, an idle kept-alive
connection) are deadlines that one sweep every :data:`SWEEP_INTERVAL` seconds
checks, so a request sets no timer of its own.  Pipelined requests are
answered in order, one at a time.
"""

from __future__ import annotations

import io
import json
import time
from collections import deque
from email.utils import formatdate
import typing
from typing import Any, Iterator

import httptools
from twisted.internet.interfaces import IAddress, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol, ServerFactory, connectionDone
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES

from llamad.errors import ApiError, error_body
from llamad.gateway.guard import ALLOWED_METHODS
from llamad.gateway.limits import (BODY_MIN_RATE, BODY_TIMEOUT, HEADER_TIMEOUT, IDLE_TIMEOUT, MAX_HEAD_BYTES,
                                   MAX_HEADERS, MAX_INCOMPLETE_PER_CLIENT, MAX_LINE, REASONS, body_deadline,
                                   slow_body_message)
from llamad.gateway.immediate_write import write_now
from llamad.gateway.upstream import dechunk


log = Logger(namespace="llamad.front")

SWEEP_INTERVAL = 0.5  # seconds between checks of every connection's deadline
MAX_PIPELINED = 16  # complete requests waiting behind the one being answered; more pauses reading
_CHUNK_END = b"0\r\n\r\n"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BODY_DEADLINES = ("body", "slow body")  # the body stalled; it arrives, but too slowly in all
# llhttp's framing errors, in the words and codes llamad uses for the same refusals (limits.py's).
_FRAMING_ERRORS = (
    ("Duplicate Content-Length", "more than one Content-Length header", "bad_framing"),
    ("can't be present with", "both Transfer-Encoding and Content-Length", "bad_framing"),
    ("Content-Length", "Content-Length must be a non-negative decimal integer", "bad_request"),
    ("Transfer-Encoding", "Transfer-Encoding must be exactly 'chunked'", "bad_framing"),
)


class _Refused(Exception):
    """Raised inside a parser callback: the request was answered with an error, stop parsing."""


class _Date:
    """The Date header's value, formatted once a second."""

    second = 0
    value = b""

    @classmethod
    def now(cls) -> bytes:
        second = int(time.time())
        if second != cls.second:
            cls.second, cls.value = second, formatdate(second, usegmt=True).encode()
        return cls.value


class RequestHeaders:
    """The request's headers as received, read the way twisted.web's ``Headers`` is."""

    __slots__ = ("raw", "_index")

    def __init__(self) -> None:
        self.raw: list[tuple[bytes, bytes]] = []
        self._index: dict[bytes, list[bytes]] | None = None

    def _lookup(self) -> dict[bytes, list[bytes]]:
        if self._index is None:
            self._index = {}
            for name, value in self.raw:
                self._index.setdefault(name.lower(), []).append(value)
        return self._index

    def getRawHeaders(self, name: bytes, default: Any = None) -> Any:
        return self._lookup().get(name.lower(), default)

    def getAllRawHeaders(self) -> Iterator[tuple[bytes, list[bytes]]]:
        for name, value in self.raw:
            yield name, [value]


class ResponseHeaders:
    """The response's headers: the writes twisted.web's ``Headers`` takes, kept in order."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list[tuple[bytes, bytes]] = []

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        self.items.append((name, value))

    def setRawHeaders(self, name: bytes, values: list[bytes]) -> None:
        self.removeHeader(name)
        self.items.extend((name, value) for value in values)

    def removeHeader(self, name: bytes) -> None:
        lower = name.lower()
        self.items = [item for item in self.items if item[0].lower() != lower]

    def hasHeader(self, name: bytes) -> bool:
        lower = name.lower()
        return any(key.lower() == lower for key, _ in self.items)


class Handler(typing.Protocol):
    """What the front hands complete requests to (:class:`~llamad.gateway.app.Gateway`)."""

    bytes_sent: int

    def early_refusal(self, request: FrontRequest) -> ApiError | None:
        """An answer decided from the head alone (before the body is read), or None."""

    def serve(self, request: FrontRequest) -> None:
        """Answer a complete request."""


class FrontRequest:
    """One request and its response: what the guard, the gateway and the proxy read and write.

    The head is written with the first body write (one ``write`` for a small
    response); without a Content-Length an HTTP/1.1 response is chunked, an
    HTTP/1.0 one ends when the connection closes.
    """

    # Defaults kept on the class: a request sets only what differs (one is made per request).
    method = b""
    path = b""
    http10 = False
    keep_alive = True
    credentials: dict[bytes, bytes] | None = None  # the last Authorization and x-api-key, as received
    api_key: Any = None  # the key the guard let in
    body_bytes = 0
    length: int | None = None  # the request's Content-Length
    chunked_body = False
    expect_continue = False
    code = 200
    code_message: bytes | None = None
    head_sent = False
    chunked = False
    last_chunk_sent = False  # the child's own, passed on
    finished = False
    _disconnected = False
    sentLength = 0
    on_lost: Any = None  # called once if the client goes away before the response ends
    _producer: IPushProducer | None = None

    def __init__(self, channel: FrontProtocol) -> None:
        self.channel = channel
        self.uri = b""
        self.requestHeaders = RequestHeaders()
        self.body: list[bytes] = []
        self.responseHeaders = ResponseHeaders()

    # --- the request ---------------------------------------------------------------------------

    @property
    def content(self) -> io.BytesIO:
        return io.BytesIO(b"".join(self.body))

    def getHeader(self, name: bytes) -> bytes | None:
        if name == b"authorization" or name == b"x-api-key":
            return self.credentials.get(name) if self.credentials is not None else None
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> IAddress:
        return self.channel.transport.getPeer()

    # --- the response ---------------------------------------------------------------------------

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def _head(self) -> bytes:
        self.head_sent = True
        code = self.code
        reason = self.code_message or REASONS.get(code) or RESPONSES.get(code, b"Unknown")
        lines = [b"HTTP/1.0 %d %s" % (code, reason) if self.http10 else b"HTTP/1.1 %d %s" % (code, reason)]
        length = False
        for name, value in self.responseHeaders.items:
            if len(name) == 14 and name.lower() == b"content-length":
                length = True
            lines.append(name + b": " + value)
        if not length and code not in (204, 304) and code >= 200:
            if self.method == b"HEAD":
                pass  # no body either way
            elif self.http10:
                self.keep_alive = False  # the body ends at the close
            else:
                self.chunked = True
                lines.append(b"Transfer-Encoding: chunked")
        if not self.keep_alive:
            lines.append(b"Connection: close")
        elif self.http10:
            lines.append(b"Connection: keep-alive")
        lines.append(b"Date: " + _Date.now())
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def write(self, data: bytes) -> None:
        if self.finished or self._disconnected:
            return
        out = b"" if self.head_sent else self._head()
        if data and self.method != b"HEAD":
            self.sentLength += len(data)
            out += b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data
        if out:
            self.channel.send(out)

    def write_framed(self, framed: bytes, size: int, last: bool = False) -> None:
        """Chunks from the child (``size`` bytes of data): sent as they are when this response is
        chunked too.  ``last``: they end with the child's last chunk, so :meth:`finish` adds none."""
        if self.finished or self._disconnected:
            return
        out = b"" if self.head_sent else self._head()
        if self.chunked:
            self.sentLength += size
            self.last_chunk_sent = last
            self.channel.send(out + framed if out else framed)
            return
        if self.method != b"HEAD":  # HTTP/1.0: the plain bytes, the connection's end ends them
            data = dechunk(framed)
            self.sentLength += len(data)
            out += data
        if out:
            self.channel.send(out)

    @property
    def passes_chunks(self) -> bool:
        """Whether a chunked body from the child can go to this client as it came."""
        return not self.http10 and self.method != b"HEAD"

    def respond(self, body: bytes) -> None:
        """A whole response at once (llamad's own answers)."""
        if (not self.head_sent and self.code >= 200 and self.code not in (204, 304)
                and not self.responseHeaders.hasHeader(b"content-length")):
            self.responseHeaders.addRawHeader(b"Content-Length", b"%d" % len(body))
        self.write(body)
        self.finish()

    def finish(self) -> None:
        if self.finished:
            return
        self.on_lost = None  # it points back at what answers this request: no cycle left behind
        if self._disconnected:
            self.finished = True
            return
        out = b"" if self.head_sent else self._head_for_empty()
        if self.chunked and not self.last_chunk_sent:
            out += _CHUNK_END
        self.finished = True
        if out:
            self.channel.send(out)
        self.channel.request_done(self)

    def _head_for_empty(self) -> bytes:
        if self.method != b"HEAD" and not self.responseHeaders.hasHeader(b"content-length") and self.code >= 200 \
                and self.code not in (204, 304):
            self.responseHeaders.addRawHeader(b"Content-Length", b"0")
        return self._head()

    def registerProducer(self, producer: IPushProducer, streaming: bool) -> None:
        """The child's connection, paused while this client cannot keep up."""
        self._producer = producer
        transport = self.channel.transport
        if transport is not None and not self._disconnected:
            transport.registerProducer(producer, True)

    def unregisterProducer(self) -> None:
        if self._producer is not None:
            self._producer = None
            transport = self.channel.transport
            if transport is not None and transport.producer is not None:
                transport.unregisterProducer()

    def lost(self) -> None:
        """The client's connection closed before this response ended."""
        if self.finished or self._disconnected:
            return
        self._disconnected = True
        callback, self.on_lost = self.on_lost, None
        if callback is not None:
            callback()


class FrontProtocol(Protocol):
    """One client connection: llhttp parses, the gateway answers, one request at a time in order."""

    factory: FrontFactory

    def __init__(self, factory: FrontFactory) -> None:
        self.factory = factory
        self.parser = httptools.HttpRequestParser(self)
        self.incoming: FrontRequest | None = None  # the request whose bytes are arriving
        self.queue: deque[FrontRequest] = deque()  # complete, waiting for the one being answered
        self.current: FrontRequest | None = None  # the request being answered
        self.host: str | None = None
        self.counted = False  # counted in factory.incomplete (a request of this client is arriving)
        self.head_bytes = 0  # the request line's and headers' bytes, as parsed
        self.raw_head = 0  # bytes received while the head is incomplete
        self.headers = 0
        self.deadline = 0.0
        self.deadline_kind = ""
        self.body_started = 0.0  # when the head of the request whose body is arriving was in
        self.closing = False  # no more requests on this connection
        self.refusal: bytes | None = None  # an error answer waiting for the current response to end
        self.early_pending: FrontRequest | None = None  # its head is to be checked if its body is not all in
        self.paused = False

    # --- connection --------------------------------------------------------------------------------

    def connectionMade(self) -> None:
        no_delay = getattr(self.transport, "setTcpNoDelay", None)  # not on a UNIX socket
        if no_delay is not None:
            no_delay(True)
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)
        self.host = host if isinstance(host, str) and host else None
        self.factory.connections.add(self)
        self._deadline("header", self.factory.header_timeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.factory.connections.discard(self)
        self.closing = True
        self._uncount()
        current, self.current = self.current, None
        self.queue.clear()
        if current is not None:
            current.lost()

    def send(self, data: bytes) -> None:
        write_now(self.transport, data)

    def _deadline(self, kind: str, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.factory.clock.seconds() + seconds if seconds > 0 else 0.0

    def expired(self) -> None:
        """The sweep found this connection past its deadline."""
        kind, self.deadline = self.deadline_kind, 0.0
        if kind == "idle":
            self.transport.loseConnection()
        elif kind == "header":
            self.refuse(408, f"request headers not received within {self.factory.header_timeout:g} s",
                        "request_timeout")
        elif kind == "body":
            self.refuse(408, f"request body stalled: no data for {self.factory.body_timeout:g} s", "request_timeout")
        elif kind == "slow body":
            factory = self.factory
            received = self.incoming.body_bytes if self.incoming is not None else 0
            self.refuse(408, slow_body_message(received, factory.clock.seconds() - self.body_started,
                                               factory.body_timeout, factory.body_min_rate), "request_timeout")

    def _body_deadline(self, received: int) -> None:
        """The sooner of a body's two bounds: ``body_timeout`` from now (a stall), or its whole time
        (:func:`~llamad.gateway.limits.body_deadline`) spent."""
        factory = self.factory
        stall = factory.clock.seconds() + factory.body_timeout
        due = body_deadline(self.body_started, received, factory.body_timeout, factory.body_min_rate)
        self.deadline_kind, self.deadline = ("slow body", due) if due < stall else ("body", stall)

    # --- parsing ------------------------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        incoming = self.incoming
        head_before = incoming is not None and not incoming.method  # this read continues a head
        try:
            self.parser.feed_data(data)
        except _Refused:
            return
        except httptools.HttpParserUpgrade:
            self._no_upgrade()
            return
        except httptools.HttpParserError as e:
            # Else a callback refused (llhttp wraps what on_headers_complete raises), or bytes came
            # after a request that said Connection: close, which end the connection unread.
            if self.refusal is None and not self.closing:
                self._parse_error(e, data if incoming is None else b"")
            return
        request = self.incoming
        if request is None:
            return
        if self.early_pending is not None:
            pending, self.early_pending = self.early_pending, None
            if pending is request:  # its body is still arriving
                try:
                    self._check_early(request)
                except _Refused:
                    return
        if head_before and request is incoming and not request.method:
            # The head is still arriving: bound what llhttp holds of it.
            self.raw_head += len(data)
            if self.raw_head > self.factory.max_head + self.factory.max_header_line:
                self._too_large_head()
        elif self.deadline_kind in _BODY_DEADLINES:
            self._body_deadline(request.body_bytes)  # progress: the stall clock starts over

    def _no_upgrade(self) -> None:
        """No protocol switch here: answer the request that asked, then close."""
        self.closing = True
        last = self.queue[-1] if self.queue else self.current
        if last is None:
            self.transport.loseConnection()
        elif not last.head_sent:
            last.keep_alive = False

    def _too_large_head(self) -> None:
        self.refuse(431, f"request headers over {self.factory.max_head} bytes in all", "header_fields_too_large")

    def _parse_error(self, e: Exception, data: bytes) -> None:
        """llhttp refused the bytes: the specific answer where one applies, else a JSON 400."""
        text = str(e)
        if "Content-Length overflow" in text:  # more digits than any limit: over it, not malformed
            self.refuse(413, f"request body is over the {self.factory.max_body_bytes}-byte limit",
                        "payload_too_large")
            return
        target = data.split(b" ", 2)[1] if data.count(b" ") >= 2 else b""
        if isinstance(e, httptools.HttpParserInvalidURLError) and target and not target.startswith(b"/"):
            self.refuse(400, "invalid request target: it must be a path starting with '/'", "invalid_request_target")
            return
        if self.incoming is not None and self.incoming.length is None and self.incoming.chunked_body \
                and self.incoming.method:
            self.refuse(400, "malformed chunked request body", "bad_request")
            return
        for needle, message, code in _FRAMING_ERRORS:
            if needle in text:
                self.refuse(400, message, code)
                return
        if isinstance(e, httptools.HttpParserInvalidMethodError):
            method = data.split(b" ", 1)[0] if b" " in data[:33] else b""
            if method.isalpha():  # a method llhttp does not know, in a well-formed request line
                self.refuse(405, f"method {method.decode()} not allowed", "method_not_allowed",
                            {b"allow": b", ".join(sorted(ALLOWED_METHODS))})
            else:
                self.refuse(400, "malformed HTTP request: invalid method", "bad_request")
        else:
            self.refuse(400, f"malformed HTTP request: {text}", "bad_request")

    def on_message_begin(self) -> None:
        factory = self.factory
        limit = factory.max_incomplete_per_client
        if limit and self.host is not None:
            counts = factory.incomplete
            if counts.get(self.host, 0) >= limit:
                self.refuse(429, f"more than {limit} requests from this client are still arriving",
                            "too_many_incomplete_requests")
                raise _Refused
            counts[self.host] = counts.get(self.host, 0) + 1
            self.counted = True
        self.incoming = FrontRequest(self)
        self.head_bytes = 0
        self.raw_head = 0
        self.headers = 0
        if self.deadline_kind != "header" or not self.deadline:
            self._deadline("header", factory.header_timeout)

    def on_url(self, url: bytes) -> None:
        request = self.incoming
        assert request is not None
        request.uri += url
        self.head_bytes += len(url)
        if len(request.uri) > self.factory.max_request_line:
            self.refuse(414, f"request line over {self.factory.max_request_line} bytes", "uri_too_long")
            raise _Refused

    def on_header(self, name: bytes, value: bytes) -> None:
        request = self.incoming
        assert request is not None
        factory = self.factory
        self.headers += 1
        if self.headers > factory.max_headers:
            self.refuse(431, f"more than {factory.max_headers} headers", "header_fields_too_large")
            raise _Refused
        if len(name) + len(value) + 2 > factory.max_header_line:
            self.refuse(431, f"a header line over {factory.max_header_line} bytes", "header_fields_too_large")
            raise _Refused
        self.head_bytes += len(name) + len(value) + 4
        if self.head_bytes > factory.max_head:
            self._too_large_head()
            raise _Refused
        request.requestHeaders.raw.append((name, value))
        size = len(name)
        if size == 14 or size == 17 or size == 6 or size == 13 or size == 9:
            lower = name.lower()
            if lower == b"content-length":
                if len(value) > 18:
                    self.refuse(413, f"request body is over the {factory.max_body_bytes}-byte limit",
                                "payload_too_large")
                    raise _Refused
                request.length = int(value)  # llhttp took only digits
            elif lower == b"transfer-encoding":
                if request.chunked_body:
                    self.refuse(400, "more than one Transfer-Encoding header", "bad_framing")
                    raise _Refused
                if value.strip(b" \t").lower() != b"chunked":
                    self.refuse(400, "Transfer-Encoding must be exactly 'chunked'", "bad_framing")
                    raise _Refused
                request.chunked_body = True
            elif lower == b"expect":
                request.expect_continue = value.strip().lower() == b"100-continue"
            elif lower == b"authorization" or lower == b"x-api-key":
                if request.credentials is None:
                    request.credentials = {}
                request.credentials[lower] = value  # read on every request when auth is on

    def on_headers_complete(self) -> None:
        request = self.incoming
        assert request is not None
        parser = self.parser
        request.method = parser.get_method()
        version = parser.get_http_version()
        if version not in ("1.0", "1.1"):
            self.refuse(400, f"malformed HTTP request: HTTP/{version} is not served here (HTTP/1.1 is)", "bad_request")
            raise _Refused
        request.http10 = version == "1.0"
        request.keep_alive = parser.should_keep_alive()
        uri = request.uri
        if not uri.startswith(b"/"):
            self.refuse(400, "invalid request target: it must be a path starting with '/'", "invalid_request_target")
            raise _Refused
        request.path = uri.split(b"?", 1)[0] if b"?" in uri else uri
        if request.chunked_body or request.length:  # a body follows: decide what the head alone can first
            limit = self.factory.max_body_bytes
            too_large = request.length is not None and request.length > limit
            if too_large or request.expect_continue:
                self._check_early(request)
            else:
                # Asked only if the body is still arriving when this read is parsed: a body that came
                # with its head held no connection open, and the guard checks the whole request anyway.
                self.early_pending = request
            if too_large:
                self.refuse(413, f"request body of {request.length} bytes is over the {limit}-byte limit",
                            "payload_too_large")
                raise _Refused
            if request.expect_continue and not request.http10 and self.current is None and not self.queue:
                self.send(_CONTINUE)
            self.body_started = self.factory.clock.seconds()
            self._deadline("body", self.factory.body_timeout)
        else:
            self.deadline = 0.0

    def _check_early(self, request: FrontRequest) -> None:
        """The guard's verdict on the head of a request whose body is not all in (API key first)."""
        refusal = self.factory.gateway.early_refusal(request)
        if refusal is not None:
            self.refuse(refusal.status, refusal.message, refusal.code, refusal.headers, refusal.param)
            raise _Refused

    def on_body(self, data: bytes) -> None:
        request = self.incoming
        assert request is not None
        request.body.append(data)
        request.body_bytes += len(data)
        if request.body_bytes > self.factory.max_body_bytes:
            self.refuse(413, f"request body over the {self.factory.max_body_bytes}-byte limit", "payload_too_large")
            raise _Refused

    def on_message_complete(self) -> None:
        request, self.incoming = self.incoming, None
        assert request is not None
        self.early_pending = None
        self._uncount()
        self.deadline = 0.0
        if not request.keep_alive:
            self.closing = True  # the client sends nothing after this one
        self.queue.append(request)
        if self.current is None:
            self._next()
        elif len(self.queue) >= MAX_PIPELINED and not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def _uncount(self) -> None:
        if not self.counted:
            return
        self.counted = False
        counts = self.factory.incomplete
        left = counts.get(self.host, 0) - 1  # type: ignore[arg-type]
        if left > 0:
            counts[self.host] = left  # type: ignore[index]
        else:
            counts.pop(self.host, None)  # type: ignore[arg-type]

    # --- answering ----------------------------------------------------------------------------------

    def _next(self) -> None:
        while self.current is None and self.queue:
            request = self.current = self.queue.popleft()
            if self.paused and len(self.queue) < MAX_PIPELINED:
                self.paused = False
                self.transport.resumeProducing()
            try:
                self.factory.gateway.serve(request)
            except Exception:
                log.failure("error answering {method} {path}", method=request.method, path=request.path)
                if not request.head_sent and not request.finished:
                    request.setResponseCode(500)
                    request.responseHeaders = ResponseHeaders()
                    request.setHeader(b"content-type", b"application/json")
                    request.respond(json.dumps(error_body(500, "internal error in llamad")).encode())
                elif not request.finished:
                    self.transport.abortConnection()  # a started answer cannot say so: cut it

    def request_done(self, request: FrontRequest) -> None:
        if request is not self.current:
            return
        self.current = None
        self.factory.gateway.bytes_sent += request.sentLength
        if not request.keep_alive:
            self.closing = True
            self.transport.loseConnection()
        elif self.queue:
            self._next()
        elif self.refusal is not None:
            self.transport.write(self.refusal)
            self.transport.loseConnection()
        elif self.closing:
            self.transport.loseConnection()
        elif self.incoming is None:
            self._deadline("idle", self.factory.idle_timeout)

    def refuse(self, status: int, message: str, code: str, headers: dict[bytes, bytes] | None = None,
               param: str | None = None) -> None:
        """Answer at the HTTP level and close: the request never reaches the gateway."""
        if self.closing and self.refusal is not None:
            return
        self.closing = True
        self.deadline = 0.0
        self._uncount()
        self.incoming = None
        body = json.dumps(error_body(status, message, code, param)).encode()
        extra = b"".join(b"%s: %s\r\n" % item for item in (headers or {}).items())
        reason = REASONS.get(status) or RESPONSES.get(status, b"Error")
        self.refusal = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
                        b"Connection: close\r\n\r\n%s" % (status, reason, len(body), extra, body))
        if self.current is None and not self.queue:
            self.transport.write(self.refusal)
            self.transport.loseConnection()


class FrontFactory(ServerFactory):
    """Port 8000's connections, their limits, and the sweep that enforces their deadlines."""

    noisy = False

    def __init__(self, gateway: Handler, clock: IReactorTime, max_body_bytes: int = 10485760,
                 header_timeout: float = HEADER_TIMEOUT, body_timeout: float = BODY_TIMEOUT,
                 max_incomplete_per_client: int = MAX_INCOMPLETE_PER_CLIENT, *, max_headers: int = MAX_HEADERS,
                 max_header_line: int = MAX_LINE, max_request_line: int = MAX_LINE,
                 idle_timeout: float = IDLE_TIMEOUT, body_min_rate: float = BODY_MIN_RATE) -> None:
        self.gateway = gateway
        self.clock = clock
        self.max_body_bytes = max_body_bytes
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.body_min_rate = body_min_rate
        self.max_incomplete_per_client = max_incomplete_per_client
        self.max_headers = max_headers
        self.max_header_line = max_header_line
        self.max_request_line = max_request_line
        self.max_head = max(MAX_HEAD_BYTES, max_header_line + max_request_line)
        self.idle_timeout = idle_timeout
        self.incomplete: dict[str, int] = {}  # client IP -> its connections with a request still arriving
        self.connections: set[FrontProtocol] = set()
        self.sweeper = LoopingCall(self.sweep)
        self.sweeper.clock = clock

    def buildProtocol(self, addr: IAddress) -> FrontProtocol:
        return FrontProtocol(self)

    def startFactory(self) -> None:
        if not self.sweeper.running:
            self.sweeper.start(SWEEP_INTERVAL, now=False)

    def stopFactory(self) -> None:
        if self.sweeper.running:
            self.sweeper.stop()

    def sweep(self) -> None:
        now = self.clock.seconds()
        for connection in [c for c in self.connections if c.deadline and c.deadline <= now]:
            connection.expired()
