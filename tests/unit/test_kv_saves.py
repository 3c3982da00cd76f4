"""One model's KV cache kept across its children: real files in a temporary data dir, a child's slot API in
memory that writes and reads them as llama-server does, a Clock, and the disk work run inline."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

import pytest
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from llamad.config import BackendConfig
from llamad.kv import cache as cache_module
from llamad.kv import disk
from llamad.kv.cache import KVCache
from llamad.kv.policy import sidecar_name
from llamad.kv.slots import SlotClient
from llamad.kv.store import Store

pytestmark = pytest.mark.usefixtures("no_tracebacks")

MAGIC = b"fake-kv\n"


class FakeChild:
    """A child's slot API: each slot holds tokens; saves write them to the slot directory, restores read them.

    As llama-server does, ``GET /slots`` shows a slot's prompt once a request used it, not after a restore.
    """

    def __init__(self, directory: str | None, parallel: int = 2) -> None:
        self.dir = directory
        self.slots: dict[int, list[int]] = {i: [] for i in range(parallel)}
        self.used: set[int] = set()
        self.calls: list[bytes] = []
        self.refuse = False  # every restore: 400, as for a file of another layout
        self.hang_save: set[int] = set()  # slots whose save writes half a file and never answers
        self.short_write = False  # says it wrote more than it did (a disk that filled up)

    def use(self, slot: int, tokens: int) -> None:
        self.slots[slot] = list(range(tokens))
        self.used.add(slot)

    def get(self, port: int, path: bytes, timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        self.calls.append(path)
        listed = [{"id": i, "n_ctx": 2048, "is_processing": False,
                   **({"n_prompt_tokens": len(self.slots[i])} if i in self.used else {})} for i in self.slots]
        return defer.succeed((200, json.dumps(listed).encode()))

    def post(self, port: int, path: bytes, body: Mapping[str, Any],
             timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        self.calls.append(path)
        slot = int(path.split(b"/")[2].split(b"?")[0])
        assert self.dir is not None, "llamad gave this child no --slot-save-path"
        full = os.path.join(self.dir, body["filename"])
        if path.endswith(b"action=save"):
            data = MAGIC + json.dumps(self.slots[slot]).encode()
            if slot in self.hang_save:
                Path(full).write_bytes(data[: len(data) // 2])
                return defer.Deferred()
            Path(full).write_bytes(data[:-3] if self.short_write else data)
            return defer.succeed((200, json.dumps({"n_saved": len(self.slots[slot]), "n_written": len(data)}).encode()))
        try:
            data = Path(full).read_bytes()
        except FileNotFoundError:
            data = b""
        if self.refuse or not data.startswith(MAGIC):
            self.slots[slot] = []
            return defer.succeed((400, b'{"error": {"message": "Unable to restore slot"}}'))
        self.slots[slot] = json.loads(data[len(MAGIC):])
        return defer.succeed((200, json.dumps({"n_restored": len(self.slots[slot]), "n_read": len(data)}).encode()))


class Model:
    """A model's KVCache on a shared store, and its children."""

    def __init__(self, tmp: Path, store: Store, clock: Clock, model_id: str = "demo", context: int = 4096,
                 parallel: int = 2, budget: float = 5.0) -> None:
        model = tmp / f"{model_id}.gguf"
        if not model.exists():
            model.write_bytes(b"GGUF" + model_id.encode() * 100)
        command = tmp / "llama-server"
        command.write_bytes(b"build 1")
        self.backend = BackendConfig(command=str(command), model=str(model), context=context, parallel=parallel)
        self.child = FakeChild(None, parallel)
        self.slots = SlotClient(clock, self.get, self.post)
        self.kv = KVCache(clock, store, model_id, self.backend, self.slots, budget, env={})

    def get(self, *args: Any) -> defer.Deferred[tuple[int, bytes]]:
        return self.child.get(*args)

    def post(self, *args: Any) -> defer.Deferred[tuple[int, bytes]]:
        return self.child.post(*args)

    def spawn(self) -> FakeChild:
        """A new child, as the supervisor starts it: the directory made, then the restore once it answers."""
        self.child = FakeChild(self.kv.spawning(), len(self.child.slots))
        return self.child

    def start(self, clean: bool = False) -> bool:
        self.spawn()
        d = self.kv.restore(1234, clean)
        assert d.called
        return bool(d.result)

    def stop(self) -> None:
        d = self.kv.save(1234)
        assert d.called and d.result is None


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_700_000_000)
    return clock


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(str(tmp_path / "state" / "kv"), None, lambda f, *args: defer.maybeDeferred(f, *args))


def files(model: Model) -> list[str]:
    return sorted(os.listdir(model.kv.dir))


def logged() -> list[str]:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "llamad.kv":
            from twisted.logger import formatEvent

            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    return lines


def test_slots_saved_before_a_stop_come_back_in_the_next_child(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    lines = logged()
    assert m.start() and m.child.dir == str(tmp_path / "state" / "kv" / "demo")
    m.child.use(0, 1200)
    m.child.use(1, 40)
    m.stop()
    assert len([f for f in files(m) if f.endswith(".bin")]) == 2
    assert len([f for f in files(m) if f.endswith(".json")]) == 2
    assert m.kv.snapshot()["slots"] == 2 and m.kv.snapshot()["tokens"] == 1240
    assert any("saved 2 slots, 1240 tokens" in line for line in lines)

    clock.advance(60)
    assert m.start()
    assert sorted(len(t) for t in m.child.slots.values()) == [40, 1200]
    stats = m.kv.snapshot()
    assert stats["restores"]["ok"] == 2 and stats["restored_tokens"] == 1240 and stats["saves"] == 1
    assert any("restored 2 slots, 1240 tokens" in line for line in lines)


def test_the_files_are_checked_while_the_child_loads(tmp_path: Path, store: Store, clock: Clock,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Chosen and checksummed at spawn: a child that answers is only sent the files, nothing read first."""
    m = Model(tmp_path, store, clock)
    assert m.start()
    m.child.use(0, 300)
    m.stop()
    checked: list[str] = []
    verify = disk.verify
    monkeypatch.setattr(disk, "verify", lambda path, entry: checked.append(entry.name) or verify(path, entry))
    m.spawn()
    assert len(checked) == 1 and m.child.calls == []
    d = m.kv.restore(1234, False)
    assert d.result is True and len(checked) == 1
    assert m.child.slots[0] == list(range(300))


def test_empty_slots_are_not_saved(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.stop()
    assert files(m) == [] and m.child.calls == [b"/slots"]


def test_a_clean_start_restores_nothing_but_its_saves_count(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    m.stop()
    assert m.start(clean=True)
    assert m.child.slots[0] == [] and not any(b"restore" in c for c in m.child.calls)
    m.child.use(1, 7)
    m.stop()  # the clean child's fingerprint is known: it saves
    assert m.kv.snapshot()["slots"] == 2


def test_a_slot_saved_again_replaces_the_file_it_was_restored_from(tmp_path: Path, store: Store,
                                                                    clock: Clock) -> None:
    m = Model(tmp_path, store, clock, parallel=2)
    m.start()
    m.child.use(0, 10)
    m.child.use(1, 5)
    m.stop()
    for before, after in ((10, 20), (20, 30)):
        clock.advance(10)
        m.start()
        (slot,) = [i for i, tokens in m.child.slots.items() if len(tokens) == before]
        m.child.use(slot, after)  # this prompt goes on; the other slot stays as it was restored
        m.stop()
    assert len([f for f in files(m) if f.endswith(".bin")]) == 2  # the latest of the one, the untouched other
    m.start()
    assert sorted(len(t) for t in m.child.slots.values()) == [5, 30]


def test_the_newest_saves_are_restored_at_most_parallel(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock, parallel=2)
    for tokens in (10, 20, 30):
        m.start(clean=True)  # a child that restored nothing: each save is a new pair of files
        m.child.use(0, tokens)
        m.child.use(1, tokens + 1)
        m.stop()
        clock.advance(10)
    assert len([f for f in files(m) if f.endswith(".bin")]) == 2  # the older ones could never be restored
    m.start()
    assert sorted(len(t) for t in m.child.slots.values()) == [30, 31]


def test_a_file_of_another_fingerprint_is_deleted_not_restored(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock, context=4096)
    m.start()
    m.child.use(0, 100)
    m.stop()
    other = Model(tmp_path, store, clock, context=8192)  # another context per slot: another layout
    lines = logged()
    assert other.start()
    assert other.child.slots[0] == [] and files(other) == []
    assert other.kv.snapshot()["restores"]["mismatch"] == 1
    assert any("saved for another model file, build or layout" in line for line in lines)


def test_a_rebuilt_server_or_a_new_model_file_restores_nothing(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    m.stop()
    Path(m.backend.command).write_bytes(b"build 22")
    m.start()
    assert m.child.slots[0] == [] and m.kv.snapshot()["restores"]["mismatch"] == 1


def test_a_corrupt_file_is_deleted_not_restored(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    m.child.use(1, 50)
    m.stop()
    bins = sorted(f for f in files(m) if f.endswith(".bin"))
    first = Path(m.kv.dir, bins[0])
    data = bytearray(first.read_bytes())
    data[-2] ^= 0xFF  # same size, other bytes: only the checksum tells
    first.write_bytes(bytes(data))
    lines = logged()
    assert m.start()
    assert sorted(len(t) for t in m.child.slots.values()) == [0, 50]
    assert bins[0] not in files(m) and sidecar_name(bins[0]) not in files(m)
    assert m.kv.snapshot()["restores"]["corrupt"] == 1 and m.kv.snapshot()["restores"]["ok"] == 1
    assert any("checksum differs" in line for line in lines)


def test_a_file_without_its_sidecar_is_deleted_not_restored(tmp_path: Path, store: Store, clock: Clock) -> None:
    # A child killed with SIGKILL in the middle of a save leaves llama-server's file and no sidecar.
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    m.stop()
    for name in files(m):
        if name.endswith(".json"):
            os.unlink(os.path.join(m.kv.dir, name))
    Path(m.kv.dir, ".x.json.tmp").write_bytes(b"{")  # a sidecar write cut short
    assert m.start()
    assert m.child.slots[0] == [] and files(m) == []
    assert m.kv.snapshot()["restores"]["corrupt"] == 1


def test_a_file_an_admin_saved_under_their_own_name_is_left_alone(tmp_path: Path, store: Store,
                                                                   clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    Path(m.kv.dir, "mine.bin").write_bytes(MAGIC + b"[1, 2, 3]")  # POST /slots/0?action=save {"filename": ...}
    m.child.use(0, 100)
    m.stop()
    assert m.start()
    assert m.child.slots[0] == list(range(100)) and "mine.bin" in files(m)
    [own] = [name for name in files(m) if name.endswith(".bin") and name != "mine.bin"]
    assert m.kv.snapshot()["slots"] == 1 and m.kv.snapshot()["bytes"] == os.path.getsize(os.path.join(m.kv.dir, own))


def test_a_truncated_file_is_deleted_not_restored(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    m.stop()
    (name,) = [f for f in files(m) if f.endswith(".bin")]
    os.truncate(os.path.join(m.kv.dir, name), 10)
    assert m.start()
    assert m.child.slots[0] == [] and files(m) == [] and not any(b"restore" in c for c in m.child.calls)


def test_a_refused_restore_is_reported_and_its_file_deleted(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    m.stop()
    child = m.spawn()
    child.refuse = True
    lines = logged()
    d = m.kv.restore(1234, False)
    assert d.result is False
    assert files(m) == [] and m.kv.snapshot()["restores"]["refused"] == 1
    assert any("refused the saved KV cache" in line for line in lines)


def test_a_slow_save_is_abandoned_at_the_budget_and_leaves_nothing(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock, budget=3.0)
    m.start()
    m.child.use(0, 100)
    m.child.use(1, 50)
    m.child.hang_save = {1}
    d = m.kv.save(1234)
    clock.advance(2.99)
    assert not d.called
    clock.advance(0.01)
    assert d.called and d.result is None
    stats = m.kv.snapshot()
    assert stats["saves_abandoned"] == 1 and stats["slots"] == 1  # slot 0's save was complete: kept
    assert len([f for f in files(m) if f.endswith(".bin")]) == 1  # slot 1's half file deleted


def test_a_file_shorter_than_the_child_said_is_not_kept(tmp_path: Path, store: Store, clock: Clock) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    m.child.short_write = True
    m.stop()
    assert files(m) == [] and m.kv.snapshot()["slots"] == 0


def test_a_full_disk_skips_the_save_with_a_warning(tmp_path: Path, store: Store, clock: Clock,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)
    monkeypatch.setattr(disk, "ensure_dir", lambda path: cache_module.MIN_FREE - 1)
    lines = logged()
    m.stop()
    assert files(m) == [] and m.child.calls[-1:] != [b"/slots"] and m.kv.snapshot()["saves_skipped"] == 1
    assert any("bytes free in" in line for line in lines)


def test_a_read_only_disk_skips_the_save_with_a_warning(tmp_path: Path, store: Store, clock: Clock,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    m = Model(tmp_path, store, clock)
    m.start()
    m.child.use(0, 100)

    def read_only(path: str) -> int:
        raise OSError(30, "Read-only file system", path)

    monkeypatch.setattr(disk, "ensure_dir", read_only)
    lines = logged()
    m.stop()
    assert m.kv.snapshot()["saves_skipped"] == 1 and any("Read-only file system" in line for line in lines)


def test_a_directory_that_cannot_be_made_turns_the_cache_off_for_that_child(tmp_path: Path, clock: Clock) -> None:
    (tmp_path / "state").write_bytes(b"a file where the directory should be")
    store = Store(str(tmp_path / "state" / "kv"), None, lambda f, *args: defer.maybeDeferred(f, *args))
    m = Model(tmp_path, store, clock)
    assert m.start() and m.child.dir is None  # no --slot-save-path: the child still starts and serves
    m.child.use(0, 100)
    m.stop()
    assert m.kv.snapshot()["saves_skipped"] == 1


def test_the_disk_bound_deletes_the_least_recently_used_across_models(tmp_path: Path, clock: Clock) -> None:
    store = Store(str(tmp_path / "state" / "kv"), None, lambda f, *args: defer.maybeDeferred(f, *args))
    a = Model(tmp_path, store, clock, model_id="a", parallel=1)
    b = Model(tmp_path, store, clock, model_id="b", parallel=1)
    a.start()
    a.child.use(0, 1000)
    a.stop()
    size = a.kv.snapshot()["bytes"]
    clock.advance(10)
    b.start()
    b.child.use(0, 1000)
    b.stop()
    clock.advance(10)
    a.start()  # a's file is used again: b's is now the least recently used
    store.disk_limit = size + 10
    clock.advance(10)
    c = Model(tmp_path, store, clock, model_id="c", parallel=1)
    c.start()
    c.child.use(0, 1000)
    c.stop()
    # c's save went over the bound: b's file went, then a's; c's newest stays.
    assert files(b) == [] and files(a) == [] and len(files(c)) == 2
    assert c.kv.snapshot()["disk_bytes"] == c.kv.snapshot()["bytes"] <= store.disk_limit
    store.disk_limit = 3 * size
    b.start()
    b.child.use(0, 500)
    b.stop()
    assert len(files(b)) == 2 and len(files(c)) == 2


def test_settled_waits_for_the_seals(tmp_path: Path, clock: Clock) -> None:
    jobs: list[tuple[Any, tuple[Any, ...], defer.Deferred[Any]]] = []

    def in_thread(f: Any, *args: Any) -> defer.Deferred[Any]:
        d: defer.Deferred[Any] = defer.Deferred()
        jobs.append((f, args, d))
        return d

    def run_all() -> None:
        while jobs:
            run_one()

    def run_one() -> None:
        f, args, d = jobs.pop(0)
        d.callback(f(*args))

    store = Store(str(tmp_path / "state" / "kv"), None, in_thread)
    m = Model(tmp_path, store, clock)
    m.spawn()
    started = m.kv.restore(1234, False)
    run_all()
    assert started.result is True
    m.child.use(0, 100)
    saved = m.kv.save(1234)
    while not saved.called:
        run_one()
    settled = m.kv.settled()
    assert jobs and not settled.called  # the stop goes on while the file is sealed
    run_all()
    assert settled.called and m.kv.snapshot()["slots"] == 1
