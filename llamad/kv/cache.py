"""One model's KV cache, kept on disk across its children: unload, swap and restart keep its prompts.

The supervisor calls :class:`KVCache` around each child's life: :meth:`~KVCache.spawning` at
spawn (the files to restore are checked while the child loads), :meth:`~KVCache.restore` once
the child answers and before anything is sent to it,
:meth:`~KVCache.save` before a stop llamad decided (never after a crash: that child answers
no more).  llama-server reads and writes the slot files itself; llamad names them, seals each
with a checksum once it is complete, and restores only sealed files of the running child's
fingerprint, because a file cut short aborts llama-server and a refused one can leave its cache
corrupt until it restarts.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Generator, Mapping

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamad.kv import disk
from llamad.kv.fingerprint import build_identity, file_identity, fingerprint, layout_of
from llamad.kv.policy import Entry, file_name, plan_prune, plan_restore
from llamad.kv.slots import SaveReport, SlotClient
from llamad.kv.store import Store

if TYPE_CHECKING:
    from llamad.config import BackendConfig

log = Logger(namespace="llamad.kv")

MIN_FREE = 64 << 20  # bytes free on the volume below which a save is skipped: a full disk is nobody's cache


@dataclass
class KVStats:
    """Counters since boot, for the metrics."""

    saves: int = 0  # stops whose slots were saved
    saved_slots: int = 0
    saved_tokens: int = 0
    saved_bytes: int = 0
    save_seconds: float = 0.0  # summed over saves
    saves_skipped: int = 0  # disk full or not writable, or the child's files unknown
    saves_abandoned: int = 0  # the budget ran out with slots left
    restores: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("ok", "mismatch", "corrupt", "refused"), 0))  # files, by result
    restored_tokens: int = 0
    restore_seconds: float = 0.0  # summed over starts that restored


class KVCache:
    """A model's saved slots, and what its supervisor asks of them.

    :param clock: the save budget's timer, and the times in the sidecars.
    :param store: the data dir's :class:`Store` (shared by every model).
    :param model_id: the model's directory under the store.
    :param backend: what the children run: the model, the command, the layout options.
    :param slots: the children's slot API.
    :param budget: seconds a save may hold up a stop.
    :param env: the environment the children start with (llama-server reads layout options from it).
    """

    def __init__(self, clock: IReactorTime, store: Store, model_id: str, backend: BackendConfig, slots: SlotClient,
                 budget: float, env: Mapping[str, str] | None = None) -> None:
        self.clock = clock
        self.store = store
        self.model_id = model_id
        self.backend = backend
        self.slots = slots
        self.budget = budget
        self.layout = layout_of(backend, os.environ if env is None else env)
        self.dir = store.dir(model_id)
        self.fingerprint = ""  # the running child's; "" when unknown (saves are skipped)
        self.usable = False  # the running child was given the directory
        self.stats = KVStats()
        self._writes = defer.DeferredLock()  # sidecars and deletes after a save, in order, before the next scan
        self._stamp = 0
        self._restored: dict[int, str] = {}  # the running child's slots, by the file each was restored from
        self._chosen: defer.Deferred[list[Entry]] | None = None  # the files for the starting child, being checked

    # the supervisor's calls

    def spawning(self) -> str | None:
        """A child starts: the directory for its ``--slot-save-path``, made now (llama-server exits at once if
        it is missing), and the files it will be given chosen and checksummed while it loads, so that the
        restore only sends them.

        Blocking, like the key file written at each spawn, and as quick (a stat, at most a mkdir).
        None: not usable for this child (saving and restoring are off until the next spawn).
        """
        self._chosen = None
        try:
            disk.ensure_dir(self.dir)
        except OSError as e:
            log.warn("model {id}: KV cache off for this start: {dir}: {err}", id=self.model_id, dir=self.dir,
                     err=e.strerror or e)
            self.usable = False
            return None
        self.usable = True
        self._chosen = self._writes.run(self._prepare)  # after the last save's seals, and any earlier start's check
        return self.dir

    def restore(self, port: int, clean: bool = False) -> defer.Deferred[bool]:
        """A fresh child answers: unless ``clean``, load the saved slots checked since its spawn.

        Fires False when the child refused a file (its cache may be corrupt: restart it clean),
        True otherwise, nothing to restore and every disk error included.  Never fails.
        """

        def failed(failure: Failure) -> bool:
            log.failure("model {id}: KV cache restore", failure, id=self.model_id)
            return False  # whatever the child was sent, a clean one is safe

        return self._restore(port, clean).addErrback(failed)

    def save(self, port: int) -> defer.Deferred[None]:
        """Save the child's slots before llamad stops it; fires within ``budget`` seconds, never fails.

        The files are sealed (checksum, sidecar) afterwards, while the stop goes on: they are complete
        once the child answered, and the next restore waits for their seals.
        """
        return self._save(port).addErrback(
            lambda failure: log.failure("model {id}: KV cache save", failure, id=self.model_id))

    @defer.inlineCallbacks
    def _prepare(self) -> Generator[Any, Any, list[Entry]]:
        """The starting child's fingerprint and the files to give it; [] when none (every error included).
        Run in turn with the disk writes: the last save's sidecars are written first."""
        self.fingerprint = ""
        try:
            self.fingerprint = yield self.store.in_thread(self._identify)
            return (yield self._choose()) if self.usable else []
        except OSError as e:
            log.warn("model {id}: no KV cache restored: {err}", id=self.model_id, err=e)
        except Exception:
            log.failure("model {id}: no KV cache restored", id=self.model_id)
        return []

    @defer.inlineCallbacks
    def _restore(self, port: int, clean: bool) -> Generator[Any, Any, bool]:
        started = self.clock.seconds()
        self._restored = {}
        pending, self._chosen = self._chosen or self._writes.run(self._prepare), None
        chosen: list[Entry] = yield pending
        if clean or not chosen:
            return True
        report = yield self.slots.restore(port, [e.name for e in chosen])
        by_name = {e.name: e for e in chosen}
        restored = [by_name[r.filename] for r in report.restored]
        self._restored = {r.slot: r.filename for r in report.restored}
        tokens = sum(r.tokens for r in report.restored)
        ms = (self.clock.seconds() - started) * 1000
        self.stats.restores["ok"] += len(restored)
        self.stats.restored_tokens += tokens
        self.stats.restore_seconds += ms / 1000
        now = self.clock.seconds()
        for entry in restored:
            self._write(self.store.touch, self.model_id, entry, now)
        if restored:
            log.info("model {id}: restored {n} slots, {tokens} tokens, {bytes} bytes in {ms:.0f} ms", id=self.model_id,
                     n=len(restored), tokens=tokens, bytes=sum(e.size for e in restored), ms=ms)
        if report.refused is not None:
            name, why = report.refused
            self.stats.restores["refused"] += 1
            log.warn("model {id}: the child refused the saved KV cache {name} ({why}): deleted; the child restarts "
                     "clean", id=self.model_id, name=name, why=why)
            self._write(self.store.remove, self.model_id, [name])
            return False
        return True

    @defer.inlineCallbacks
    def _save(self, port: int) -> Generator[Any, Any, None]:
        if not self.fingerprint or not self.usable:
            self.stats.saves_skipped += 1
            return
        started = self.clock.seconds()
        deadline = started + self.budget
        fingerprint = self.fingerprint
        try:
            free = yield self.store.ensure(self.model_id).addTimeout(self.budget, self.clock)
        except (OSError, defer.TimeoutError) as e:
            self.stats.saves_skipped += 1
            log.warn("model {id}: KV cache not saved: {dir}: {err}", id=self.model_id, dir=self.dir,
                     err=getattr(e, "strerror", None) or e)
            return
        if free < MIN_FREE:
            self.stats.saves_skipped += 1
            log.warn("model {id}: KV cache not saved: {free} bytes free in {dir}", id=self.model_id, free=free,
                     dir=self.dir)
            return
        report: SaveReport = yield self.slots.save_all(port, deadline - self.clock.seconds(),
                                                       lambda slot: self._name(fingerprint, slot),
                                                       self.layout.parallel)
        ms = (self.clock.seconds() - started) * 1000
        tokens = sum(s.tokens for s in report.saved)
        written = sum(s.bytes for s in report.saved)
        if report.saved:
            self.stats.saves += 1
            self.stats.saved_slots += len(report.saved)
            self.stats.saved_tokens += tokens
            self.stats.saved_bytes += written
            self.stats.save_seconds += ms / 1000
            log.info("model {id}: saved {n} slots, {tokens} tokens, {bytes} bytes in {ms:.0f} ms", id=self.model_id,
                     n=len(report.saved), tokens=tokens, bytes=written, ms=ms)
        if report.abandoned:
            self.stats.saves_abandoned += 1
            log.warn("model {id}: KV cache save abandoned after {budget:g} s (the save budget), {n} slots saved",
                     id=self.model_id, budget=self.budget, n=len(report.saved))
        for name, why in report.failed:
            log.warn("model {id}: KV cache slot not saved: {name}: {why}", id=self.model_id, name=name, why=why)
        # A slot saved anew holds what it was restored from, and more (or another prompt that replaced it).
        superseded = {s.filename: self._restored.pop(s.slot) for s in report.saved if s.slot in self._restored}
        self._write(self._seal, report, fingerprint, superseded)

    def settled(self) -> defer.Deferred[None]:
        """Fires once the files of every save so far are sealed or deleted (llamad's own shutdown waits)."""
        return self._writes.run(defer.succeed, None)

    def saved(self) -> dict[str, int]:
        """What is saved for this model now (``/health``, ``/models``): from memory, no I/O."""
        slots, tokens, size = self.store.usage(self.model_id)
        return {"slots": slots, "tokens": tokens, "bytes": size}

    def snapshot(self) -> dict[str, Any]:
        """What is saved for this model, and the counters: from memory, no I/O."""
        slots, tokens, size = self.store.usage(self.model_id)
        return {"slots": slots, "tokens": tokens, "bytes": size, "disk_bytes": self.store.total_bytes(),
                "fingerprint": self.fingerprint, **asdict(self.stats)}

    # the parts

    def _identify(self) -> str:
        """In a thread: the fingerprint of what a child starting now runs."""
        return fingerprint(file_identity(self.backend.model), build_identity(self.backend.command), self.layout)

    def _name(self, fingerprint: str, slot: int) -> str:
        self._stamp = max(self._stamp + 1, int(self.clock.seconds() * 1000))
        return file_name(fingerprint, slot, self._stamp)

    @defer.inlineCallbacks
    def _choose(self) -> Generator[Any, Any, list[Entry]]:
        """The files to restore: this fingerprint's, newest first, checksummed; the rest of the directory's
        leftovers deleted (another fingerprint, a file without its sidecar, a checksum that differs)."""
        listing = yield self.store.scan(self.model_id)
        plan = plan_restore(listing.entries, self.fingerprint, self.layout.parallel)
        for entries, result, why in ((plan.mismatched, "mismatch", "saved for another model file, build or layout"),
                                     (plan.corrupt, "corrupt", "no valid sidecar (cut short)")):
            for entry in entries:
                self.stats.restores[result] += 1
                log.info("model {id}: deleted the saved KV cache {name}: {why}", id=self.model_id, name=entry.name,
                         why=why)
        gone = [e.name for e in (*plan.mismatched, *plan.corrupt)] + listing.strays
        if gone:
            yield self.store.remove(self.model_id, gone)
        chosen: list[Entry] = []
        for entry in plan.candidates:
            if len(chosen) >= plan.limit:
                break
            if (yield self.store.verify(self.model_id, entry)):
                chosen.append(entry)
                continue
            self.stats.restores["corrupt"] += 1
            log.warn("model {id}: deleted the saved KV cache {name}: its checksum differs from its sidecar's",
                     id=self.model_id, name=entry.name)
            yield self.store.remove(self.model_id, [entry.name])
        return chosen

    @defer.inlineCallbacks
    def _seal(self, report: SaveReport, fingerprint: str,
              superseded: Mapping[str, str]) -> Generator[Any, Any, None]:
        """After a save: a sidecar for each complete file (which replaces the file its slot was restored
        from), the rest deleted, then the disk bound."""
        now = self.clock.seconds()
        drop = [name for name, _ in report.failed] + list(report.empty)
        for saved in report.saved:
            try:
                yield self.store.seal(self.model_id, saved.filename, fingerprint, saved.slot, saved.tokens,
                                      saved.bytes, now)
                if saved.filename in superseded:
                    drop.append(superseded[saved.filename])
            except (OSError, disk.CutShort) as e:
                log.warn("model {id}: KV cache slot {slot} not kept: {err}", id=self.model_id, slot=saved.slot, err=e)
                drop.append(saved.filename)
        try:
            if drop:
                yield self.store.remove(self.model_id, drop)
            listing = yield self.store.scan(self.model_id)
            beyond = plan_prune(listing.entries, fingerprint, self.layout.parallel)
            if beyond:
                yield self.store.remove(self.model_id, [e.name for e in beyond])
            yield self.store.evict()
        except OSError as e:
            log.warn("model {id}: KV cache directory: {err}", id=self.model_id, err=e)

    def _write(self, job: Any, *args: Any) -> None:
        """Queue disk work after the current one: in order, and before the next restore scans."""
        self._writes.run(job, *args).addErrback(self._write_failed)

    def _write_failed(self, failure: Failure) -> None:
        if failure.check(OSError):
            log.warn("model {id}: KV cache file: {err}", id=self.model_id, err=failure.value)
        else:
            log.failure("model {id}: KV cache file", failure, id=self.model_id)
