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


def quiet_pool(reactor: IReactorTime, persistent: bool = True, per_host: int = 8) -> HTTPConnectionPool:
    """A pool that keeps up to ``per_host`` idle connections per host (``persistent``), or none."""
    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = per_host
    pool._factory = _QuietFactory
    return pool
