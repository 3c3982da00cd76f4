"""A lean HTTP/1.1 client for the one upstream llamad talks to: the child.

``twisted.web.client.Agent`` is general (URIs, endpoints, any server); per
request it costs more than the whole relay.  Here the upstream is one fixed
loopback address, so a request is one write of prebuilt bytes on a pooled
connection, and the response is parsed with a handful of ``bytes`` calls.

The response is pushed to a :class:`ResponseHandler`; the connection's
transport is the producer the handler can pause (backpressure) or stop
(cancellation, which makes llama.cpp free the slot).  A handler with
``framed = True`` gets a chunked body as it came (:meth:`ResponseHandler.chunks`),
nothing decoded, to pass the chunks on unchanged: llhttp walks the chunks in
C, one ``feed_data`` per read and one small callback per chunk, and says only
how many data bytes a read held, whether it ends right after a chunk that ends
an SSE event, and where the body ends.
"""

from __future__ import annotations

import typing

import httptools
from twisted.internet import defer, error
from twisted.internet.interfaces import IPushProducer, IReactorTCP, IReactorTime
from twisted.internet.protocol import ClientFactory, Protocol
from twisted.python.failure import Failure

from llamad.gateway.immediate_write import write_now

CONNECT_TIMEOUT = 10
POOL_IDLE_SECONDS = 3  # shorter than llama.cpp's 5 s keep-alive
MAX_HEAD = 65536
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding", b"connection"})


class ResponseHandler(typing.Protocol):
    def response_started(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]],
                         length: int | None, producer: IPushProducer) -> None:
        """``headers``: (lower-case name, name as sent, value), in order."""

    def body(self, data: bytes) -> None: ...

    def chunks(self, framed: bytes, whole: bool, size: int, last: bool = False) -> None:
        """A chunked body's bytes with their framing, for a handler with ``framed = True``.  The first
        call starts on a chunk boundary, each later one where the last ended; ``whole``: this one ends
        on a boundary too, right after a chunk whose data ends an SSE event (a read that ends on another
        boundary may say False); ``size``: the data bytes in it; ``last``: it ends with the child's last
        chunk (size 0) and trailers, the end of the body."""

    def finished(self) -> None: ...

    def failed(self, reason: str, started: bool, sent: bool = True, unanswered: bool = False) -> None:
        """The exchange broke; ``sent`` False: not one byte reached the upstream (safe to send again);
        ``unanswered``: it was sent, and the upstream closed the connection before any response byte."""


class UpstreamError(Exception):
    """The upstream could not be reached or broke before answering."""


_CHUNKED_HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class _ChunkWalk:
    """llhttp's callbacks while it walks a chunked body: the data's size, the last data, the end.
    One Python call per chunk (``on_body``); where the chunks begin and end is not reported."""

    __slots__ = ("size", "last", "done")

    def __init__(self) -> None:
        self.size = 0
        self.last = b""  # the last data of the current read
        self.done = False

    def on_body(self, data: bytes) -> None:
        self.size += len(data)
        self.last = data

    def on_message_complete(self) -> None:
        self.done = True


class _Connection(Protocol):
    """One pooled connection; carries one exchange at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.handler: ResponseHandler | None = None
        self.exchange: Exchange | None = None  # what sent the request: it may send it once more
        self.on_connect: typing.Callable[[_Connection], None] | None = None
        self.reused = False
        self.idle_since = 0.0  # when it went back to the pool
        self._reset()

    def _reset(self) -> None:
        self.buffer = b""
        # head, length, chunk-size, chunk-data, chunk-crlf, trailer, until-close; framed
        self.state = "head"
        self.remaining = 0
        self.keep_alive = True
        self.started = False
        self.head_request = False
        self.walk: _ChunkWalk | None = None
        self.walker: httptools.HttpResponseParser | None = None

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        callback, self.on_connect = self.on_connect, None
        if callback is not None:
            callback(self)

    def send(self, data: bytes, handler: ResponseHandler, head_request: bool, exchange: Exchange | None = None) -> None:
        self._reset()
        self.handler = handler
        self.exchange = exchange
        self.head_request = head_request
        write_now(self.transport, data)

    def abort(self) -> None:
        """Drop the exchange: the upstream sees the connection close."""
        self.handler = None
        self.keep_alive = False
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.handler is None:
            self.transport.loseConnection()  # bytes nobody asked for
            return
        if self.state == "head":
            buffered = self.buffer + data if self.buffer else data  # a head most often comes in one read
            end = buffered.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffered
                if len(buffered) > MAX_HEAD:
                    self._fail("upstream response head too large")
                return
            head, data = buffered[:end], buffered[end + 4:]
            self.buffer = b""
            if head.startswith(b"HTTP/1.1 100 ") or head == b"HTTP/1.1 100":
                if data:
                    self.dataReceived(data)  # an interim response: the real head follows
                return
            if not self._parse_head(head):
                return
        self._body(data)

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            self._fail(f"bad upstream status line {lines[0][:80]!r}")
            return False
        status = int(parts[1])
        headers = []
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip(), value.strip()
            lower = name.lower()
            headers.append((lower, name, value))
            if lower in _FRAMING_NAMES:
                if lower == b"content-length":
                    length = int(value) if value.isdigit() else None
                elif lower == b"transfer-encoding":
                    chunked = value.lower().endswith(b"chunked")
                elif b"close" in value.lower():
                    self.keep_alive = False
        if parts[0] == b"HTTP/1.0":
            self.keep_alive = False
        if self.head_request or status in (204, 304) or 100 <= status < 200:
            self.state, length = "done", 0
        elif chunked:
            length = None
            if getattr(self.handler, "framed", False):
                self.state, self.walk = "framed", _ChunkWalk()
                self.walker = httptools.HttpResponseParser(self.walk)
                self.walker.feed_data(_CHUNKED_HEAD)
            else:
                self.state = "chunk-size"
        elif length is not None:
            self.state, self.remaining = "length", length
        else:
            self.state, self.keep_alive = "until-close", False
        self.started = True
        assert self.handler is not None
        self.handler.response_started(status, parts[2] if len(parts) > 2 else b"", headers, length, self.transport)
        if self.state == "done" or (self.state == "length" and self.remaining == 0):
            self._complete()
            return False
        return True

    def _framed(self, data: bytes) -> None:
        """A chunked body passed on as it came, llhttp finding where chunks and the body end."""
        walk, walker, handler = self.walk, self.walker, self.handler
        assert walk is not None and walker is not None and handler is not None
        before = walk.size
        walk.last = b""
        try:
            walker.feed_data(data)
        except httptools.HttpParserError:
            self._fail("bad chunked encoding from upstream")
            return
        # The read ends on a boundary after a whole SSE event when its last data ends the event and
        # only that data's CRLF follows: had the chunk gone on, llhttp would have taken those bytes
        # as data, and no size line ends in LF.  Other boundaries count as not whole, which is safe.
        last = walk.last
        whole = last.endswith(b"\n\n") and data.endswith(b"\r\n") and data.endswith(last, 0, len(data) - 2)
        handler.chunks(data, whole, walk.size - before, walk.done)
        if walk.done and handler is self.handler:
            self._complete()

    def _body(self, data: bytes) -> None:
        """Decode body framing; everything one read brings goes to the handler in one call."""
        if self.state == "framed":
            self._framed(data)
            return
        handler = self.handler
        if self.buffer:  # a partial chunk-size line from the last read
            data, self.buffer = self.buffer + data, b""
        out: list[bytes] = []
        pos, n = 0, len(data)
        while pos < n:
            state = self.state
            if state == "length" or state == "chunk-data":
                take = min(self.remaining, n - pos)
                out.append(data[pos:pos + take])
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    if state == "length":
                        self._deliver(handler, out)
                        self._complete()
                        return
                    self.state, self.remaining = "chunk-crlf", 2
            elif state == "until-close":
                out.append(data[pos:] if pos else data)
                break
            elif state == "chunk-crlf":
                take = min(self.remaining, n - pos)
                pos += take
                self.remaining -= take
                if self.remaining == 0:
                    self.state = "chunk-size"
            else:  # chunk-size or trailer: one line
                end = data.find(b"\r\n", pos)
                if end < 0:
                    self.buffer = data[pos:]
                    if len(self.buffer) > 4096:
                        self._fail("bad chunked encoding from upstream")
                        return
                    break
                line, pos = data[pos:end], end + 2
                if state == "trailer":
                    if not line:
                        self._deliver(handler, out)
                        self._complete()
                        return
                    continue
                try:
                    size = _chunk_size(line)
                except ValueError:
                    self._fail("bad chunk size from upstream")
                    return
                if size == 0:
                    self.state = "trailer"
                else:
                    self.state, self.remaining = "chunk-data", size
        self._deliver(handler, out)

    def _deliver(self, handler: ResponseHandler | None, out: list[bytes]) -> None:
        if out and handler is not None and handler is self.handler:
            handler.body(out[0] if len(out) == 1 else b"".join(out))

    def _complete(self) -> None:
        handler, self.handler = self.handler, None
        self.exchange = None
        self.state = "done"
        if self.keep_alive:
            self.pool._idle(self)
        else:
            self.transport.loseConnection()
        if handler is not None:
            handler.finished()

    def _fail(self, reason: str) -> None:
        handler, self.handler = self.handler, None
        self.keep_alive = False
        self.transport.abortConnection()
        if handler is not None:
            handler.failed(reason, self.started)

    def connectionLost(self, reason: Failure = error.ConnectionDone) -> None:  # type: ignore[assignment]
        self.pool._gone(self)
        handler, self.handler = self.handler, None
        if handler is None:
            return
        if self.state == "until-close":
            handler.finished()
        elif not self.started and (self.reused or (self.exchange is not None and not self.exchange.retried)):
            # Closed before any response byte: a kept-alive connection the child had already closed,
            # or a fresh one it accepted while dying.  Once more on a new connection: a live child
            # answers it, a dead one refuses it, and that is "not delivered" (safe to send again).
            if self.exchange is not None and not self.reused:
                self.exchange.taken = True  # a fresh connection: the child had taken the request
            self.pool._retry(self.exchange, handler)
        else:
            handler.failed(f"upstream closed the connection ({reason.getErrorMessage()})", self.started,
                           unanswered=not self.started)


class _Factory(ClientFactory):
    noisy = False

    def __init__(self, pool: UpstreamPool, on_connect: typing.Callable[[_Connection], None],
                 on_error: typing.Callable[[str], None]) -> None:
        self.pool = pool
        self.on_connect = on_connect
        self.on_error = on_error

    def buildProtocol(self, addr: object) -> _Connection:
        connection = _Connection(self.pool)
        connection.on_connect = self.on_connect
        return connection

    def clientConnectionFailed(self, connector: object, reason: Failure) -> None:
        self.on_error(f"cannot connect to the backend: {reason.getErrorMessage()}")


class Exchange:
    """One request in flight; :meth:`cancel` closes its connection.  The connection reports to the
    handler itself; the exchange is what can send the request again."""

    def __init__(self, pool: UpstreamPool, data: bytes, handler: ResponseHandler, head_request: bool) -> None:
        self.pool = pool
        self.data = data
        self.handler = handler
        self.head_request = head_request
        self.connection: _Connection | None = None
        self.cancelled = False
        self.retried = False  # sent once more after a connection closed before any response byte
        self.taken = False  # that connection was a fresh one: the child took the request, then closed

    def start(self, allow_reuse: bool = True) -> None:
        connection = self.pool._take() if allow_reuse else None
        if connection is not None:
            self._go(connection)
        else:
            self.pool.reactor.connectTCP(self.pool.host, self.pool.port,
                                         _Factory(self.pool, self._go, self._unreachable), CONNECT_TIMEOUT)

    def _go(self, connection: _Connection) -> None:
        if self.cancelled:
            connection.transport.loseConnection()
            return
        self.connection = connection
        connection.send(self.data, self.handler, self.head_request, self)

    def _unreachable(self, reason: str) -> None:
        if not self.cancelled:
            # Refused on the second try, after the child closed the first unanswered: it got the request.
            self.handler.failed(reason, False, sent=self.taken, unanswered=self.taken)

    def cancel(self) -> None:
        self.cancelled = True
        if self.connection is not None:
            self.connection.abort()


def _chunk_size(line: bytes) -> int:
    """A chunk-size line's size; most have no extension, and one ``int`` reads them."""
    try:
        return int(line, 16)
    except ValueError:
        return int(line.split(b";", 1)[0], 16)


def dechunk(framed: bytes) -> bytes:
    """The data of whole chunks (as :meth:`ResponseHandler.chunks` passes them), up to a last chunk."""
    out = []
    pos, n = 0, len(framed)
    while pos < n:
        end = framed.find(b"\r\n", pos)
        size = _chunk_size(framed[pos:end])
        if size == 0:
            break
        out.append(framed[end + 2:end + 2 + size])
        pos = end + size + 4
    return b"".join(out)


class UpstreamPool:
    """Kept-alive connections to one ``host:port``."""

    def __init__(self, reactor: IReactorTCP, clock: IReactorTime, host: str, port: int, max_idle: int) -> None:
        self.reactor = reactor
        self.clock = clock
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.idle: list[_Connection] = []

    def request(self, data: bytes, handler: ResponseHandler, head_request: bool = False) -> Exchange:
        """Send ``data`` (a whole request) and push the response to ``handler``."""
        exchange = Exchange(self, data, handler, head_request)
        exchange.start()
        return exchange

    def _take(self) -> _Connection | None:
        """The most recently used idle connection; those idle too long are closed on the way (no timer
        per request: the child closes its side after its own keep-alive time anyway)."""
        stale = self.clock.seconds() - POOL_IDLE_SECONDS
        while self.idle:
            connection = self.idle.pop()
            if connection.transport is None or not connection.connected:
                continue
            if connection.idle_since < stale:
                connection.transport.loseConnection()
                continue
            connection.reused = True
            return connection
        return None

    def _idle(self, connection: _Connection) -> None:
        if len(self.idle) >= self.max_idle:
            connection.transport.loseConnection()
            return
        connection.idle_since = self.clock.seconds()
        self.idle.append(connection)

    def _gone(self, connection: _Connection) -> None:
        if connection in self.idle:
            self.idle.remove(connection)

    def _retry(self, exchange: Exchange | None, handler: ResponseHandler) -> None:
        """A connection died before any response byte: once more, on a new one."""
        if exchange is not None and not exchange.cancelled:
            exchange.connection = None
            exchange.retried = True
            exchange.start(allow_reuse=False)
        else:
            handler.failed("upstream closed a reused connection", False)

    def close(self) -> None:
        for connection in list(self.idle):
            connection.transport.loseConnection()
        self.idle.clear()


class _Collect:
    """A handler that keeps the whole (small) response."""

    def __init__(self, done: defer.Deferred[tuple[int, bytes]]) -> None:
        self.done = done
        self.status = 0
        self.parts: list[bytes] = []

    def response_started(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes, bytes]],
                         length: int | None, producer: IPushProducer) -> None:
        self.status = status

    def body(self, data: bytes) -> None:
        self.parts.append(data)

    def finished(self) -> None:
        if not self.done.called:
            self.done.callback((self.status, b"".join(self.parts)))

    def failed(self, reason: str, started: bool, sent: bool = True, unanswered: bool = False) -> None:
        if not self.done.called:
            self.done.errback(UpstreamError(reason))


def fetch(pool: UpstreamPool, path: bytes, key: str, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
    """GET ``path`` with the child's key: (status, body), or UpstreamError / TimeoutError."""
    head = [b"GET %s HTTP/1.1" % path, b"Host: %s:%d" % (pool.host.encode(), pool.port)]
    if key:
        head.append(b"Authorization: Bearer " + key.encode())
    exchange: list[Exchange] = []
    done: defer.Deferred[tuple[int, bytes]] = defer.Deferred(lambda _: exchange and exchange[0].cancel())
    exchange.append(pool.request(b"\r\n".join(head) + b"\r\n\r\n", _Collect(done)))
    done.addTimeout(timeout, pool.clock)
    return done
