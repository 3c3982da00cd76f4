"""The KV cache kept across swaps and restarts of a real ``twistd -n llamad`` fleet, as users run it.

Two copies of the demo model under the ids ``a`` and ``b``, room for one (``fleet.max_loaded = 1``): a
~1,200-token prompt to ``a``, a request to ``b`` swaps ``a`` out (its slot saved), the same prompt to ``a``
again swaps it back (restored before it serves) and comes from the cache.  So does it after a SIGTERM drain
and a fresh boot.  A file that is corrupt, of the other model or of another context size, and what a save
cut short leaves, are deleted and never restored; the disk bound deletes the least recently used model's
files first; a client needs the admin role for the slot actions.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

from helpers import alive, metric, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODELS = ("a", "b")
CONTEXT = 4096  # two slots of 2,048 cells: room for the prompt and its answer
TIMEOUT = 300  # seconds for one request, a cold start and a swap included: the machine may be busy
INFERENCE, ADMIN = "kv-inference-key-0123456789", "kv-admin-key-01234567890123"


def long_prompt(seed: int = 7) -> str:
    """About 1,200 tokens of the demo model (its vocabulary is single characters)."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta"]
    return " ".join(rng.choice(words) for _ in range(200))


def fleet_toml(tmp_path: Path, demo_model: str, fleet: str = "", extra: str = "") -> str:
    """``a`` and ``b``, each its own copy of the demo model (its own fingerprint), room for one.

    The copies are made once per test: a file copied again would be another file (its mtime is in the
    fingerprint), and nothing saved before would fit it.
    """
    shelf = tmp_path / "models"
    shelf.mkdir(exist_ok=True)
    tables = ""
    for model_id in MODELS:
        path = shelf / f"{model_id}.gguf"
        if not path.exists():
            shutil.copyfile(demo_model, path)
        tables += f'[models.{model_id}]\nmodel = "{path}"\nmemory = "1GiB"\n'
    return f'[fleet]\nmemory_budget = "8GiB"\nmax_loaded = 1\nmin_resident = 0\n{fleet}\n{extra}\n{tables}'


def boot(start_llamad, tmp_path: Path, demo_model: str, data_dir: Path, context: int = CONTEXT, fleet: str = "",
         extra: str = ""):
    return start_llamad(backend={"context": context}, toml=fleet_toml(tmp_path, demo_model, fleet, extra),
                        wait="listening", data_dir=data_dir)


def note_children(daemon) -> None:
    """Remember each loaded model's child, so that teardown kills any left behind."""
    for facts in daemon.health()["models"].values():
        if facts.get("pid"):
            daemon.seen_children.add(facts["pid"])


def complete(daemon, model: str, text: str, key: str | None = None) -> tuple[int, int]:
    """A completion that must succeed with sane output: ``(prompt_tokens, cached_tokens)``."""
    headers = {"authorization": f"Bearer {key}"} if key else None
    status, body, _ = daemon.request("POST", "/v1/completions", headers=headers, timeout=TIMEOUT,
                                     body={"model": model, "prompt": text, "max_tokens": 4, "cache_prompt": True})
    assert status == 200, body
    answer = json.loads(body)
    choice = answer["choices"][0]
    assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop"), answer
    usage = answer["usage"]
    assert usage["completion_tokens"] >= 1, answer
    if not key:
        note_children(daemon)
    return usage["prompt_tokens"], usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)


def kv_dir(data_dir: Path, model_id: str) -> Path:
    return data_dir / "state" / "kv" / model_id


def files(data_dir: Path, model_id: str, suffix: str) -> list[str]:
    """The slot files (``.bin``) or sidecars (``.json``) of a model, by name."""
    path = kv_dir(data_dir, model_id)
    return sorted(n for n in os.listdir(path) if n.endswith(suffix)) if path.is_dir() else []


def sealed(data_dir: Path, model_id: str) -> list[str]:
    """The slot files that have their sidecar: what a restore may pick."""
    sidecars = set(files(data_dir, model_id, ".json"))
    return [n for n in files(data_dir, model_id, ".bin") if n[: -len(".bin")] + ".json" in sidecars]


def stop(daemon) -> None:
    """SIGTERM (the drain saves every loaded model), exit 0, and no child left."""
    assert daemon.stop(timeout=120) == 0, daemon.log()[-3000:]
    left = [pid for pid in daemon.seen_children if alive(pid)]
    assert left == [], f"children outlived llamad: {left}"


def restores(daemon, model_id: str) -> dict[str, float]:
    return {result: metric(daemon, "llamad_kv_restores_total", {"model": model_id, "result": result})
            for result in ("ok", "mismatch", "corrupt", "refused")}


def model_entry(daemon, model_id: str) -> dict[str, Any]:
    status, body, _ = daemon.request("GET", "/models")
    assert status == 200, body
    (entry,) = [m for m in json.loads(body)["data"] if m["id"] == model_id]
    return dict(entry)


def test_a_swap_out_and_back_keeps_the_prompt_cache(start_llamad, tmp_path, demo_model):
    data = tmp_path / "data"
    daemon = boot(start_llamad, tmp_path, demo_model, data)
    text = long_prompt()
    prompt_tokens, first = complete(daemon, "a", text)
    assert prompt_tokens >= 1000 and first == 0, (prompt_tokens, first)
    complete(daemon, "b", "Hello")  # room for one: a is saved, then stopped, for b
    wait_for(lambda: sealed(data, "a"), 60, "a's slot sealed on disk")
    again, reused = complete(daemon, "a", text)  # b saved and stopped, a started and restored
    assert again == prompt_tokens and reused >= 0.9 * prompt_tokens, (reused, prompt_tokens)

    kv = model_entry(daemon, "a")["llamad"]["kv_cache"]
    assert kv["slots"] >= 1 and kv["tokens"] >= prompt_tokens and kv["bytes"] > 0, kv
    assert metric(daemon, "llamad_kv_saves_total", {"model": "a"}) >= 1
    assert restores(daemon, "a")["ok"] >= 1
    assert metric(daemon, "llamad_model_swaps_total", {"model": "a"}) >= 1
    log = daemon.log()
    assert log.index("model a: saved 1 slots") < log.index("model a: restored 1 slots"), log[-3000:]
    stop(daemon)


def test_a_sigterm_drain_saves_and_a_fresh_boot_restores(start_llamad, tmp_path, demo_model):
    data = tmp_path / "data"
    first = boot(start_llamad, tmp_path, demo_model, data)
    text = long_prompt()
    prompt_tokens, cached = complete(first, "a", text)
    assert cached == 0
    stop(first)  # a is loaded: the drain saves its slot, sealed before llamad exits
    assert "model a: saved 1 slots" in first.log()
    assert len(sealed(data, "a")) == 1 and files(data, "b", ".bin") == []

    second = boot(start_llamad, tmp_path, demo_model, data)
    again, reused = complete(second, "a", text)
    assert again == prompt_tokens and reused >= 0.9 * prompt_tokens, (reused, prompt_tokens)
    assert restores(second, "a") == {"ok": 1, "mismatch": 0, "corrupt": 0, "refused": 0}
    assert model_entry(second, "a")["llamad"]["kv_cache"]["slots"] >= 1
    stop(second)


def test_a_corrupt_file_and_one_of_the_other_model_are_never_restored(start_llamad, tmp_path, demo_model):
    data = tmp_path / "data"
    first = boot(start_llamad, tmp_path, demo_model, data)
    text = long_prompt()
    prompt_tokens, _ = complete(first, "a", text)
    stop(first)
    (name,) = sealed(data, "a")
    sidecar = name[: -len(".bin")] + ".json"
    # The other model's directory gets a's pair, intact: sealed, but for another model file.
    kv_dir(data, "b").mkdir(mode=0o700, exist_ok=True)
    for each in (name, sidecar):
        shutil.copyfile(kv_dir(data, "a") / each, kv_dir(data, "b") / each)
    # a's own file: same size, some bytes flipped; only its checksum tells.
    path = kv_dir(data, "a") / name
    raw = bytearray(path.read_bytes())
    for at in (len(raw) // 3, len(raw) // 2, len(raw) - 16):
        raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))

    second = boot(start_llamad, tmp_path, demo_model, data)
    assert complete(second, "a", text) == (prompt_tokens, 0)  # it serves, from nothing
    assert complete(second, "b", text) == (prompt_tokens, 0)
    log = second.log()
    assert f"model a: deleted the saved KV cache {name}: its checksum differs" in log, log[-3000:]
    assert f"model b: deleted the saved KV cache {name}: saved for another model file" in log, log[-3000:]
    assert ": restored " not in log
    assert restores(second, "a") == {"ok": 0, "mismatch": 0, "corrupt": 1, "refused": 0}
    assert restores(second, "b") == {"ok": 0, "mismatch": 1, "corrupt": 0, "refused": 0}
    assert name not in files(data, "b", ".bin")  # b's own save (at the drain) may be there
    stop(second)
    assert name not in files(data, "a", ".bin") and name not in files(data, "b", ".bin")


def test_a_file_of_another_context_size_is_never_restored(start_llamad, tmp_path, demo_model):
    data = tmp_path / "data"
    first = boot(start_llamad, tmp_path, demo_model, data)
    text = long_prompt()
    prompt_tokens, _ = complete(first, "a", text)
    stop(first)
    (name,) = sealed(data, "a")

    wider = boot(start_llamad, tmp_path, demo_model, data, context=2 * CONTEXT)  # another context per slot
    assert complete(wider, "a", text) == (prompt_tokens, 0)
    log = wider.log()
    assert f"model a: deleted the saved KV cache {name}: saved for another model file, build or layout" in log, \
        log[-3000:]
    assert restores(wider, "a") == {"ok": 0, "mismatch": 1, "corrupt": 0, "refused": 0}
    assert name not in files(data, "a", ".bin")
    stop(wider)


def test_the_disk_bound_deletes_the_least_recently_used_model_first(start_llamad, tmp_path, demo_model):
    text = long_prompt()
    # How much one model's saved slot takes: the bound below is set from it.
    measure = boot(start_llamad, tmp_path, demo_model, tmp_path / "measure")
    complete(measure, "a", text)
    stop(measure)
    (measured,) = sealed(tmp_path / "measure", "a")
    one = (kv_dir(tmp_path / "measure", "a") / measured).stat().st_size
    bound = one + one // 2  # room for one model's files, not for two

    data = tmp_path / "data"
    daemon = boot(start_llamad, tmp_path, demo_model, data, fleet=f"kv_cache_disk = {bound}")
    complete(daemon, "a", text)
    complete(daemon, "b", text)  # a saved at the swap: within the bound, kept
    wait_for(lambda: sealed(data, "a"), 60, "a's slot sealed on disk")
    (kept,) = sealed(data, "a")
    size = (kv_dir(data, "a") / kept).stat().st_size
    assert size <= bound < 2 * size, (size, bound)
    stop(daemon)  # b saved at the drain, after a: two models' files are over the bound, a's are the older
    log = daemon.log()
    assert log.index("model a: saved 1 slots") < log.index("model b: saved 1 slots")
    assert f"over its disk bound ({bound} bytes): deleted a/{kept}" in log, log[-3000:]
    assert "deleted b/" not in log
    assert files(data, "a", ".bin") == [] and files(data, "a", ".json") == []
    assert len(sealed(data, "b")) == 1 and len(files(data, "b", ".bin")) == 1


def test_a_save_cut_short_is_deleted_and_never_restored(start_llamad, tmp_path, demo_model):
    # A real kill -9 of llama-server while it writes a slot file cannot be timed from outside: the write of
    # the demo model's slot takes a few milliseconds.  What it leaves when llamad dies with it is what is
    # made here: a file of the right name, cut short, and no sidecar (llamad writes that only once the child
    # answered the save).  While llamad lives, it deletes such a file itself (tests/integration/test_kv_cache.py
    # kills the child at its save).
    data = tmp_path / "data"
    first = boot(start_llamad, tmp_path, demo_model, data)
    text = long_prompt()
    prompt_tokens, _ = complete(first, "a", text)
    stop(first)
    (name,) = sealed(data, "a")
    directory = kv_dir(data, "a")
    fingerprint, slot, stamp = name[: -len(".bin")].split("-")
    cut = f"{fingerprint}-{slot}-{int(stamp, 16) + 1:x}.bin"  # the newest, as a later save's would be
    whole = (directory / name).read_bytes()
    (directory / cut).write_bytes(whole[: len(whole) // 2])
    for each in (name, name[: -len(".bin")] + ".json"):  # only the cut-short file is left to be restored
        os.unlink(directory / each)

    second = boot(start_llamad, tmp_path, demo_model, data)
    assert complete(second, "a", text) == (prompt_tokens, 0)
    log = second.log()
    assert f"model a: deleted the saved KV cache {cut}: no valid sidecar (cut short)" in log, log[-3000:]
    assert ": restored " not in log
    assert restores(second, "a") == {"ok": 0, "mismatch": 0, "corrupt": 1, "refused": 0}
    assert cut not in files(data, "a", ".bin")
    stop(second)


def test_the_slot_actions_need_the_admin_role(start_llamad, tmp_path, demo_model):
    keys = tmp_path / "keys.toml"
    keys.write_text(f'[keys.app]\nkey = "{INFERENCE}"\n\n[keys.ops]\nkey = "{ADMIN}"\nrole = ["admin"]\n')
    data = tmp_path / "data"
    daemon = boot(start_llamad, tmp_path, demo_model, data,
                  extra=f'[auth]\nenabled = true\nkeys_file = "{keys}"\n')
    complete(daemon, "a", long_prompt(), key=INFERENCE)  # a is loaded, its slot 0 or 1 holds the prompt
    note_children(daemon)

    def slots(action: str, key: str | None, slot: int = 0) -> tuple[int, dict[str, Any]]:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        status, body, _ = daemon.request("POST", f"/slots/{slot}?action={action}&model=a", headers=headers,
                                         body={"filename": "client-save.bin"}, timeout=TIMEOUT)
        return status, json.loads(body) if body else {}

    for action in ("save", "restore", "erase"):
        status, body = slots(action, INFERENCE)
        assert status == 403 and body["error"]["code"] == "insufficient_role", (action, status, body)
        assert slots(action, None)[0] == 401
    assert not (kv_dir(data, "a") / "client-save.bin").exists()
    status, body, _ = daemon.request("GET", "/slots?model=a", headers={"authorization": f"Bearer {INFERENCE}"})
    assert status == 200 and isinstance(json.loads(body), list)  # reading the slots is no slot action

    status, body = slots("save", ADMIN)  # passed through to a's child, which writes into llamad's directory
    assert status == 200 and body["filename"] == "client-save.bin", body
    assert (kv_dir(data, "a") / "client-save.bin").is_file()
    stop(daemon)
