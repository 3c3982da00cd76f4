"""How much memory a model needs, and how much the machine has to give.

Placing many llama-server children by memory needs three numbers: an estimate
of each model's need read from its GGUF header before it ever runs
(:func:`estimate`), what a child really used last time to correct that estimate
(:func:`corrected_need`), and the budget to place them in (``auto_budget``, at
boot).

The estimate follows llama.cpp's own placement (``llama_model::load_tensors``,
``llama_kv_cache``, ``llama_context``) wherever the GGUF says enough:

* weights: the tensor sizes in the file.  With a GPU, llama.cpp numbers the
  repeating blocks ``0..n_layer-1`` and the output layer ``n_layer``; with
  ``-ngl g`` every index ``>= n_layer + 1 - g`` goes to the GPU (the *last*
  blocks, and the output layer as soon as ``g >= 1``; a negative ``g`` is
  "auto"/"all", estimated as all).  The input layer (``token_embd``,
  ``per_layer_token_embd``, ...) always stays on the host; a model with tied
  embeddings (no ``output.weight``) gets a copy of ``token_embd`` on the
  output layer's device.  Without a GPU the host holds every weight.
* KV cache: per layer, ``cells * (k_len * n_head_kv)`` elements for K and the
  same with ``v_len`` for V, in the cache type's bytes, on the device of the
  layer (so partial offload keeps the KV of host layers off the GPU).  Cells
  follow ``llama_context``: ``-c`` padded to 256, split over ``-np`` slots with
  each slot's share padded to 256 again (llama-server's default non-unified
  cache when ``-np`` is given).
* overhead: compute buffers, CUDA context and allocator slack are not in the
  GGUF; :data:`COMPUTE_FRACTION` of the counted weights plus
  :data:`COMPUTE_FIXED` covers them, and measured use corrects it later.

Approximated, and said so in :meth:`Estimate.explain` when it applies:
sliding-window layers (their pattern is per architecture in llama.cpp; the
GGUF's ``sliding_window_pattern`` is used when present, else a small table of
well-known architectures, else every layer is counted at full size), recurrent
state (Mamba-style ``ssm.*`` and RWKV ``wkv.*`` formulas, f32, one state per
slot), MLA (``key_length_mla`` present: a K-only latent cache), and missing
metadata (taken from tensor shapes, or assumed, with a note).  Not counted:
V-cache padding without flash attention, multimodal projectors and draft
models (separate files), speculative/MTP contexts.

The header comes from :mod:`llamad.fleet.gguf`; what a child used and what the
machine has, from :mod:`llamad.fleet.machine`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from llamad.fleet.gguf import GGUFHeader, MemoryEstimateError, read_gguf
from llamad.fleet.placement import MiB, format_bytes


COMPUTE_FIXED = 256 * MiB
"""Per-process allowance for compute buffers, the CUDA context and allocator slack."""

COMPUTE_FRACTION = 0.05
"""Further allowance proportional to the weights counted (bigger models, bigger intermediate tensors)."""

CTX_PAD = 256
"""llama_context pads the context, and each slot's share of it, to a multiple of this."""

UBATCH = 512
"""llama-server's default ``-ub``, which sizes the sliding-window cache."""

CACHE_TYPES: dict[str, tuple[int, int]] = {
    # name: (elements per block, bytes per block), as ggml stores them
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
    "iq4_nl": (32, 18),
}
"""Bytes per element of the KV cache types llama-server accepts for ``-ctk``/``-ctv``."""

# llama.cpp's default sliding-window pattern for architectures whose GGUF may
# carry ``sliding_window`` without ``sliding_window_pattern``: every n-th layer
# is full attention, the others use the window.
_SWA_PATTERNS: dict[str, int] = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma3n": 5,
    "cohere2": 4,
    "gpt-oss": 2,
    "exaone4": 4,
}

# Architectures whose later layers reuse the KV of earlier ones, with no
# ``shared_kv_layers`` key to say so: layers that own a KV cache.
_KV_LAYERS_FROM_START: dict[str, int] = {"gemma3n": 20}
_MAX_LAYERS = 512  # LLAMA_MAX_LAYERS: a bigger block_count is corruption
_BLOCK = re.compile(r"^(?:enc\.|dec\.)?blk\.(\d+)\.")
_INPUT_TENSORS = ("token_embd.", "pos_embd.", "token_types.", "per_layer_token_embd.")
_FIRST_LAYER_TENSORS = ("token_embd_norm.",)
_EVERY_LAYER_TENSORS = ("rope_freqs.", "rope_factors_long.", "rope_factors_short.")


@dataclass(frozen=True)
class Estimate:
    """A model's memory need on one device: the GPU, or the host when there is none."""

    weights: int
    kv_cache: int
    overhead: int
    device: str  # "GPU" or "host"
    layers_on_device: int  # of n_layer + 1 (the output layer counts as one, as llama.cpp's "offloaded N/M layers")
    n_layer: int
    kv_cells: int
    cache_types: tuple[str, str]
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        """Bytes to reserve for the model."""
        return self.weights + self.kv_cache + self.overhead

    def explain(self) -> str:
        """One line with the numbers, for logs and config errors."""
        line = (
            f"{self.device} need {format_bytes(self.total)} = weights {format_bytes(self.weights)} "
            f"({self.layers_on_device}/{self.n_layer + 1} layers) + KV cache {format_bytes(self.kv_cache)} "
            f"({self.kv_cells} cells, {self.cache_types[0]}/{self.cache_types[1]}) + overhead "
            f"{format_bytes(self.overhead)} ({COMPUTE_FRACTION:.0%} of weights + {format_bytes(COMPUTE_FIXED)})"
        )
        if self.notes:
            line += "; " + "; ".join(self.notes)
        return line


def _pad(n: int, to: int = CTX_PAD) -> int:
    return -(-n // to) * to


def _row_bytes(cache_type: tuple[int, int], elements: int) -> int:
    block, size = cache_type
    return -(-elements // block) * size


def _cache_type(name: str) -> tuple[int, int]:
    try:
        return CACHE_TYPES[name.lower()]
    except KeyError:
        raise MemoryEstimateError(
            f"unknown KV cache type {name!r} (one of {', '.join(CACHE_TYPES)})"
        ) from None


def _int(value: Any) -> int | None:
    """A count or length from the metadata; None when absent or nonsense (counts are never negative)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1 << 40:
        return None
    return int(value)


def _per_layer(value: Any, n_layer: int) -> list[int] | None:
    """A scalar or per-layer array as one int per layer (a short array repeats its last value)."""
    if isinstance(value, tuple):
        values = [v for v in (_int(x) for x in value) if v is not None]
        if not values:
            return None
        return (values + [values[-1]] * n_layer)[:n_layer]
    v = _int(value)
    return None if v is None else [v] * n_layer


@dataclass(frozen=True)
class _LayerKV:
    """Per layer: K and V widths (elements per cell), whether it slides, and recurrent-state bytes per slot."""

    k: int
    v: int
    swa: bool
    state: int


def _architecture(header: GGUFHeader, notes: list[str]) -> str:
    arch = header.metadata.get("general.architecture")
    if isinstance(arch, str) and arch:
        return arch
    for key in header.metadata:
        if key.endswith(".block_count"):
            arch = key[: -len(".block_count")]
            notes.append(f"general.architecture missing, assumed {arch!r}")
            return arch
    notes.append("general.architecture missing")
    return ""


def _block_count(header: GGUFHeader, arch: str, notes: list[str]) -> int:
    n = _int(header.metadata.get(f"{arch}.block_count"))
    if n is None or n <= 0:
        blocks = [int(m.group(1)) for t in header.tensors if (m := _BLOCK.match(t.name))]
        n = max(blocks) + 1 if blocks else 0
        notes.append(f"block_count missing, {n} layers from tensor names")
    if n > _MAX_LAYERS:
        raise MemoryEstimateError(f"{header.path}: {n} layers, more than llama.cpp loads ({_MAX_LAYERS})")
    return n


def _layers_kv(header: GGUFHeader, arch: str, n_layer: int, notes: list[str]) -> tuple[list[_LayerKV], int]:
    """Each layer's KV shape from the metadata (with fallbacks), and the sliding window."""
    md = header.metadata
    get = lambda key: md.get(f"{arch}.{key}")  # noqa: E731

    n_embd = _int(get("embedding_length"))
    if n_embd is None:
        embd = header.tensor("token_embd.weight")
        if embd is not None:
            n_embd = embd.dims[0]
            notes.append(f"embedding_length missing, {n_embd} from token_embd")
    heads = _per_layer(get("attention.head_count"), n_layer)
    heads_kv = _per_layer(get("attention.head_count_kv"), n_layer)
    if heads_kv is None and heads is not None:
        heads_kv = heads
        notes.append("head_count_kv missing, assumed head_count (no GQA)")

    # Recurrent layers: llama.cpp marks them by a zero KV head count, or by a full-attention interval.
    ssm_state = _int(get("ssm.state_size")) or 0
    ssm_inner = _int(get("ssm.inner_size")) or 0
    ssm_conv = _int(get("ssm.conv_kernel")) or 0
    ssm_groups = _int(get("ssm.group_count")) or 0
    wkv_head = _int(get("wkv.head_size")) or 0
    shortconv = _int(get("shortconv.l_cache")) or 0
    recurrent_arch = bool(ssm_state or ssm_inner or wkv_head or shortconv)
    state = 0
    if wkv_head:
        shift = _int(get("token_shift_count")) or 2
        state = 4 * (shift * (n_embd or 0) + (n_embd or 0) * wkv_head)
    elif shortconv:
        state = 4 * (n_embd or 0) * (shortconv - 1)
    elif recurrent_arch:
        state = 4 * (max(ssm_conv - 1, 0) * (ssm_inner + 2 * ssm_groups * ssm_state) + ssm_state * ssm_inner)
    interval = _int(get("full_attention_interval"))
    if recurrent_arch:
        notes.append("recurrent state approximated")

    def is_recurrent(il: int) -> bool:
        if not recurrent_arch:
            return False
        if interval:
            return (il + 1) % interval != 0
        if heads_kv is not None:
            return heads_kv[il] == 0
        return True

    # Recurrent, yet every layer has KV heads and no interval tells them apart: each layer has both (Falcon-H1).
    state_with_kv = state if recurrent_arch and not interval and heads_kv is not None and 0 not in heads_kv else 0

    # Head sizes: key_length/value_length, else n_embd / n_head as llama.cpp does.
    k_len = _int(get("attention.key_length"))
    v_len = _int(get("attention.value_length"))
    first_heads = next((h for h in heads or () if h), 0)
    if first_heads and n_embd:
        k_len = k_len if k_len is not None else n_embd // first_heads
        v_len = v_len if v_len is not None else n_embd // first_heads
    k_len_swa = _int(get("attention.key_length_swa")) or k_len
    v_len_swa = _int(get("attention.value_length_swa")) or v_len
    is_mla = bool(_int(get("attention.key_length_mla")) and _int(get("attention.value_length_mla")))
    if is_mla:
        notes.append("MLA: K-only latent cache")

    # Sliding window: which layers slide, and the window.
    n_swa = _int(get("attention.sliding_window")) or 0
    swa = [False] * n_layer
    if n_swa > 0:
        pattern = get("attention.sliding_window_pattern")
        if isinstance(pattern, tuple):
            swa = [bool(x) for x in (list(pattern) + [False] * n_layer)[:n_layer]]
        else:
            n_pattern = _int(pattern)
            if n_pattern is None:
                n_pattern = _SWA_PATTERNS.get(arch)
            if n_pattern is None:
                notes.append(f"sliding window {n_swa} with no known layer pattern: all layers counted at full size")
            else:
                swa = [n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer)]

    shared = _int(get("attention.shared_kv_layers"))
    kv_from_start = n_layer - shared if shared else _KV_LAYERS_FROM_START.get(arch, n_layer)

    missing_heads = heads is None and not recurrent_arch
    if missing_heads:
        notes.append("head_count missing: K/V widths from attn_k/attn_v tensors, else embedding_length")

    layers: list[_LayerKV] = []
    for il in range(n_layer):
        if is_recurrent(il):
            layers.append(_LayerKV(0, 0, False, state))
            continue
        if il >= kv_from_start:
            layers.append(_LayerKV(0, 0, False, 0))
            continue
        if missing_heads:
            wk = header.tensor(f"blk.{il}.attn_k.weight")
            wv = header.tensor(f"blk.{il}.attn_v.weight")
            k = wk.dims[1] if wk is not None and len(wk.dims) > 1 else (n_embd or 0)
            v = wv.dims[1] if wv is not None and len(wv.dims) > 1 else (n_embd or 0)
        else:
            n_kv = heads_kv[il] if heads_kv is not None else 0
            kl, vl = (k_len_swa, v_len_swa) if swa[il] else (k_len, v_len)
            k = (kl or 0) * n_kv
            v = 0 if is_mla else (vl or 0) * n_kv
        layers.append(_LayerKV(k, v, swa[il], state_with_kv))
    if missing_heads and not any(layer.k for layer in layers) and n_layer:
        notes.append("no KV shape found: KV cache counted as 0")
    return layers, n_swa


def estimate(
    path: str,
    gpu_layers: int,
    context: int,
    parallel: int,
    cache_type_k: str = "f16",
    cache_type_v: str = "f16",
    gpu: bool = True,
    *,
    kv_unified: bool = False,
) -> Estimate:
    """The memory llama-server will need for the model at ``path`` with these flags.

    ``gpu_layers`` is ``-ngl`` (negative: auto/all, estimated as all),
    ``context`` is ``-c`` (the total over all ``parallel`` slots; 0: the
    model's training context), ``parallel`` is ``-np``.  With ``gpu`` the
    figure is GPU memory (offloaded weights, their layers' KV cache, compute
    allowance); without, host memory for everything.  Raises
    :class:`MemoryEstimateError` for a bad file or cache type.
    """
    type_k, type_v = _cache_type(cache_type_k), _cache_type(cache_type_v)
    header = read_gguf(path)
    notes = list(header.notes)
    arch = _architecture(header, notes)
    n_layer = _block_count(header, arch, notes)

    # Placement: layer il (0..n_layer-1 repeating, n_layer the output layer) is on the GPU from i_gpu_start up.
    if not gpu:
        i_gpu_start = 0
    else:
        ngl = n_layer + 1 if gpu_layers < 0 else gpu_layers
        i_gpu_start = max(n_layer + 1 - ngl, 0)
    layers_on_device = n_layer + 1 - i_gpu_start if gpu else n_layer + 1
    output_on_device = n_layer >= i_gpu_start
    last_layer_on_device = n_layer - 1 >= i_gpu_start

    weights = 0
    for t in header.tensors:
        if not gpu:
            weights += t.n_bytes
            continue
        m = _BLOCK.match(t.name)
        if m is not None:
            on = min(int(m.group(1)), n_layer - 1) >= i_gpu_start
        elif t.name.startswith(_INPUT_TENSORS):
            on = False  # llama.cpp keeps the input layer on the host
        elif t.name.startswith(_FIRST_LAYER_TENSORS):
            on = 0 >= i_gpu_start
        elif t.name.startswith(_EVERY_LAYER_TENSORS):
            on = last_layer_on_device  # tiny, copied to every layer's device
        else:
            on = output_on_device
        if on:
            weights += t.n_bytes
    if gpu and output_on_device and header.tensor("output.weight") is None:
        embd = header.tensor("token_embd.weight")
        if embd is not None:
            weights += embd.n_bytes
            notes.append("tied embeddings: token_embd copied to the GPU for the output layer")

    # KV cells, as llama_context sizes them.
    if context <= 0:
        train = _int(header.metadata.get(f"{arch}.context_length"))
        if train:
            context = train
            notes.append(f"context 0: training context {train}")
        else:
            context = 4096
            notes.append("context 0 and context_length missing: assumed 4096")
    n_seq = max(1, parallel)
    n_ctx = _pad(context)
    if kv_unified:
        streams, cells = 1, n_ctx
    else:
        streams, cells = n_seq, max(_pad(n_ctx // n_seq), CTX_PAD)
    layers, n_swa = _layers_kv(header, arch, n_layer, notes)
    swa_cells = _pad(min(cells, n_swa * (n_seq if kv_unified else 1) + UBATCH)) if n_swa > 0 else cells

    kv_cache = 0
    for il, layer in enumerate(layers):
        if il < i_gpu_start:
            continue
        layer_cells = (swa_cells if layer.swa else cells) * streams
        kv_cache += layer_cells * (_row_bytes(type_k, layer.k) + _row_bytes(type_v, layer.v))
        kv_cache += layer.state * n_seq

    overhead = COMPUTE_FIXED + math.ceil(COMPUTE_FRACTION * weights)
    return Estimate(
        weights=weights,
        kv_cache=kv_cache,
        overhead=overhead,
        device="GPU" if gpu else "host",
        layers_on_device=layers_on_device,
        n_layer=n_layer,
        kv_cells=cells * streams,
        cache_types=(cache_type_k.lower(), cache_type_v.lower()),
        notes=tuple(notes),
    )


def projector_bytes(path: str) -> int:
    """The weights of a multimodal projector (``--mmproj``), which llama-server loads whole on its device.

    Not part of :func:`estimate` (another file); add it to the model's need.
    Its image-encoding compute buffer is not counted.
    """
    return sum(t.n_bytes for t in read_gguf(path).tensors)


def corrected_need(estimate_total: int, measured: int | None, margin: float = 0.1) -> int:
    """What to reserve for a model: its last measured use plus ``margin``, else the estimate.

    A measurement of 0 or less is treated as unknown (a process nvidia-smi
    could not see), not as "needs nothing".
    """
    if measured is None or measured <= 0:
        return estimate_total
    return math.ceil(measured * (1.0 + margin))
