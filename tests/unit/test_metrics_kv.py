"""The KV cache's counters as ``llamad_kv_*`` families, read at scrape time."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from llamad.metrics import Metrics


def facts(saves: int = 0, ok: int = 0, tokens: int = 0, size: int = 0, disk: int = 0) -> dict:
    return {"slots": 1, "tokens": 10, "bytes": size, "disk_bytes": disk, "fingerprint": "f", "saves": saves,
            "saved_slots": saves, "saved_tokens": 0, "saved_bytes": 0, "save_seconds": 0.25,
            "saves_skipped": 1, "saves_abandoned": 0,
            "restores": {"ok": ok, "mismatch": 1, "corrupt": 0, "refused": 0},
            "restored_tokens": tokens, "restore_seconds": 0.5}


def samples(metrics: Metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(metrics.exposition().decode()) for s in f.samples}


def test_no_family_until_a_model_keeps_its_cache():
    assert not any(name.startswith("llamad_kv_") for name, _ in samples(Metrics()))


def test_each_models_counters_are_read_at_scrape_time():
    metrics = Metrics(per_model=True)
    now = {"a": facts(saves=2, ok=3, tokens=1200, size=600, disk=900), "b": facts(size=300, disk=900)}
    for model_id in now:
        metrics.watch_kv_cache(model_id, lambda model_id=model_id: now[model_id])
    got = samples(metrics)
    assert got[("llamad_kv_saves_total", (("model", "a"),))] == 2
    assert got[("llamad_kv_restores_total", (("model", "a"), ("result", "ok")))] == 3
    assert got[("llamad_kv_restores_total", (("model", "b"), ("result", "mismatch")))] == 1
    assert got[("llamad_kv_restored_tokens_total", (("model", "a"),))] == 1200
    assert got[("llamad_kv_seconds_total", (("model", "a"), ("step", "restore")))] == 0.5
    assert got[("llamad_kv_saves_skipped_total", (("model", "b"), ("why", "disk")))] == 1
    assert got[("llamad_kv_saved_bytes", (("model", "b"),))] == 300
    assert got[("llamad_kv_disk_bytes", ())] == 900
    now["a"] = facts(saves=5, ok=3, tokens=1200, size=600, disk=900)  # read again at the next scrape
    assert samples(metrics)[("llamad_kv_saves_total", (("model", "a"),))] == 5
