"""One write, sent at once when nothing is queued before it.

Twisted's ``transport.write`` queues the bytes, asks epoll to watch for
writability, sends them in a later ``doWrite``, then asks epoll to stop
watching: two ``epoll_ctl`` calls and a reactor round per write.  The proxy
writes once or twice per request on a socket that is almost always idle, so a
``send`` right away does the same job for a fraction of the CPU.  Anything the
socket does not take (or any transport other than plain TCP) goes the usual way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp

_PLAIN_TCP = (tcp.Server, tcp.Client)


def write_now(transport: Any, data: bytes) -> None:
    # Reads Twisted's private buffer state: tests/unit/test_immediate_write.py guards it (and setup.cfg's cap).
    if (type(transport) in _PLAIN_TCP and transport.connected and not transport.disconnecting
            and not transport._tempDataLen and transport.offset == len(transport.dataBuffer)):
        try:
            sent = transport.socket.send(data)
        except OSError:  # EAGAIN, or a failure that doWrite will find and report as connection lost
            sent = 0
        if sent == len(data):
            return
        data = data[sent:]
    transport.write(data)
