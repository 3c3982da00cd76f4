"""The child's slot API over HTTP: the ``get`` and ``post`` a :class:`llamad.kv.slots.SlotClient` takes.

On twisted.web's ``Agent``, one connection per call (a handful per start and stop): the
gateway's pooled client is a layer above this one.  Every call carries the child's key.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

from twisted.internet import defer
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IBodyProducer, IResponse
from zope.interface import implementer

from llamad.http_pool import quiet_pool
from llamad.kv.slots import Get, Post


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _Collect(Protocol):
    """The whole answer body (a few hundred bytes: slot listings and save reports)."""

    def __init__(self, done: defer.Deferred[bytes]) -> None:
        self.done = done
        self.parts: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


def _body(response: IResponse) -> defer.Deferred[tuple[int, bytes]]:
    done: defer.Deferred[bytes] = defer.Deferred()
    response.deliverBody(_Collect(done))
    return done.addCallback(lambda data: (response.code, data))


def child_http(reactor: Any, key: str, host: bytes = b"127.0.0.1") -> tuple[Get, Post]:
    """``get(port, path, timeout)`` and ``post(port, path, body, timeout)`` on the child at ``host``."""
    agent = Agent(reactor, pool=quiet_pool(reactor, persistent=False))

    def call(method: bytes, port: int, path: bytes, body: bytes | None, timeout: float
             ) -> defer.Deferred[tuple[int, bytes]]:
        headers = Headers({b"authorization": [b"Bearer " + key.encode()]} if key else {})
        if body is not None:
            headers.setRawHeaders(b"content-type", [b"application/json"])
        d = agent.request(method, b"http://%s:%d%s" % (host, port, path), headers,
                          _Body(body) if body is not None else None)
        d.addCallback(_body)
        d.addTimeout(timeout, reactor)
        return d

    def get(port: int, path: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        return call(b"GET", port, path, None, timeout)

    def post(port: int, path: bytes, body: Mapping[str, Any], timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        return call(b"POST", port, path, json.dumps(body).encode(), timeout)

    return get, post
