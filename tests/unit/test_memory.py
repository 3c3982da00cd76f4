"""Memory needs from GGUF headers, measured use, and the boot-time budget, with no GPU."""

from __future__ import annotations

import os
import random
import stat
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from gguf import GGUFWriter
from twisted.internet import defer
from twisted.internet.task import Clock

from fakes import FakeProcessReactor
from llamad.fleet import gguf, machine, memory
from llamad.demo import write_demo_model
from llamad.fleet.gguf import MemoryEstimateError
from llamad.fleet.memory import COMPUTE_FIXED, COMPUTE_FRACTION
from llamad.fleet.placement import GiB, MiB

VOCAB = 100


def write_model(
    path: Path,
    arch: str = "llama",
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int | list[int] | None = 4,
    n_head_kv: int | list[int] | None = 4,
    tied: bool = False,
    metadata: Callable[[GGUFWriter], None] | None = None,
    omit: tuple[str, ...] = (),
    kv_widths: list[int] | None = None,
) -> dict[str, int]:
    """A llama-shaped F32 GGUF; returns each tensor's size in bytes.

    ``kv_widths`` sets each layer's attn_k/attn_v output width (default: from the head counts);
    ``omit`` drops standard metadata keys by their suffix (``"block_count"``, ``"architecture"``...).
    """
    sizes: dict[str, int] = {}
    w = GGUFWriter(str(path), arch)
    if "architecture" in omit:
        w.kv_data[0].pop("general.architecture")
    if "context_length" not in omit:
        w.add_context_length(8192)
    if "embedding_length" not in omit:
        w.add_embedding_length(n_embd)
    if "block_count" not in omit:
        w.add_block_count(n_layer)
    if n_head is not None:
        w.add_head_count(n_head)
    if n_head_kv is not None:
        w.add_head_count_kv(n_head_kv)
    w.add_token_list([f"t{i}" for i in range(VOCAB)])
    if metadata is not None:
        metadata(w)

    def tensor(name: str, *shape: int) -> None:
        data = np.zeros(shape, dtype=np.float32)
        sizes[name] = data.nbytes
        w.add_tensor(name, data)

    first_heads = (n_head[0] if isinstance(n_head, list) else n_head) or 4
    tensor("token_embd.weight", VOCAB, n_embd)
    for il in range(n_layer):
        if kv_widths is not None:
            width = kv_widths[il]
        else:
            kv = n_head_kv[il] if isinstance(n_head_kv, list) else (n_head_kv if n_head_kv is not None else first_heads)
            width = kv * (n_embd // first_heads)
        p = f"blk.{il}."
        tensor(p + "attn_norm.weight", n_embd)
        tensor(p + "attn_q.weight", n_embd, n_embd)
        if width:
            tensor(p + "attn_k.weight", width, n_embd)
            tensor(p + "attn_v.weight", width, n_embd)
        tensor(p + "attn_output.weight", n_embd, n_embd)
        tensor(p + "ffn_up.weight", 2 * n_embd, n_embd)
    tensor("output_norm.weight", n_embd)
    if not tied:
        tensor("output.weight", VOCAB, n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sizes


def layer_bytes(sizes: dict[str, int], il: int) -> int:
    return sum(n for name, n in sizes.items() if name.startswith(f"blk.{il}."))


def overhead(weights: int) -> int:
    return COMPUTE_FIXED + int(np.ceil(COMPUTE_FRACTION * weights))


# --------------------------------------------------------------------------- reading GGUF headers


def test_header_keeps_short_arrays_and_skips_long_ones(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    sizes = write_model(path, n_head_kv=[4, 2, 1, 4])
    header = gguf.read_gguf(str(path))
    assert header.metadata["general.architecture"] == "llama"
    assert header.metadata["llama.attention.head_count_kv"] == (4, 2, 1, 4)
    assert header.array_lengths["tokenizer.ggml.tokens"] == VOCAB
    assert header.metadata["tokenizer.ggml.tokens"] is None  # strings are walked, never decoded
    assert {t.name: t.n_bytes for t in header.tensors} == sizes


def test_a_big_vocabulary_is_skipped_not_decoded(tmp_path: Path) -> None:
    path = tmp_path / "big.gguf"
    tokens = [f"token-{i}" for i in range(200_000)]
    write_model(path, metadata=lambda w: w.add_array("tokenizer.ggml.merges", tokens))
    header = gguf.read_gguf(str(path))
    assert header.array_lengths["tokenizer.ggml.merges"] == 200_000


def test_split_model_sums_the_tensors_of_every_part(tmp_path: Path) -> None:
    first, second = tmp_path / "m-00001-of-00002.gguf", tmp_path / "m-00002-of-00002.gguf"
    sizes = write_model(first, metadata=lambda w: (w.add_uint16("split.no", 0), w.add_uint16("split.count", 2)))
    w = GGUFWriter(str(second), "llama")
    w.add_uint16("split.no", 1)
    w.add_uint16("split.count", 2)
    w.add_tensor("blk.4.ffn_up.weight", np.zeros((8, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    header = gguf.read_gguf(str(first))
    assert sum(t.n_bytes for t in header.tensors) == sum(sizes.values()) + 256

    second.unlink()
    with pytest.raises(MemoryEstimateError, match="m-00002-of-00002.gguf is missing"):
        gguf.read_gguf(str(first))


def test_a_tensor_type_newer_than_the_gguf_package_is_sized_by_offsets(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    sizes = write_model(path)
    data = bytearray(path.read_bytes())
    name = b"blk.1.attn_q.weight"
    at = data.index(name) + len(name)
    assert int.from_bytes(data[at:at + 4], "little") == 2  # n_dims
    type_at = at + 4 + 2 * 8
    data[type_at:type_at + 4] = (250).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    header = gguf.read_gguf(str(path))
    tensor = next(t for t in header.tensors if t.name == "blk.1.attn_q.weight")
    assert tensor.ggml_type == 250
    assert tensor.n_bytes == sizes["blk.1.attn_q.weight"]  # 16 KiB: already aligned, so no padding in the gap
    assert "unknown tensor types sized by file offsets" in memory.estimate(str(path), 99, 512, 1).explain()


@pytest.mark.parametrize("content", [
    b"",
    b"GGUF",
    b"not a gguf file at all, just some text that is long enough",
    b"GGUF" + (7).to_bytes(4, "little") + bytes(32),
    b"GGUF" + (3).to_bytes(4, "little") + (1 << 40).to_bytes(8, "little") + bytes(16),
], ids=["empty", "magic-only", "text", "bad-version", "absurd-count"])
def test_a_corrupt_file_is_a_one_line_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(MemoryEstimateError) as info:
        memory.estimate(str(path), 99, 4096, 1)
    message = str(info.value)
    assert str(path) in message and "\n" not in message


def test_a_truncated_download_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(MemoryEstimateError, match="runs past the end of the file"):
        memory.estimate(str(path), 99, 4096, 1)
    path.write_bytes(data[:200])  # too short for the counts it claims
    with pytest.raises(MemoryEstimateError, match="truncated"):
        memory.estimate(str(path), 99, 4096, 1)
    path.write_bytes(data[:1500])  # cut inside the vocabulary or the tensor infos
    with pytest.raises(MemoryEstimateError, match="header runs past the end of the file"):
        memory.estimate(str(path), 99, 4096, 1)


def test_a_garbled_metadata_type_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path)
    data = bytearray(path.read_bytes())
    key = b"llama.block_count"
    at = data.index(key) + len(key)
    data[at:at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(MemoryEstimateError, match="unknown value type 99"):
        memory.estimate(str(path), 99, 4096, 1)


def test_an_absurd_block_count_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, metadata=lambda w: w.add_uint32("llama.block_count", 1 << 30), omit=("block_count",))
    with pytest.raises(MemoryEstimateError, match="1073741824 layers, more than llama.cpp loads"):
        memory.estimate(str(path), 99, 4096, 1)


def test_random_damage_is_an_error_or_an_estimate_never_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, n_head_kv=[4, 2, 1, 4])
    data = path.read_bytes()
    header_end = data.index(b"output.weight") + 64
    damaged = tmp_path / "damaged.gguf"
    rng = random.Random(20261122)
    for _ in range(300):
        d = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(header_end)] = rng.randrange(256)
        damaged.write_bytes(bytes(d[:rng.randrange(len(d))] if rng.random() < 0.2 else d))
        try:
            memory.estimate(str(damaged), rng.choice([-1, 0, 2, 99]), 4096, 2, gpu=rng.random() < 0.5)
        except MemoryEstimateError as e:
            assert "\n" not in str(e)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(MemoryEstimateError, match="No such file"):
        memory.estimate(str(tmp_path / "absent.gguf"), 99, 4096, 1)
    with pytest.raises(MemoryEstimateError):
        memory.estimate(str(tmp_path), 99, 4096, 1)  # a directory


def test_an_unknown_cache_type_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path)
    with pytest.raises(MemoryEstimateError, match="unknown KV cache type 'q3_k'"):
        memory.estimate(str(path), 99, 4096, 1, cache_type_k="q3_k")


# --------------------------------------------------------------------------- weights


def test_full_offload_puts_everything_but_the_input_layer_on_the_gpu(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    sizes = write_model(path)
    gpu_weights = sum(sizes.values()) - sizes["token_embd.weight"]  # llama.cpp keeps the input layer on the host
    for ngl in (5, 99, -1):
        e = memory.estimate(str(path), ngl, 1024, 1)
        assert e.weights == gpu_weights
        assert e.layers_on_device == 5 and e.n_layer == 4
        assert e.overhead == overhead(gpu_weights)
        assert e.total == e.weights + e.kv_cache + e.overhead


def test_tied_embeddings_copy_token_embd_to_the_gpu(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    sizes = write_model(path, tied=True)
    e = memory.estimate(str(path), 99, 1024, 1)
    assert e.weights == sum(sizes.values())
    assert "tied embeddings" in e.explain()
    assert memory.estimate(str(path), 0, 1024, 1).weights == 0  # no output layer on the GPU, no copy


def test_partial_offload_takes_the_last_layers_and_the_output_layer(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    sizes = write_model(path)
    output = sizes["output.weight"] + sizes["output_norm.weight"]
    kv_per_layer = 1024 * 64 * 2 * 2  # cells * (4 heads * 16) * f16 * (K and V)

    one = memory.estimate(str(path), 1, 1024, 1)
    assert (one.weights, one.kv_cache, one.layers_on_device) == (output, 0, 1)

    # -ngl 3 of 4 blocks + output: i_gpu_start = 4 + 1 - 3 = 2, so blk.2, blk.3 and the output layer.
    three = memory.estimate(str(path), 3, 1024, 1)
    assert three.weights == output + layer_bytes(sizes, 2) + layer_bytes(sizes, 3)
    assert three.kv_cache == 2 * kv_per_layer
    assert three.layers_on_device == 3

    # -ngl 4 (= n_layer) still leaves blk.0 on the host, as llama.cpp does ("offloaded 4/5 layers").
    four = memory.estimate(str(path), 4, 1024, 1)
    assert four.weights == output + sum(layer_bytes(sizes, il) for il in (1, 2, 3))
    assert four.kv_cache == 3 * kv_per_layer

    none = memory.estimate(str(path), 0, 1024, 1)
    assert (none.weights, none.kv_cache, none.overhead) == (0, 0, COMPUTE_FIXED)
    assert "0/5 layers" in none.explain()


def test_without_a_gpu_the_host_holds_everything(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    sizes = write_model(path)
    for ngl in (0, 2, 99):
        e = memory.estimate(str(path), ngl, 1024, 1, gpu=False)
        assert e.device == "host"
        assert e.weights == sum(sizes.values())
        assert e.kv_cache == 4 * 1024 * 64 * 2 * 2
        assert e.explain().startswith("host need")


# --------------------------------------------------------------------------- KV cache


def test_kv_cache_by_cache_type(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, n_embd=128, n_head=4, n_head_kv=4)
    elements = 4 * 4096 * 128  # layers * cells * (heads * head size), for K and for V each
    f16 = memory.estimate(str(path), 99, 4096, 1)
    assert f16.kv_cache == 2 * elements * 2
    q8 = memory.estimate(str(path), 99, 4096, 1, "q8_0", "q8_0")
    assert q8.kv_cache == 2 * elements * 34 // 32
    mixed = memory.estimate(str(path), 99, 4096, 1, "F32", "q4_0")
    assert mixed.kv_cache == elements * 4 + elements * 18 // 32
    assert mixed.cache_types == ("f32", "q4_0")
    for name, (block, size) in memory.CACHE_TYPES.items():
        e = memory.estimate(str(path), 99, 4096, 1, name, name)
        assert e.kv_cache == 2 * elements * size // block


def test_gqa_shrinks_the_kv_cache(tmp_path: Path) -> None:
    mha, gqa = tmp_path / "mha.gguf", tmp_path / "gqa.gguf"
    write_model(mha, n_head=8, n_head_kv=8)
    write_model(gqa, n_head=8, n_head_kv=2)
    full = memory.estimate(str(mha), 99, 2048, 1).kv_cache
    assert full == 4 * 2048 * 64 * 2 * 2
    assert memory.estimate(str(gqa), 99, 2048, 1).kv_cache == full // 4


def test_per_layer_kv_head_counts(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, n_head=4, n_head_kv=[4, 1, 2, 0])
    e = memory.estimate(str(path), 99, 1024, 1)
    assert e.kv_cache == (4 + 1 + 2 + 0) * 16 * 1024 * 2 * 2
    # Partial offload counts only the GPU layers' share: blk.2 and blk.3.
    assert memory.estimate(str(path), 3, 1024, 1).kv_cache == 2 * 16 * 1024 * 2 * 2


def test_explicit_head_sizes_override_embd_over_heads(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"

    def head_sizes(w: GGUFWriter) -> None:
        w.add_key_length(32)
        w.add_value_length(24)

    write_model(path, n_head=4, n_head_kv=2, metadata=head_sizes)
    assert memory.estimate(str(path), 99, 1024, 1).kv_cache == 4 * 1024 * 2 * (32 + 24) * 2


def test_cells_follow_llama_context_padding_and_slots(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path)
    per_cell = 4 * 64 * 2 * 2
    # -c 1000 -np 3: n_ctx 1024, each slot 1024 // 3 = 341 padded to 512: 1536 cells (llama-server says so too).
    e = memory.estimate(str(path), 99, 1000, 3)
    assert e.kv_cells == 1536 and e.kv_cache == 1536 * per_cell
    assert memory.estimate(str(path), 99, 1000, 3, kv_unified=True).kv_cells == 1024
    assert memory.estimate(str(path), 99, 4096, 4).kv_cells == 4096
    assert memory.estimate(str(path), 99, 100, 8).kv_cells == 8 * 256  # every slot gets at least 256
    zero = memory.estimate(str(path), 99, 0, 1)
    assert zero.kv_cells == 8192 and "training context 8192" in zero.explain()


def test_sliding_window_layers_get_a_window_sized_cache(tmp_path: Path) -> None:
    # gemma3 uses a window on 5 of every 6 layers; with 7 layers only blk.5 is full attention.
    path = tmp_path / "g.gguf"
    write_model(path, arch="gemma3", n_layer=7, n_embd=128, n_head=4, n_head_kv=2,
                metadata=lambda w: w.add_sliding_window(300))
    row = 2 * 32 * 2 * 2  # (2 kv heads * 32) * f16 * (K and V)
    # The figures llama-server prints for this shape: -c 8192 -np 2 -> 2.00 + 3.00 MiB, -c 1000 -np 1 -> 0.25 + 1.50 MiB.
    e = memory.estimate(str(path), 99, 8192, 2)
    assert e.kv_cache == (1 * 8192 + 6 * 2 * 1024) * row == 5 * MiB
    assert memory.estimate(str(path), 99, 1000, 1).kv_cache == (1024 + 6 * 1024) * row
    # Unified: the window is per slot, so 4 * 300 + 512 padded to 1792 cells (llama-server: 1.00 + 2.62 MiB).
    assert memory.estimate(str(path), 99, 4096, 4, kv_unified=True).kv_cache == (4096 + 6 * 1792) * row


def test_sliding_window_pattern_from_metadata_and_unknown_patterns(tmp_path: Path) -> None:
    row = 4 * 16 * 2 * 2
    array = tmp_path / "array.gguf"

    def pattern(w: GGUFWriter) -> None:
        w.add_sliding_window(100)
        w.add_array("llama.attention.sliding_window_pattern", [True, True, False, True])

    write_model(array, metadata=pattern)
    assert memory.estimate(str(array), 99, 4096, 1).kv_cache == (4096 + 3 * 768) * row

    unknown = tmp_path / "unknown.gguf"
    write_model(unknown, metadata=lambda w: w.add_sliding_window(100))
    e = memory.estimate(str(unknown), 99, 4096, 1)
    assert e.kv_cache == 4 * 4096 * row  # every layer at full size: an over- not an underestimate
    assert "no known layer pattern" in e.explain()


def test_mla_caches_only_the_latent_k(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"

    def mla(w: GGUFWriter) -> None:
        w.add_key_length(72)
        w.add_value_length(64)
        w.add_uint32("llama.attention.key_length_mla", 48)
        w.add_uint32("llama.attention.value_length_mla", 32)

    write_model(path, n_head=4, n_head_kv=1, metadata=mla)
    e = memory.estimate(str(path), 99, 1024, 1)
    assert e.kv_cache == 4 * 1024 * 72 * 2
    assert "MLA" in e.explain()


def test_recurrent_state_per_slot(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"

    def ssm(w: GGUFWriter) -> None:
        w.add_uint32("llama.ssm.conv_kernel", 4)
        w.add_uint32("llama.ssm.inner_size", 128)
        w.add_uint32("llama.ssm.state_size", 16)

    write_model(path, n_head=0, n_head_kv=0, metadata=ssm, kv_widths=[0, 0, 0, 0])
    state = 4 * (3 * 128 + 16 * 128)
    e = memory.estimate(str(path), 99, 4096, 3)
    assert e.kv_cache == 4 * state * 3
    assert "recurrent state approximated" in e.explain()

    kv_layer = 1024 * 64 * 2 * 2
    hybrid = tmp_path / "hybrid.gguf"
    write_model(hybrid, n_head=4, n_head_kv=[0, 4, 0, 4], metadata=ssm)
    assert memory.estimate(str(hybrid), 99, 1024, 1).kv_cache == 2 * state + 2 * kv_layer
    assert memory.estimate(str(hybrid), 3, 1024, 1).kv_cache == state + kv_layer  # -ngl 3: blk.2 and blk.3

    # Attention in every layer and no way to tell layers apart: each carries both (Falcon-H1).
    both = tmp_path / "both.gguf"
    write_model(both, n_head=4, n_head_kv=4, metadata=ssm)
    assert memory.estimate(str(both), 99, 1024, 2).kv_cache == 4 * (2 * state + kv_layer)

    # A full-attention interval marks every 2nd layer as attention, the rest recurrent (Qwen3-Next).
    interval = tmp_path / "interval.gguf"
    write_model(interval, n_head=4, n_head_kv=4,
                metadata=lambda w: (ssm(w), w.add_uint32("llama.full_attention_interval", 2)))
    assert memory.estimate(str(interval), 99, 1024, 1).kv_cache == 2 * state + 2 * kv_layer


# --------------------------------------------------------------------------- missing metadata


def test_missing_head_count_kv_assumes_no_gqa(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, n_head=4, n_head_kv=None)
    e = memory.estimate(str(path), 99, 1024, 1)
    assert e.kv_cache == 4 * 1024 * 64 * 2 * 2
    assert "head_count_kv missing" in e.explain()


def test_missing_head_counts_use_the_attn_k_shapes(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, n_head=None, n_head_kv=None, kv_widths=[16, 32, 16, 32])
    e = memory.estimate(str(path), 99, 1024, 1)
    assert e.kv_cache == (16 + 32 + 16 + 32) * 1024 * 2 * 2
    assert "head_count missing" in e.explain()


def test_missing_block_count_embedding_and_architecture(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    sizes = write_model(path, omit=("block_count", "embedding_length"))
    e = memory.estimate(str(path), 99, 1024, 1)
    assert e.n_layer == 4
    assert e.kv_cache == 4 * 1024 * 64 * 2 * 2  # n_embd from token_embd, head size 64 / 4
    assert e.weights == sum(sizes.values()) - sizes["token_embd.weight"]
    assert "block_count missing" in e.explain() and "embedding_length missing" in e.explain()

    anonymous = tmp_path / "anon.gguf"
    write_model(anonymous, omit=("architecture",))
    e = memory.estimate(str(anonymous), 99, 1024, 1)
    assert e.kv_cache == 4 * 1024 * 64 * 2 * 2
    assert "general.architecture missing, assumed 'llama'" in e.explain()


def test_context_zero_without_a_training_context(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    write_model(path, omit=("context_length",))
    e = memory.estimate(str(path), 99, 0, 1)
    assert e.kv_cells == 4096 and "assumed 4096" in e.explain()


# --------------------------------------------------------------------------- the demo model


def test_the_demo_model_needs_a_sane_small_amount(tmp_path: Path) -> None:
    path = write_demo_model(str(tmp_path / "demo.gguf"))
    e = memory.estimate(path, 99, 4096, 4)
    assert 300 * 1024 < e.weights < 1 * MiB
    assert e.kv_cache == 2 * 4096 * 64 * 2 * 2  # 2 layers, 4 heads of 16, f16 K and V: 2 MiB
    assert COMPUTE_FIXED < e.total < 300 * MiB
    line = e.explain()
    assert "\n" not in line
    assert line.startswith("GPU need ") and "KV cache 2 MiB" in line and "4096 cells, f16/f16" in line
    # -c 1000 -np 3 on the demo: llama-server reports 0.75 MiB of KV over 1536 cells.
    assert memory.estimate(path, 99, 1000, 3, gpu=False).kv_cache == 786432


def test_projector_bytes(tmp_path: Path) -> None:
    path = tmp_path / "mmproj.gguf"
    w = GGUFWriter(str(path), "clip")
    w.add_tensor("v.blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.float16))
    w.add_tensor("mm.0.weight", np.zeros((64, 32), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert memory.projector_bytes(str(path)) == 32 * 32 * 2 + 64 * 32 * 4


def test_format_bytes() -> None:
    assert memory.format_bytes(512 * MiB) == "512 MiB"
    assert memory.format_bytes(3 * GiB // 2) == "1.5 GiB"


# --------------------------------------------------------------------------- measured use


def test_parse_compute_apps() -> None:
    text = "1234, 5678\n4321, [N/A]\n\n1234, 100\n99, 0\ngarbage\n"
    assert machine.parse_compute_apps(text) == {1234: 5778 * MiB, 99: 0}
    assert machine.parse_compute_apps("") == {}
    assert machine.parse_compute_apps("No running processes found\n") == {}


def collect(d: defer.Deferred[Any]) -> list[Any]:
    results: list[Any] = []
    d.addBoth(results.append)
    return results


class ProcessReactor(FakeProcessReactor):
    """The shared fake, also taking ``path`` positionally as ``getProcessOutputAndValue`` passes it."""

    def spawnProcess(self, protocol: Any, executable: str, args: list[str], env: dict[str, str] | None = None,
                     path: str | None = None, **kwargs: Any) -> Any:
        return super().spawnProcess(protocol, executable, args, env, path=path, **kwargs)


def test_gpu_memory_by_pid_through_a_fake_reactor() -> None:
    reactor = ProcessReactor()
    results = collect(machine.gpu_memory_by_pid(reactor, nvidia_smi="/usr/bin/nvidia-smi"))
    process = reactor.last
    assert process.argv == ["/usr/bin/nvidia-smi", "--query-compute-apps=pid,used_memory",
                            "--format=csv,noheader,nounits"]
    process.output(b"4242, 2048\n4243, [N/A]\n", fd=1)
    assert results == []
    process.exit(0)
    assert results == [{4242: 2 * GiB}]
    assert reactor.getDelayedCalls() == []  # the timeout was cancelled


def test_gpu_memory_by_pid_failures_are_none() -> None:
    reactor = ProcessReactor()
    failed = collect(machine.gpu_memory_by_pid(reactor, nvidia_smi="nvidia-smi"))
    reactor.last.output(b"NVIDIA-SMI has failed\n", fd=1)
    reactor.last.exit(9)
    assert failed == [None]

    hung = collect(machine.gpu_memory_by_pid(reactor, timeout=10.0, nvidia_smi="nvidia-smi"))
    reactor.advance(10.0)
    assert hung == [None]
    reactor.last.exit(0)  # finishing after the timeout changes nothing
    assert hung == [None]

    spawn_fails = ProcessReactor(fail_spawn=OSError("no such file"))
    assert collect(machine.gpu_memory_by_pid(spawn_fails, nvidia_smi="nvidia-smi")) == [None]


def test_gpu_memory_by_pid_with_an_injected_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, ...]] = []

    def run(executable: str, args: tuple[str, ...], env: dict[str, str], reactor: Any) -> defer.Deferred[Any]:
        calls.append((executable, args, reactor))
        return defer.succeed((b"7, 1024\n", b"", 0))

    clock = Clock()
    monkeypatch.setattr(machine.shutil, "which", lambda name: "/opt/bin/nvidia-smi")
    assert collect(machine.gpu_memory_by_pid(clock, run=run)) == [{7: GiB}]
    assert calls[0][0] == "/opt/bin/nvidia-smi" and calls[0][2] is clock

    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    assert collect(machine.gpu_memory_by_pid(clock, run=run)) == [None]
    assert len(calls) == 1  # nothing ran


def write_proc(proc: Path, pid: int, ppid: int, comm: str = "llama-server", rss_kb: int | None = 2048) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0\n")
    status = f"Name:\t{comm}\nPid:\t{pid}\nPPid:\t{ppid}\n"
    if rss_kb is not None:
        status += f"VmRSS:\t  {rss_kb} kB\n"
    (d / "status").write_text(status + "Threads:\t4\n")


def test_rss_bytes(tmp_path: Path) -> None:
    write_proc(tmp_path, 10, 1, rss_kb=2048)
    write_proc(tmp_path, 11, 1, rss_kb=None)  # a zombie or kernel thread has no VmRSS
    assert machine.rss_bytes(10, proc=str(tmp_path)) == 2 * MiB
    assert machine.rss_bytes(11, proc=str(tmp_path)) is None
    assert machine.rss_bytes(12, proc=str(tmp_path)) is None
    own = machine.rss_bytes(os.getpid())
    assert own is not None and own > MiB
    assert machine.parse_vmrss("VmRSS: oops\n") is None


def test_process_tree_pids(tmp_path: Path) -> None:
    write_proc(tmp_path, 100, 1, comm="setsid")
    write_proc(tmp_path, 101, 100, comm="odd) name (")
    write_proc(tmp_path, 102, 101)
    write_proc(tmp_path, 103, 1)
    (tmp_path / "self").mkdir()
    assert machine.process_tree_pids(100, proc=str(tmp_path)) == [100, 101, 102]
    assert machine.process_tree_pids(102, proc=str(tmp_path)) == [102]
    assert machine.process_tree_pids(999, proc=str(tmp_path)) == []
    assert machine.process_tree_pids(os.getpid())[0] == os.getpid()
    assert machine.parse_ppid("5 (a) b) R 42 5 5") == 42
    assert machine.parse_ppid("garbage") is None


def test_corrected_need() -> None:
    assert memory.corrected_need(5 * GiB, None) == 5 * GiB
    assert memory.corrected_need(5 * GiB, 0) == 5 * GiB  # nvidia-smi could not see it: unknown
    assert memory.corrected_need(5 * GiB, 1000) == 1100
    assert memory.corrected_need(5 * GiB, 2 * GiB, margin=0.5) == 3 * GiB


# --------------------------------------------------------------------------- budget


def test_parse_gpu_totals() -> None:
    assert machine.parse_gpu_totals("81559\n") == [81559 * MiB]
    assert machine.parse_gpu_totals("81559\n81559\n") == [81559 * MiB] * 2
    assert machine.parse_gpu_totals("[N/A]\n24576\n") == [24576 * MiB]
    assert machine.parse_gpu_totals("") == []


def test_parse_meminfo_and_cgroup_limits() -> None:
    meminfo = "MemTotal:       65798216 kB\nMemFree:         1234 kB\n"
    assert machine.parse_meminfo_total(meminfo) == 65798216 * 1024
    assert machine.parse_meminfo_total("MemFree: 1 kB\n") is None
    assert machine.parse_cgroup_limit("max\n") is None
    assert machine.parse_cgroup_limit("9223372036854771712\n") is None  # cgroup v1 "unlimited"
    assert machine.parse_cgroup_limit("2147483648\n") == 2 * GiB


def test_system_memory_takes_a_lower_cgroup_limit(tmp_path: Path) -> None:
    proc, cgroup = tmp_path / "proc", tmp_path / "cgroup"
    proc.mkdir()
    cgroup.mkdir()
    (proc / "meminfo").write_text("MemTotal:       16777216 kB\n")
    assert machine._system_memory(str(proc), str(cgroup)) == (16 * GiB, "/proc/meminfo")
    (cgroup / "memory.max").write_text("4294967296\n")
    assert machine._system_memory(str(proc), str(cgroup)) == (4 * GiB, "cgroup limit")
    (cgroup / "memory.max").write_text("max\n")
    assert machine._system_memory(str(proc), str(cgroup))[0] == 16 * GiB
    assert machine.total_system_memory() > 0


def fake_nvidia_smi(bin_dir: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_total_gpu_memory_and_auto_budget_with_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path / "bin", monkeypatch, 'echo 81920\n')
    assert machine.total_gpu_memory() == 80 * GiB
    assert machine.auto_budget(GiB) == (79 * GiB, "GPU memory 80.0 GiB (nvidia-smi) minus reserve 1.0 GiB")

    fake_nvidia_smi(tmp_path / "bin", monkeypatch, 'printf "40960\\n[N/A]\\n40960\\n"\n')
    assert machine.auto_budget(2 * GiB) == (78 * GiB, "GPU memory 80.0 GiB (2 GPUs, nvidia-smi) minus reserve 2.0 GiB")


def test_auto_budget_falls_back_to_system_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(machine, "_system_memory", lambda: (16 * GiB, "/proc/meminfo"))
    fake_nvidia_smi(tmp_path / "bin", monkeypatch, 'echo "NVIDIA-SMI has failed" ; exit 9\n')
    assert machine.total_gpu_memory() is None
    expected = (15 * GiB, "system memory 16.0 GiB (/proc/meminfo, no GPU) minus reserve 1.0 GiB")
    assert machine.auto_budget(GiB) == expected

    monkeypatch.setattr(machine.shutil, "which", lambda name: None)
    assert machine.total_gpu_memory() is None
    assert machine.auto_budget(GiB) == expected
    assert machine.auto_budget(32 * GiB)[0] == 0  # never negative


def test_a_hung_nvidia_smi_at_boot_times_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nvidia_smi(tmp_path / "bin", monkeypatch, "exec sleep 30\n")
    assert machine.total_gpu_memory(timeout=0.5) is None
