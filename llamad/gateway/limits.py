"""HTTP-level limits on port 8000, enforced while the request is still arriving.

Twisted's ``HTTPChannel`` answers every violation with a bare 400; clients and
operators deserve the specific status: 413 for a body over the limit (decided
from ``Content-Length`` before the body is read, or while a chunked body
arrives), 414 for a request line over ``max_request_line``, 431 for more than
``max_headers`` headers or a header line over ``max_header_line``, 408 for a
client that does not finish its headers in time (slowloris), stalls while
sending a body, or sends it too slowly in all (one byte every few seconds
never stalls: see :func:`body_deadline`), 400 for an ambiguous body framing
(the stuff of request smuggling), a request target that is not a path, or any
other malformed request, 429 for a client with too many requests still
arriving at once.  A request with a body has its head checked by the guard
(API key included) before the body is read.  Each answer is OpenAI-shaped
JSON, then the connection closes.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Mapping

from twisted.internet.interfaces import IDelayedCall
from twisted.web import http, server
from twisted.web.iweb import IRequest

from llamad.errors import ApiError, error_body
from llamad.timers import cancel

MAX_LINE = 8192  # default of the request line's and of each header line's limit
MAX_HEADERS = 64  # default of the header count's limit
MAX_HEAD_BYTES = 16384  # request line and all headers together (at least the two line limits' sum)
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to its last header
BODY_TIMEOUT = 30.0  # seconds a body may go without a byte
BODY_MIN_RATE = 500  # bytes per second a body must keep up after its first body_timeout seconds; 0 = any rate
MAX_INCOMPLETE_PER_CLIENT = 64  # requests one client IP may have arriving at once; 0 = no limit
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may sit idle
MAX_LENGTH_DIGITS = 18  # a longer Content-Length is over any limit (and too long for int() to be cheap)

REASONS = {408: b"Request Timeout", 413: b"Payload Too Large", 414: b"URI Too Long", 429: b"Too Many Requests",
           431: b"Request Header Fields Too Large"}

# The guard's verdict on a request head (method, target, the request with its headers), or None.
EarlyCheck = Callable[[bytes, bytes, IRequest], ApiError | None]


def body_deadline(started: float, received: int, body_timeout: float, min_rate: float) -> float:
    """When a body that began at ``started`` and has ``received`` bytes so far must be complete.

    ``body_timeout`` seconds, plus one second per ``min_rate`` bytes received
    (Apache's mod_reqtimeout ``MinRate``): a body trickled a byte at a time,
    which never stalls for ``body_timeout``, is cut once its time is spent,
    while a large body sent at any reasonable speed never is.  ``min_rate``
    0: no bound but the stall one.
    """
    return started + body_timeout + received / min_rate if min_rate > 0 else float("inf")


def slow_body_message(received: int, elapsed: float, body_timeout: float, min_rate: float) -> str:
    return (f"request body too slow: {received} bytes in {elapsed:.0f} s (a body gets {body_timeout:g} s "
            f"plus 1 s per {min_rate:g} bytes)")


class GuardedRequest(server.Request):
    """Counts a chunked body as it arrives, so an oversized one is cut at the limit."""

    def gotLength(self, length: int | None) -> None:
        self._body_bytes = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        channel: GuardedChannel = self.channel
        channel._body_received = self._body_bytes
        if self._body_bytes > channel.max_body_bytes:
            channel.reject(413, f"request body over the {channel.max_body_bytes}-byte limit", "payload_too_large")
            return
        super().handleContentChunk(data)


class GuardedChannel(http.HTTPChannel):
    MAX_LENGTH = MAX_LINE  # LineReceiver's own cut: the larger of the two line limits
    totalHeadersSize = MAX_HEAD_BYTES
    maxHeaders = MAX_HEADERS
    max_headers = MAX_HEADERS
    max_header_line = MAX_LINE
    max_request_line = MAX_LINE
    max_body_bytes = 10485760
    header_timeout = HEADER_TIMEOUT
    body_timeout = BODY_TIMEOUT
    body_min_rate = BODY_MIN_RATE
    max_incomplete_per_client = MAX_INCOMPLETE_PER_CLIENT
    early_check: EarlyCheck | None = None
    site: server.Site

    _header_count = 0
    _past_request_line = False  # the current request's first line is in
    _header_deadline: IDelayedCall | None = None
    _body_deadline: IDelayedCall | None = None
    _body_started = 0.0  # when the current request's head was in
    _body_last = 0.0  # when its body last made progress
    _body_received = 0  # its body's bytes so far (chunk framing not counted)
    _rejected = False
    _awaiting_headers = True  # between requests, or while a request's head arrives
    _head: tuple[bytes, bytes] | None = None  # method and target of the request whose head is arriving
    _length_seen = False
    _chunked_seen = False
    _arriving = False  # a request has begun and is not yet fully received
    _counted_as: str | None = None  # the client IP this connection counts against meanwhile

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        if self._awaiting_headers and not self._arriving and not self._start_request():
            return
        super().dataReceived(data)

    def _arm(self) -> None:
        self._header_deadline = self.callLater(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        self._header_deadline = cancel(self._header_deadline)
        self._body_deadline = cancel(self._body_deadline)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self.reject(408, f"request headers not received within {self.header_timeout:g} s", "request_timeout")

    def _now(self) -> float:
        return float(self.site.reactor.seconds())

    def _body_delay(self) -> float:
        """Seconds until the sooner of the body's two bounds: a stall, or too slow in all."""
        now = self._now()
        due = body_deadline(self._body_started, self._body_received, self.body_timeout, self.body_min_rate)
        return max(0.0, min(self.body_timeout, due - now))

    def _body_too_slow(self) -> None:
        self._body_deadline = None
        now = self._now()
        if now - self._body_last >= self.body_timeout:
            self.reject(408, f"request body stalled: no data for {self.body_timeout:g} s", "request_timeout")
        else:
            self.reject(408, slow_body_message(self._body_received, now - self._body_started, self.body_timeout,
                                               self.body_min_rate), "request_timeout")

    def _start_request(self) -> bool:
        """A request's first byte: start its header deadline and count it against its client.

        An idle kept-alive connection is left to the (longer) idle timeout and
        is not counted.  False if the request was refused.
        """
        if self._rejected:
            return False
        limit = self.max_incomplete_per_client
        host = getattr(self.transport.getPeer(), "host", None)
        if limit and isinstance(host, str):  # else no limit, or no address to count by (a UNIX socket)
            counts: dict[str, int] = self.site.incomplete_requests  # type: ignore[attr-defined]
            if counts.get(host, 0) >= limit:
                self.reject(429, f"more than {limit} requests from this client are still arriving",
                            "too_many_incomplete_requests")
                return False
            counts[host] = counts.get(host, 0) + 1
            self._counted_as = host
        self._arriving = True
        if self._header_deadline is None:
            self._arm()
        return True

    def _end_request(self) -> None:
        """Stop counting this connection: its request arrived, was refused, or the connection is gone.

        Idempotent, and drops a client's entry at zero, so the table holds only live clients.
        """
        self._arriving = False
        host, self._counted_as = self._counted_as, None
        if host is None:
            return
        counts: dict[str, int] = self.site.incomplete_requests  # type: ignore[attr-defined]
        left = counts.get(host, 0) - 1
        if left > 0:
            counts[host] = left
        else:
            counts.pop(host, None)

    def lineReceived(self, line: bytes) -> None:
        # A pipelined request can follow one answered at once in the same read,
        # without passing through dataReceived.
        if self._rejected or (self._awaiting_headers and not self._arriving and not self._start_request()):
            return
        # Twisted's own check of the same total answers a bare 400.
        if self._receivedHeaderSize + len(line) > self.totalHeadersSize:
            self.reject(431, f"request headers over {self.totalHeadersSize} bytes in all", "header_fields_too_large")
            return
        if len(line) > (self.max_header_line if self._past_request_line else self.max_request_line):
            self.lineLengthExceeded(line)
            return
        self._past_request_line = self._past_request_line or bool(line)  # one empty line may come first
        if self._head is None and line:
            parts = line.split(b" ")
            if len(parts) == 3:  # anything else is malformed, and Twisted's parser says so
                if not parts[1].startswith(b"/"):
                    # ``*`` would be answered by Twisted's Request.process itself, past the
                    # guard; an absolute URL is no route of this server either.
                    self.reject(400, "invalid request target: it must be a path starting with '/'",
                                "invalid_request_target")
                    return
                self._head = (parts[0], parts[1])
        super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self._past_request_line:
            self.reject(414, f"request line over {self.max_request_line} bytes", "uri_too_long")
        else:
            self.reject(431, f"a header line over {self.max_header_line} bytes", "header_fields_too_large")

    def headerReceived(self, line: bytes) -> bool:
        self._header_count += 1
        if self._header_count > self.max_headers:
            self.reject(431, f"more than {self.max_headers} headers", "header_fields_too_large")
            return False
        name, _, value = line.partition(b":")
        name = name.lower()
        if (name == b"content-length" or name == b"transfer-encoding") and not self._framing_ok(
                name, value.strip(b" \t")):
            return False
        return bool(super().headerReceived(line))

    def _framing_ok(self, name: bytes, value: bytes) -> bool:
        """One unambiguous body length, or a refusal: a request that a proxy in front
        frames one way and llamad another is how requests get smuggled."""
        if name == b"content-length":
            if self._length_seen:
                self.reject(400, "more than one Content-Length header", "bad_framing")
            elif not value.isdigit():  # llama-gguf-inference's code for it
                self.reject(400, "Content-Length must be a non-negative decimal integer", "bad_request")
            elif self._chunked_seen:
                self.reject(400, "both Transfer-Encoding and Content-Length", "bad_framing")
            elif len(value) > MAX_LENGTH_DIGITS:
                self.reject(413, f"request body is over the {self.max_body_bytes}-byte limit", "payload_too_large")
            self._length_seen = True
        else:
            if self._chunked_seen:
                self.reject(400, "more than one Transfer-Encoding header", "bad_framing")
            elif value.lower() != b"chunked":
                self.reject(400, "Transfer-Encoding must be exactly 'chunked'", "bad_framing")
            elif self._length_seen:
                self.reject(400, "both Transfer-Encoding and Content-Length", "bad_framing")
            self._chunked_seen = True
        return not self._rejected

    def allHeadersReceived(self) -> None:
        self._disarm()
        self._awaiting_headers = False
        self._header_count = 0
        self._past_request_line = False
        head, self._head = self._head, None
        self._length_seen = self._chunked_seen = False
        if self.length != 0:  # a body follows: decide what the head alone can before reading it
            refusal = self.early_check(*head, self.requests[-1]) if self.early_check and head else None
            if refusal is not None:
                self.reject(refusal.status, refusal.message, refusal.code, refusal.headers, refusal.param)
                return
            if self.length is not None and self.length > self.max_body_bytes:
                self.reject(413, f"request body of {self.length} bytes is over the {self.max_body_bytes}-byte limit",
                            "payload_too_large")
                return
            self._body_started = self._body_last = self._now()
            self._body_received = 0
            self._body_deadline = self.callLater(self.body_timeout, self._body_too_slow)
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        super().rawDataReceived(data)
        if self._body_deadline is not None:  # still arriving: the stall clock starts over
            self._body_last = self._now()
            self._body_deadline.reset(self._body_delay())

    def allContentReceived(self) -> None:
        self._body_deadline = cancel(self._body_deadline)
        self._end_request()
        if not self._rejected:
            super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        # Before Twisted replays pipelined data: the next request's first byte
        # must arm its deadline and count as arriving.
        self._awaiting_headers = True
        super().requestDone(request)

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        self._end_request()
        super().connectionLost(reason)

    def _respondToBadRequestAndDisconnect(self) -> None:
        """Twisted's answer to any other malformed request (request line, header, chunk): JSON here too."""
        if self._body_deadline is not None:
            self.reject(400, "malformed chunked request body", "bad_request")
        else:
            self.reject(400, "malformed HTTP request", "bad_request")

    def reject(self, status: int, message: str, code: str, headers: Mapping[bytes, bytes] | None = None,
               param: str | None = None) -> None:
        """Answer at the HTTP level and close: the request never reaches a resource."""
        if self._rejected:
            return
        self._rejected = True
        self._disarm()
        self._end_request()
        body = json.dumps(error_body(status, message, code, param)).encode()
        extra = b"".join(b"%s: %s\r\n" % item for item in (headers or {}).items())
        reason = REASONS.get(status) or http.RESPONSES.get(status, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s"
            b"Connection: close\r\n\r\n%s" % (status, reason, len(body), extra, body)
        )
        self.setRawMode()
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        self.loseConnection()


def guarded_site(resource: Any, max_body_bytes: int, header_timeout: float = HEADER_TIMEOUT,
                 site_class: type[server.Site] = server.Site, *, body_timeout: float = BODY_TIMEOUT,
                 max_incomplete_per_client: int = MAX_INCOMPLETE_PER_CLIENT,
                 early_check: EarlyCheck | None = None, max_headers: int = MAX_HEADERS,
                 max_header_line: int = MAX_LINE, max_request_line: int = MAX_LINE,
                 body_min_rate: float = BODY_MIN_RATE) -> server.Site:
    """A Site whose connections enforce the limits above.

    ``early_check`` is the guard's verdict on a request head, asked before a
    body is read; ``site.incomplete_requests`` maps each client IP to its
    connections that are still sending a request.
    """
    # Bodies are relayed as they are: no form parsing (it costs, and may fail on them).
    site = site_class(resource, timeout=IDLE_TIMEOUT, parsePOSTFormSubmission=False)
    site.requestFactory = GuardedRequest
    site.incomplete_requests = {}  # type: ignore[attr-defined]
    site.protocol = type("Channel", (GuardedChannel,), {
        "max_body_bytes": max_body_bytes, "header_timeout": header_timeout, "body_timeout": body_timeout,
        "body_min_rate": body_min_rate,
        "max_incomplete_per_client": max_incomplete_per_client,
        "early_check": staticmethod(early_check) if early_check is not None else None,
        "max_headers": max_headers, "maxHeaders": max_headers, "max_header_line": max_header_line,
        "max_request_line": max_request_line, "MAX_LENGTH": max(max_header_line, max_request_line),
        # A raised line limit must not be refused by the total first.
        "totalHeadersSize": max(MAX_HEAD_BYTES, max_header_line + max_request_line),
    })
    return site
