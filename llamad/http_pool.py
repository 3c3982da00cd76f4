"""twisted.web's client connection pool without its log line for every connection it opens.

The pool's factory logs "Starting factory" and "Stopping factory" at info level for each new
connection: two lines per KV cache save or restore, and per Kubernetes call, that tell an operator
nothing.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.client import HTTPConnectionPool, _HTTP11ClientFactory


class _QuietFactory(_HTTP11ClientFactory):
    noisy = False


def quiet_pool(reactor: IReactorTime, persistent: bool = True) -> HTTPConnectionPool:
    """A pool that keeps up to 8 idle connections per host (``persistent``), or none."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = 8
    pool._factory = _QuietFactory
    return pool
