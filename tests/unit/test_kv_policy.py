"""Which saved slots to restore, keep and delete: the decisions alone, on entries made in memory."""

from __future__ import annotations

from llamad.kv.policy import (
    Entry, Sidecar, file_name, is_slot_file, plan_eviction, plan_prune, plan_restore, sidecar_name,
)

FP = "0123456789abcdef"
OTHER = "fedcba9876543210"


def entry(slot: int, saved_at: float, fingerprint: str = FP, size: int = 100, last_used: float | None = None,
          sealed: bool = True, sidecar_bytes: int | None = None) -> Entry:
    name = file_name(fingerprint, slot, int(saved_at * 1000))
    if not sealed:
        return Entry(name, size, None)
    sidecar = Sidecar(fingerprint, "0" * 64, tokens=10, bytes=size if sidecar_bytes is None else sidecar_bytes,
                      saved_at=saved_at, last_used=saved_at if last_used is None else last_used, slot=slot)
    return Entry(name, size, sidecar)


def test_names() -> None:
    name = file_name(FP, 1, 0x1a2b)
    assert name == f"{FP}-1-1a2b.bin" and is_slot_file(name)
    assert sidecar_name(name) == f"{FP}-1-1a2b.json"
    assert not is_slot_file("notes.txt") and not is_slot_file(f"{FP}-1-1a2b.json")


def test_a_sidecar_round_trips_and_a_broken_one_is_none() -> None:
    sidecar = entry(0, 5.0).sidecar
    assert sidecar is not None and Sidecar.from_json(sidecar.to_json()) == sidecar
    whole = sidecar.to_json()
    for broken in (whole[: len(whole) // 2], b"", b"[]", b"{}", whole.replace(b'"version": 1', b'"version": 2'),
                   whole.replace(b'"tokens": 10', b'"tokens": "10"'), whole.replace(b'"bytes": 100', b'"bytes": -1')):
        assert Sidecar.from_json(broken) is None


def test_restore_picks_this_fingerprint_newest_first_at_most_parallel() -> None:
    old, mid, new = entry(0, 1.0), entry(1, 2.0), entry(0, 3.0)
    plan = plan_restore([mid, old, new], FP, parallel=2)
    assert plan.candidates == (new, mid, old)  # checksummed in this order until 2 are good
    assert plan.limit == 2 and plan.mismatched == () and plan.corrupt == ()


def test_restore_sets_aside_other_fingerprints_and_files_without_a_valid_sidecar() -> None:
    good = entry(0, 1.0)
    other = entry(0, 9.0, fingerprint=OTHER)
    cut_short = entry(1, 8.0, sealed=False)  # a child killed mid-save: llama-server's file, no sidecar
    wrong_size = entry(1, 7.0, size=50, sidecar_bytes=100)  # truncated after it was sealed
    foreign = Entry(file_name(FP, 0, 7), 100, entry(0, 7.0, fingerprint=OTHER).sidecar)  # a sidecar of another file
    plan = plan_restore([good, other, cut_short, wrong_size, foreign], FP, parallel=4)
    assert plan.candidates == (good,)
    assert plan.mismatched == (other,)
    assert set(plan.corrupt) == {cut_short, wrong_size, foreign}


def test_prune_keeps_the_newest_parallel_of_this_fingerprint() -> None:
    entries = [entry(0, t) for t in (1.0, 2.0, 3.0, 4.0)]
    entries += [entry(0, 0.5, fingerprint=OTHER), entry(1, 9.0, sealed=False)]
    assert plan_prune(entries, FP, keep=2) == [entries[1], entries[0]]
    assert plan_prune(entries, FP, keep=10) == []


def test_eviction_deletes_the_least_recently_used_across_models_until_under_the_bound() -> None:
    a_old = entry(0, 1.0, size=400, last_used=1.0)
    a_used = entry(1, 2.0, size=400, last_used=50.0)  # restored recently: kept over newer saves
    b_new = entry(0, 10.0, size=400, last_used=10.0)
    b_writing = entry(1, 11.0, size=10_000, sealed=False)  # being written: neither counted nor deleted
    entries = [("a", a_old), ("a", a_used), ("b", b_new), ("b", b_writing)]
    assert plan_eviction(entries, limit=1200) == []
    assert plan_eviction(entries, limit=1000) == [("a", a_old)]
    assert plan_eviction(entries, limit=500) == [("a", a_old), ("b", b_new)]
    assert plan_eviction(entries, limit=0) == [("a", a_old), ("b", b_new), ("a", a_used)]
