"""What :func:`llamad.gateway.immediate_write.write_now` reads of Twisted's private TCP transport state still
means what it did: nothing queued is ``_tempDataLen == 0`` and ``offset == len(dataBuffer)``.

Twisted does not promise these attributes.  If a release renames them or changes what they hold,
these tests fail with a message saying so, rather than the gateway sending bytes out of order or
raising AttributeError on every response.  setup.cfg caps Twisted below the first release these
tests have not passed on.
"""

from __future__ import annotations

import select
import socket
import time
from typing import Any, Iterator

import pytest
import pytest_twisted
import twisted
from twisted.internet import abstract, defer, protocol, reactor, tcp
from twisted.internet.testing import MemoryReactor

from llamad.gateway import immediate_write
from llamad.gateway.immediate_write import write_now

STATE = ("connected", "disconnecting", "socket", "_tempDataLen", "_tempDataBuffer", "dataBuffer", "offset")


def require(holds: bool, what: str) -> None:
    """Fail with what changed, the Twisted release it changed in, and what to do about it."""
    if not holds:
        pytest.fail(f"Twisted {twisted.__version__}: {what}. llamad/gateway/immediate_write.py relies on it: adapt "
                    "write_now to this release, or keep twisted below it in setup.cfg", pytrace=False)


def nothing_queued(transport: Any) -> bool:
    """write_now's test for "no byte waits to be sent", as it reads it."""
    return not transport._tempDataLen and transport.offset == len(transport.dataBuffer)


Pair = tuple[tcp.Server, socket.socket, MemoryReactor]


def loopback(small_buffers: bool) -> Iterator[Pair]:
    """A real tcp.Server transport on a loopback connection, on a reactor in memory: the test calls
    doWrite where the event loop would, and reads what the peer got.  ``small_buffers``: socket
    buffers of a few KiB, set before connecting (the TCP window is agreed on then)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    peer = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if small_buffers:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # the accepted socket inherits it
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    peer.connect(listener.getsockname())
    sock, address = listener.accept()
    listener.close()
    sock.setblocking(False)
    peer.setblocking(False)
    fake = MemoryReactor()
    transport = tcp.Server(sock, protocol.Protocol(), address, None, 1, fake)  # type: ignore[arg-type]
    yield transport, peer, fake
    sock.close()
    peer.close()


@pytest.fixture
def pair() -> Iterator[Pair]:
    yield from loopback(small_buffers=False)


@pytest.fixture
def small_pair() -> Iterator[Pair]:
    yield from loopback(small_buffers=True)


def received(peer: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = peer.recv(1 << 20)
        except BlockingIOError:
            return data
        if not chunk:
            return data
        data += chunk


def test_a_tcp_transport_has_the_attributes_write_now_reads(pair: Pair) -> None:
    transport, _, _ = pair
    require(type(transport) in immediate_write._PLAIN_TCP, "tcp.Server is not one of immediate_write's plain TCP transports")
    require(issubclass(tcp.Client, abstract.FileDescriptor) and issubclass(tcp.Server, abstract.FileDescriptor),
            "tcp.Client and tcp.Server are no longer twisted.internet.abstract.FileDescriptor")
    missing = [name for name in STATE if not hasattr(transport, name)]
    require(not missing, f"a TCP transport has no {', '.join(missing)}")
    require(isinstance(transport._tempDataLen, int) and isinstance(transport.offset, int)
            and isinstance(transport.dataBuffer, bytes),
            "_tempDataLen and offset are no longer ints, or dataBuffer no longer bytes")
    require(bool(transport.connected) and not transport.disconnecting, "a new transport is not connected")
    require(nothing_queued(transport), "a new transport does not read as having nothing queued")


def test_a_queued_write_shows_in_tempdatalen_until_dowrite_sends_it(pair: Pair) -> None:
    transport, peer, fake = pair
    transport.write(b"queued")
    require(transport._tempDataLen == 6, "write() no longer counts what it queues in _tempDataLen")
    require(not nothing_queued(transport), "a queued write does not read as queued")
    require(received(peer) == b"", "write() sent at once (it used to wait for doWrite)")
    write_now(transport, b", then this")  # must not overtake the queued bytes
    require(received(peer) == b"", "write_now sent before bytes that were queued")
    transport.doWrite()
    require(received(peer) == b"queued, then this", "doWrite did not send the queue in order")
    require(nothing_queued(transport), "after doWrite sent everything, the transport does not read as idle")
    require(transport not in fake.getWriters(), "doWrite no longer stops watching for writability when done")


def test_write_now_sends_at_once_when_nothing_is_queued(pair: Pair) -> None:
    transport, peer, fake = pair
    write_now(transport, b"now")
    assert received(peer) == b"now"
    assert transport not in fake.getWriters() and nothing_queued(transport)


def test_a_partly_sent_buffer_shows_in_offset(small_pair: Pair) -> None:
    """A socket that takes part of doWrite's chunk: the rest is dataBuffer past offset, with
    _tempDataLen back at 0; write_now must see that and queue behind it."""
    transport, peer, fake = small_pair
    big = bytes(range(256)) * (8 << 10)  # 2 MiB: more than both buffers take
    write_now(transport, big)  # sends what fits, queues the rest
    require(transport._tempDataLen > 0, "the part of a write the socket did not take is not in _tempDataLen")
    transport.doWrite()
    require(transport._tempDataLen == 0 and 0 < transport.offset < len(transport.dataBuffer),
            "a chunk that doWrite sent in part is no longer dataBuffer[offset:] with _tempDataLen 0")
    require(not nothing_queued(transport), "bytes left in dataBuffer do not read as queued")
    write_now(transport, b"tail")
    got = received(peer)
    deadline = time.monotonic() + 30
    while transport in fake.getWriters() and time.monotonic() < deadline:
        select.select([peer], [transport.socket], [], 0.1)  # as the event loop would wait
        got += received(peer)
        transport.doWrite()
    select.select([peer], [], [], 0.1)
    require(got + received(peer) == big + b"tail", "bytes were lost or reordered around a partly sent buffer")
    require(nothing_queued(transport), "a drained transport does not read as idle")


def test_a_closing_transport_is_left_to_twisted(pair: Pair) -> None:
    transport, peer, _ = pair
    transport.write(b"last words")
    transport.loseConnection()
    require(bool(transport.disconnecting), "loseConnection with bytes queued no longer sets disconnecting")
    write_now(transport, b"!")
    require(received(peer) == b"", "write_now sent on a closing transport")


class Recorder(protocol.Protocol):
    def __init__(self, made: defer.Deferred[Any], data: bytearray) -> None:
        self.made = made
        self.data = data

    def connectionMade(self) -> None:
        self.made.callback(self.transport)

    def dataReceived(self, data: bytes) -> None:
        self.data.extend(data)


@pytest_twisted.ensureDeferred
async def test_both_ends_of_a_real_loopback_connection_are_plain_tcp() -> None:
    """On the running reactor: the client's and the server's transports are the types write_now
    takes the fast way, read as idle when idle, and keep the order of queued and sent bytes."""
    server_made: defer.Deferred[Any] = defer.Deferred()
    client_made: defer.Deferred[Any] = defer.Deferred()
    at_server, at_client = bytearray(), bytearray()
    server_factory = protocol.Factory.forProtocol(lambda: Recorder(server_made, at_server))
    port = reactor.listenTCP(0, server_factory, interface="127.0.0.1")  # type: ignore[attr-defined]
    client_factory = protocol.ClientFactory.forProtocol(lambda: Recorder(client_made, at_client))
    reactor.connectTCP("127.0.0.1", port.getHost().port, client_factory)  # type: ignore[attr-defined]
    made: list[Any] = []  # the transports, to close (an awaited Deferred keeps no result)
    try:
        client, server = await client_made, await server_made
        made += [client, server]
        for transport, kind in ((client, tcp.Client), (server, tcp.Server)):
            require(type(transport) is kind, f"a {kind.__name__} connection's transport is {type(transport)}")
            require(nothing_queued(transport), f"an idle {kind.__name__} does not read as having nothing queued")
        client.write(b"a")
        write_now(client, b"b")
        write_now(server, b"c")
        for _ in range(200):
            if at_server == b"ab" and at_client == b"c":
                break
            await deferLater(0.01)
        require((bytes(at_server), bytes(at_client)) == (b"ab", b"c"), "bytes were lost or reordered on loopback")
    finally:
        for transport in made:
            transport.loseConnection()
        await port.stopListening()


def deferLater(seconds: float) -> defer.Deferred[None]:
    from twisted.internet.task import deferLater as later

    return later(reactor, seconds)  # type: ignore[arg-type]
