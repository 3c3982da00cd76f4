"""The demo model's sizes: the default is the small model as it always was; ``--size large`` is for benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader

from llamad import cli
from llamad.demo import N_EMBD, N_LAYER, SIZES, write_demo_model


def tensors(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    return {t.name: (tuple(int(n) for n in t.shape), t.tensor_type.name) for t in GGUFReader(path).tensors}


def test_the_default_is_the_small_model_byte_for_byte(tmp_path: Path) -> None:
    default = write_demo_model(str(tmp_path / "default.gguf"))
    small = write_demo_model(str(tmp_path / "small.gguf"), "small")
    assert Path(default).read_bytes() == Path(small).read_bytes()
    shapes = tensors(default)
    assert (N_EMBD, N_LAYER) == (64, 2) and len(shapes) == 2 + 9 * N_LAYER + 1
    assert shapes["blk.0.attn_q.weight"] == ((64, 64), "F32")
    assert all(kind == "F32" for _, kind in shapes.values())


def test_the_large_model_is_wider_and_half_precision(tmp_path: Path) -> None:
    large = SIZES["large"]
    shapes = tensors(write_demo_model(str(tmp_path / "large.gguf"), "large"))
    assert len(shapes) == 2 + 9 * large.n_layer + 1
    assert shapes["blk.0.ffn_up.weight"] == ((large.n_embd, large.n_ff), "F16")
    assert shapes["token_embd.weight"][1] == "F32"
    assert large.n_embd % large.n_head == 0 and (large.n_embd // large.n_head) % 32 == 0  # q8_0 caches fit


def test_every_size_keeps_the_shared_direction_as_strong(tmp_path: Path) -> None:
    """The embeddings' noise is as large, whatever the width: wider models still print text."""
    spread = {}
    for size in SIZES:
        embd = next(t for t in GGUFReader(write_demo_model(str(tmp_path / f"{size}.gguf"), size)).tensors
                    if t.name == "token_embd.weight")
        rows = np.asarray(embd.data, dtype=np.float32)
        assert (rows[:, 0] == 4.0).all()
        spread[size] = float(np.linalg.norm(rows[:, 1:], axis=1).mean())
    assert max(spread.values()) < 1.2 * min(spread.values()) and max(spread.values()) < 1.0


def test_the_command_takes_a_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "large.gguf"
    assert cli.main(["demo-model", str(path), "--size", "large"]) == 0
    assert capsys.readouterr().out.strip() == str(path)
    assert tensors(str(path))["blk.0.attn_q.weight"][0] == (SIZES["large"].n_embd,) * 2
    with pytest.raises(SystemExit):
        cli.main(["demo-model", str(path), "--size", "huge"])
