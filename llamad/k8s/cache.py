"""A list+watch cache of one kind of object, the way Kubernetes clients keep them.

List once, then watch from the list's resourceVersion.  A watch that ends is
resumed from the last resourceVersion seen (bookmarks included); a 410 Gone
means that version is compacted away, so list again.  Errors back off with
jitter, from ``BACKOFF_INITIAL`` doubling to ``BACKOFF_MAX``.
"""

from __future__ import annotations

import random as _random
from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from llamad.k8s.client import Gone, KubeClient

log = Logger(namespace="llamad.k8s")

BACKOFF_INITIAL = 0.1
BACKOFF_MAX = 10.0


class ListWatchCache(Service):
    def __init__(self, clock: IReactorTime, client: KubeClient, path: str,
                 on_change: Callable[[], None] = lambda: None,
                 random: Callable[[], float] = _random.random,
                 on_trouble: Callable[[str, str], None] = lambda what, why: None) -> None:
        """``on_trouble("restart" | "error", why)`` feeds the poller's metrics and log."""
        self.clock = clock
        self.client = client
        self.path = path
        self.on_change = on_change
        self.random = random
        self.on_trouble = on_trouble
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.resource_version = ""
        self.synced = False
        self.lists = 0
        self.watch_restarts = 0
        self.errors = 0
        self._loop: defer.Deferred[None] | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = defer.ensureDeferred(self._run())

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None:
            self._loop.cancel()
            self._loop.addErrback(lambda f: f.trap(defer.CancelledError))

    async def _run(self) -> None:
        delay = BACKOFF_INITIAL
        while self.running:
            try:
                if not self.resource_version:
                    await self._list()
                await self.client.watch(self.path, self.resource_version, self._event)
                self.watch_restarts += 1  # the stream ended: resume from where it was
                self.on_trouble("restart", "the watch ended")
                delay = BACKOFF_INITIAL
            except Gone:
                log.info("{path}: resourceVersion {rv} expired: listing again", path=self.path,
                         rv=self.resource_version)
                self.resource_version = ""
                self.watch_restarts += 1
                self.on_trouble("restart", "410 Gone")
            except defer.CancelledError:
                raise
            except Exception as e:
                self.errors += 1
                self.on_trouble("error", str(e))
                log.warn("{path}: {err}; retrying in {delay:.2f} s", path=self.path, err=e, delay=delay)
                await task.deferLater(self.clock, delay * (0.5 + 0.5 * self.random()))
                delay = min(BACKOFF_MAX, delay * 2)
                self.resource_version = ""  # the watch may have missed events: list again

    async def _list(self) -> None:
        listed = await self.client.request("GET", self.path)
        self.lists += 1
        self.objects = {_key(obj): obj for obj in listed.get("items", [])}
        self.resource_version = (listed.get("metadata") or {}).get("resourceVersion", "")
        self.synced = True
        self.on_change()

    def _event(self, kind: str, obj: dict[str, Any]) -> None:
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = version
        if kind in ("ADDED", "MODIFIED"):
            self.objects[_key(obj)] = obj
        elif kind == "DELETED":
            self.objects.pop(_key(obj), None)
        else:
            return  # BOOKMARK: only the resourceVersion moves
        self.on_change()


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")
