"""Every model's saved slots under ``{data_dir}/state/kv``: the disk work in threads, what is there in memory.

One :class:`Store` per data dir, shared by the models' :class:`llamad.kv.cache.KVCache`: it keeps
an index of the sealed files (so a snapshot does no I/O) and holds them to the disk bound across
all models, least recently used first.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from twisted.internet import defer, threads
from twisted.logger import Logger

from llamad.kv import disk
from llamad.kv.policy import Entry, plan_eviction

log = Logger(namespace="llamad.kv")

InThread = Callable[..., "defer.Deferred[Any]"]  # in_thread(f, *args): f(*args) off the reactor


def thread_runner(reactor: Any) -> InThread:
    """``f(*args)`` in the reactor's thread pool."""
    return lambda f, *args: threads.deferToThreadPool(reactor, reactor.getThreadPool(), f, *args)


class Store:
    """The files, and an index of the sealed ones by model.

    :param root: ``{data_dir}/state/kv``; each model has a directory in it.
    :param disk_limit: bytes all models' sealed files may take together; None: no bound.
    :param in_thread: runs a blocking call off the reactor (:func:`thread_runner`; synchronous in tests).
    """

    def __init__(self, root: str, disk_limit: int | None, in_thread: InThread) -> None:
        self.root = root
        self.disk_limit = disk_limit
        self.in_thread = in_thread
        self.index: dict[str, dict[str, Entry]] = {}  # directory name -> sealed entries, as last seen
        self._evictions = defer.DeferredLock()  # one pass at a time, whichever model's save asked

    def dir(self, model_id: str) -> str:
        return disk.model_dir(self.root, model_id)

    def _known(self, model_id: str) -> dict[str, Entry]:
        return self.index.setdefault(os.path.basename(self.dir(model_id)), {})

    # what is there, from memory

    def usage(self, model_id: str) -> tuple[int, int, int]:
        """Slots, tokens and bytes saved for ``model_id``."""
        entries = list(self._known(model_id).values())
        return len(entries), sum(e.sidecar.tokens for e in entries if e.sidecar), sum(e.size for e in entries)

    def total_bytes(self) -> int:
        return sum(e.size for known in self.index.values() for e in known.values())

    # the disk, in threads

    def ensure(self, model_id: str) -> defer.Deferred[int]:
        """Make the model's directory; fires with the bytes free there, or fails with OSError."""
        return self.in_thread(disk.ensure_dir, self.dir(model_id))

    def scan(self, model_id: str) -> defer.Deferred[disk.Listing]:
        def scanned(listing: disk.Listing) -> disk.Listing:
            known = self._known(model_id)
            known.clear()
            known.update((e.name, e) for e in listing.entries if e.sealed)
            return listing

        return self.in_thread(disk.scan, self.dir(model_id)).addCallback(scanned)

    def verify(self, model_id: str, entry: Entry) -> defer.Deferred[bool]:
        return self.in_thread(disk.verify, self.dir(model_id), entry)

    def seal(self, model_id: str, name: str, fingerprint: str, slot: int, tokens: int, written: int,
             now: float) -> defer.Deferred[Entry]:
        def sealed(entry: Entry) -> Entry:
            self._known(model_id)[entry.name] = entry
            return entry

        return self.in_thread(disk.seal, self.dir(model_id), name, fingerprint, slot, tokens, written,
                              now).addCallback(sealed)

    def touch(self, model_id: str, entry: Entry, now: float) -> defer.Deferred[Entry]:
        def touched(new: Entry) -> Entry:
            self._known(model_id)[new.name] = new
            return new

        return self.in_thread(disk.touch, self.dir(model_id), entry, now).addCallback(touched)

    def remove(self, model_id: str, names: list[str]) -> defer.Deferred[None]:
        known = self._known(model_id)
        for name in names:
            known.pop(name, None)
        return self.in_thread(disk.remove, self.dir(model_id), list(names))

    def evict(self) -> defer.Deferred[list[tuple[str, Entry]]]:
        """Hold every model's files to ``disk_limit``: fires with what went (nothing without a limit)."""
        if self.disk_limit is None:
            return defer.succeed([])
        return self._evictions.run(self.in_thread, self._evict_now, self.root, self.disk_limit).addCallback(
            self._evicted)

    @staticmethod
    def _evict_now(root: str, limit: int) -> tuple[list[tuple[str, Entry]], list[tuple[str, Entry]]]:
        """In a thread: scan every model's directory and delete the least recently used over ``limit``."""
        found = disk.scan_all(root)
        evicted = plan_eviction(found, limit)
        for directory, entry in evicted:
            disk.remove(os.path.join(root, directory), [entry.name])
        return found, evicted

    def _evicted(self, result: tuple[list[tuple[str, Entry]], list[tuple[str, Entry]]]) -> list[tuple[str, Entry]]:
        found, evicted = result
        for directory, entry in found:  # added to, not replaced: a model may have sealed a file meanwhile
            if entry.sealed:
                self.index.setdefault(directory, {})[entry.name] = entry
        for directory, entry in evicted:
            self.index.get(directory, {}).pop(entry.name, None)
            log.info("KV cache over its disk bound ({limit} bytes): deleted {dir}/{name} ({size} bytes), the least "
                     "recently used", limit=self.disk_limit, dir=directory, name=entry.name, size=entry.size)
        return evicted
