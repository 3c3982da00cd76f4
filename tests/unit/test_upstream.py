"""The lean upstream client's response parsing, over an in-memory transport."""

from __future__ import annotations

from fakes import TCPTransport
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from llamad.gateway.upstream import UpstreamPool, _Connection


class Handler:
    def __init__(self) -> None:
        self.status = 0
        self.headers: list = []
        self.length = None
        self.chunks: list[bytes] = []
        self.done = False
        self.failure: tuple[str, bool] | None = None

    def response_started(self, status, reason, headers, length, producer):
        self.status, self.headers, self.length = status, headers, length

    def body(self, data):
        self.chunks.append(data)

    def finished(self):
        self.done = True

    def failed(self, reason, started, sent=True, unanswered=False):
        self.failure = (reason, started)
        self.unanswered = unanswered


def exchange(*reads: bytes) -> tuple[Handler, _Connection, StringTransport]:
    pool = UpstreamPool(None, Clock(), "127.0.0.1", 1, max_idle=4)
    connection = _Connection(pool)
    transport = TCPTransport()
    connection.makeConnection(transport)
    handler = Handler()
    connection.send(b"GET / HTTP/1.1\r\n\r\n", handler, head_request=False)
    for data in reads:
        connection.dataReceived(data)
    return handler, connection, transport


def test_content_length_body_and_keep_alive():
    handler, connection, transport = exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", b"lo")
    assert handler.status == 200 and handler.length == 5 and b"".join(handler.chunks) == b"hello"
    assert handler.done and connection.pool.idle == [connection] and not transport.disconnecting


def test_chunked_body_split_anywhere_is_decoded_and_batched_per_read():
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\n\r\n"
    for cut in range(1, len(raw)):
        handler, connection, transport = exchange(raw[:cut], raw[cut:])
        assert b"".join(handler.chunks) == b"hello world" and handler.done, cut
        assert len(handler.chunks) <= 2  # one write per read


def test_interim_100_continue_in_the_same_read_is_skipped():
    handler, connection, transport = exchange(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert handler.status == 200 and b"".join(handler.chunks) == b"ok" and handler.done


def test_connection_close_is_not_pooled():
    handler, connection, transport = exchange(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert handler.done and connection.pool.idle == [] and transport.disconnecting


def test_a_bad_status_line_fails_before_the_response_started():
    handler, connection, transport = exchange(b"SPDY/3 200 OK\r\n\r\n")
    assert handler.failure is not None and handler.failure[1] is False


def test_bad_chunk_size_fails_after_the_response_started():
    handler, connection, transport = exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    assert handler.failure == ("bad chunk size from upstream", True)
