"""HTTP-level limits on port 8000, enforced while the request is still arriving.

Twisted's ``HTTPChannel`` answers every violation with a bare 400; clients and
operators deserve the specific status: 413 for a body over the limit (decided
from ``Content-Length`` before the body is read, or while a chunked body
arrives), 414 for a request line over 8 KiB, 431 for too many or too long
headers, 408 for a client that does not finish its headers in time
(slowloris).  Each answer is OpenAI-shaped JSON, then the connection closes.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.web import http, server

from llamad.gateway.errors import error_body
from llamad.timers import cancel

MAX_LINE = 8192  # request line and each header line
MAX_HEADERS = 64
HEADER_TIMEOUT = 10.0  # seconds from a request's first byte to its last header
IDLE_TIMEOUT = 75.0  # seconds a kept-alive connection may sit idle

REASONS = {408: b"Request Timeout", 413: b"Payload Too Large", 414: b"URI Too Long",
           431: b"Request Header Fields Too Large"}


class GuardedRequest(server.Request):
    """Counts a chunked body as it arrives, so an oversized one is cut at the limit."""

    def gotLength(self, length: int | None) -> None:
        self._body_bytes = 0
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        self._body_bytes += len(data)
        channel: GuardedChannel = self.channel
        if self._body_bytes > channel.max_body_bytes:
            channel.reject(413, f"request body over the {channel.max_body_bytes}-byte limit", "request_too_large")
            return
        super().handleContentChunk(data)


class GuardedChannel(http.HTTPChannel):
    MAX_LENGTH = MAX_LINE
    max_body_bytes = 10485760
    header_timeout = HEADER_TIMEOUT

    _header_count = 0
    _header_deadline: IDelayedCall | None = None
    _rejected = False
    _awaiting_headers = True  # between requests, or while a request's head arrives

    def connectionMade(self) -> None:
        super().connectionMade()
        self._arm()

    def dataReceived(self, data: bytes) -> None:
        # The first byte of a request starts its header deadline; an idle
        # kept-alive connection is left to the (longer) idle timeout.
        if self._awaiting_headers and self._header_deadline is None and not self._rejected:
            self._arm()
        super().dataReceived(data)

    def _arm(self) -> None:
        self._header_deadline = self.callLater(self.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        self._header_deadline = cancel(self._header_deadline)

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        self.reject(408, f"request headers not received within {self.header_timeout:g} s", "request_timeout")

    def lineReceived(self, line: bytes) -> None:
        if not self._rejected:
            super().lineReceived(line)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._header_count == 0 and not self.requests:
            self.reject(414, f"request line over {self.MAX_LENGTH} bytes", "uri_too_long")
        else:
            self.reject(431, f"a header line over {self.MAX_LENGTH} bytes", "header_too_large")

    def headerReceived(self, line: bytes) -> bool:
        self._header_count += 1
        if self._header_count > MAX_HEADERS:
            self.reject(431, f"more than {MAX_HEADERS} headers", "too_many_headers")
            return False
        return bool(super().headerReceived(line))

    def allHeadersReceived(self) -> None:
        self._disarm()
        self._awaiting_headers = False
        self._header_count = 0
        if self.length is not None and self.length > self.max_body_bytes:
            self.reject(413, f"request body of {self.length} bytes is over the {self.max_body_bytes}-byte limit",
                        "request_too_large")
            return
        super().allHeadersReceived()

    def allContentReceived(self) -> None:
        if not self._rejected:
            super().allContentReceived()

    def requestDone(self, request: Any) -> None:
        super().requestDone(request)
        self._awaiting_headers = True

    def connectionLost(self, reason: Any) -> None:
        self._disarm()
        super().connectionLost(reason)

    def reject(self, status: int, message: str, code: str) -> None:
        """Answer at the HTTP level and close: the request never reaches a resource."""
        if self._rejected:
            return
        self._rejected = True
        self._disarm()
        body = json.dumps(error_body(status, message, code)).encode()
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, REASONS.get(status, b"Error"), len(body), body)
        )
        self.setRawMode()
        self.rawDataReceived = lambda data: None  # type: ignore[method-assign]
        self.loseConnection()


def guarded_site(resource: Any, max_body_bytes: int, header_timeout: float = HEADER_TIMEOUT,
                 site_class: type[server.Site] = server.Site) -> server.Site:
    """A Site whose connections enforce the limits above."""
    # Bodies are relayed as they are: no form parsing (it costs, and may fail on them).
    site = site_class(resource, timeout=IDLE_TIMEOUT, parsePOSTFormSubmission=False)
    site.requestFactory = GuardedRequest
    site.protocol = type("Channel", (GuardedChannel,), {"max_body_bytes": max_body_bytes,
                                                        "header_timeout": header_timeout})
    return site
