"""The KV cache kept across children, with the real llama-server driven by a Supervisor in this process.

A ~1,200-token prompt, an unload (its slot saved), a start (restored before the child is ready): the same
prompt then comes from the cache.  A corrupt file, a file of another context size, and what a child killed
while saving leaves behind are never restored, and the model serves anyway.
"""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path
from typing import Any, Mapping

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from helpers import alive
from llamad import runfiles
from llamad.config import BackendConfig, SupervisorConfig
from llamad.kv.cache import KVCache
from llamad.kv.http import child_http
from llamad.kv.policy import SIDECAR_SUFFIX, SUFFIX
from llamad.kv.slots import SlotClient
from llamad.kv.store import Store, thread_runner
from llamad.supervisor import State, Supervisor

pytestmark = pytest.mark.integration

MODEL_ID = "demo"


def prompt() -> str:
    """About 1,200 tokens of the demo model (its vocabulary is single characters)."""
    rng = random.Random(7)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    return " ".join(rng.choice(words) for _ in range(200))


class Model:
    """A Supervisor of the demo model with a KV cache under ``data_dir``, and the child's API."""

    def __init__(self, data_dir: Path, demo_model: str, llama_server_bin: str, context: int = 4096) -> None:
        self.key = runfiles.new_key()
        self.get, self.post = child_http(reactor, self.key)
        self.backend = BackendConfig(command=llama_server_bin, model=demo_model, context=context, parallel=2,
                                     threads=2, start="lazy", ready_timeout=60)
        self.store = Store(str(data_dir / "state" / "kv"), None, thread_runner(reactor))
        self.slots = SlotClient(reactor, self.get, self.post_slots)
        self.kv = KVCache(reactor, self.store, MODEL_ID, self.backend, self.slots, budget=10.0)
        self.on_save: Any = None  # called with the child's pid as a save is asked
        self.sup = Supervisor(reactor, reactor, self.backend,
                              SupervisorConfig(stop_timeout=10, health_interval=0, crash_loop_limit=100),
                              probe=self.probe, key=self.key, run_dir=str(data_dir / "run"), kv=self.kv)
        self.pids: list[int] = []

    def probe(self, port: int, path: bytes, timeout: float) -> defer.Deferred[int]:
        return self.get(port, path, timeout).addCallback(lambda result: result[0])

    def post_slots(self, port: int, path: bytes, body: Mapping[str, Any],
                   timeout: float) -> defer.Deferred[tuple[int, bytes]]:
        d = self.post(port, path, body, timeout)
        if self.on_save is not None and path.endswith(b"action=save") and self.sup.pid:
            self.on_save(self.sup.pid)
        return d

    @property
    def dir(self) -> Path:
        return Path(self.kv.dir)

    def files(self, suffix: str = "") -> list[str]:
        return sorted(n for n in os.listdir(self.dir) if n.endswith(suffix)) if self.dir.exists() else []

    async def start(self) -> None:
        if not self.sup.running:
            self.sup.startService()
        self.sup.request_start()
        await self.sup.wait_ready()
        assert self.sup.pid is not None
        self.pids.append(self.sup.pid)

    async def unload(self) -> None:
        self.sup.unload()
        await self.sup.when_stopped()
        await self.kv.settled()

    async def complete(self, text: str) -> dict[str, Any]:
        assert self.sup.state == State.READY
        status, body = await self.post(self.sup.port, b"/v1/completions",
                                       {"prompt": text, "max_tokens": 4, "cache_prompt": True}, 120)
        assert status == 200, body
        return dict(json.loads(body))

    async def close(self) -> None:
        await self.sup.stopService()
        assert not [pid for pid in self.pids if alive(pid)], "a child outlived its stop"


def cached(answer: dict[str, Any]) -> tuple[int, int]:
    usage = answer["usage"]
    return usage["prompt_tokens"], usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)


@pytest_twisted.ensureDeferred
async def test_an_unload_keeps_the_prompt_cache_for_the_next_child(tmp_path: Path, demo_model: str,
                                                                     llama_server_bin: str) -> None:
    m = Model(tmp_path, demo_model, llama_server_bin)
    try:
        await m.start()
        text = prompt()
        prompt_tokens, first = cached(await m.complete(text))
        assert 1000 <= prompt_tokens <= 1500 and first == 0
        await m.unload()
        assert m.kv.stats.saves == 1 and len(m.files(SUFFIX)) == 1 and len(m.files(SIDECAR_SUFFIX)) == 1
        await m.start()
        assert m.pids[0] != m.pids[1] and m.kv.stats.restores["ok"] == 1
        again, reused = cached(await m.complete(text))
        assert again == prompt_tokens and reused >= 0.9 * prompt_tokens, (reused, prompt_tokens)
        # A restart saves and restores too: the third child has it as well.
        m.sup.restart()
        await m.sup.wait_ready(newer_than=m.sup.generation)
        assert m.kv.stats.saves == 2 and m.kv.stats.restores["ok"] == 2
        assert cached(await m.complete(text))[1] >= 0.9 * prompt_tokens
    finally:
        await m.close()


@pytest_twisted.ensureDeferred
async def test_a_corrupt_file_and_one_of_another_context_size_are_not_restored(
        tmp_path: Path, demo_model: str, llama_server_bin: str) -> None:
    m = Model(tmp_path, demo_model, llama_server_bin)
    text = prompt()
    try:
        await m.start()
        await m.complete(text)
        await m.unload()
        (name,) = m.files(SUFFIX)
        path = m.dir / name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size, one byte changed: only the checksum tells
        path.write_bytes(bytes(data))
        await m.start()
        assert m.kv.stats.restores == {"ok": 0, "mismatch": 0, "corrupt": 1, "refused": 0}
        assert name not in m.files() and cached(await m.complete(text))[1] == 0  # it serves, from nothing
        await m.unload()
        assert len(m.files(SUFFIX)) == 1  # this child's save
    finally:
        await m.close()
    wider = Model(tmp_path, demo_model, llama_server_bin, context=8192)  # another context per slot
    try:
        await wider.start()
        assert wider.kv.stats.restores["mismatch"] == 1 and wider.kv.stats.restores["ok"] == 0
        assert wider.files(SUFFIX) == [] and cached(await wider.complete(text))[1] == 0
    finally:
        await wider.close()


@pytest_twisted.ensureDeferred
async def test_a_child_killed_while_saving_leaves_nothing_that_is_restored(
        tmp_path: Path, demo_model: str, llama_server_bin: str) -> None:
    m = Model(tmp_path, demo_model, llama_server_bin)
    text = prompt()
    try:
        await m.start()
        await m.complete(text)
        killed: list[int] = []

        def kill(pid: int) -> None:
            killed.append(pid)
            os.kill(pid, signal.SIGKILL)

        m.on_save = kill
        await m.unload()
        assert killed and m.sup.state == State.STOPPED
        assert m.files(SIDECAR_SUFFIX) == []  # whatever the child wrote, llamad sealed nothing
        # And what a llamad killed along with it would leave: llama-server's file cut short, no sidecar.
        m.on_save = None
        await m.start()
        await m.complete(text)
        await m.unload()
        (name,) = m.files(SUFFIX)
        os.unlink(m.dir / (name[: -len(SUFFIX)] + SIDECAR_SUFFIX))
        os.truncate(m.dir / name, os.path.getsize(m.dir / name) // 2)  # restored, it would abort llama-server
        await m.start()
        assert m.kv.stats.restores["ok"] == 0 and m.kv.stats.restores["corrupt"] >= 1
        assert m.files() == [] and m.sup.state == State.READY
        assert cached(await m.complete(text))[1] == 0
    finally:
        await m.close()
