"""A tiny GGUF that llama.cpp really serves, so llamad runs with no download.

Llama architecture, a SentencePiece-style vocab with byte fallback (any input
tokenizes), a ChatML chat template, and fixed random weights shaped so that
generation yields printable text: every token embedding shares one direction
``u``, layers add little, and each output row's component along ``u`` sets
that token's base logit (letters likely, spaces now and then, control and
byte tokens never).

``size="large"`` is the same model twenty times wider, for benchmarks that
need a prompt to cost real time (a 2,000-token prompt takes over a second on
two CPU cores): with the small one, prompt evaluation is too quick to measure
what a kept KV cache saves.  Wide rather than deep, so that the prompt's cost
dominates the cost of a start, of a restored cache and of a short question.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    """The model's dimensions: the only thing a size changes."""

    n_embd: int
    n_head: int
    n_layer: int
    n_ff: int


SIZES = {
    "small": Shape(n_embd=64, n_head=4, n_layer=2, n_ff=128),  # the default: loads in milliseconds
    "large": Shape(n_embd=1280, n_head=20, n_layer=2, n_ff=5120),  # 107 MB; 2,000 tokens: 1.3-1.8 s on 2 cores
}
N_EMBD = SIZES["small"].n_embd
N_HEAD = SIZES["small"].n_head
N_LAYER = SIZES["small"].n_layer
N_FF = SIZES["small"].n_ff
TRAIN_CONTEXT = 4096
SEED = 20261122

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def vocab() -> tuple[list[str], list[int], list[float], list[float]]:
    """Tokens, their types, SPM scores, and the base logit each should get."""
    from gguf import TokenType

    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    types = [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL, TokenType.CONTROL]
    logits = [-30.0] * len(tokens)
    for byte in range(256):
        tokens.append(f"<0x{byte:02X}>")
        types.append(TokenType.BYTE)
        logits.append(-30.0)
    # "\u2581" is SentencePiece's space.
    for text in ["\u2581"] + [chr(c) for c in range(0x21, 0x7F)]:
        tokens.append(text)
        types.append(TokenType.NORMAL)
        if text == "\u2581":
            logits.append(1.0)
        elif text.islower():
            logits.append(0.0)
        elif text.isupper():
            logits.append(-2.5)
        else:
            logits.append(-4.0)
    scores = [0.0 if t != TokenType.NORMAL else -float(i) for i, t in enumerate(types)]
    return tokens, [int(t) for t in types], scores, logits


def write_demo_model(path: str, size: str = "small") -> str:
    """Write the demo model of ``size`` (a key of :data:`SIZES`) to ``path`` atomically; returns the path."""
    from gguf import GGUFWriter, PoolingType

    shape = SIZES[size]
    n_embd, n_layer, n_ff = shape.n_embd, shape.n_layer, shape.n_ff
    # The small model's weights are F32; the large one's matrices are F16, half the file and the reads.
    matrix_type = np.float32 if size == "small" else np.float16
    tokens, types, scores, base_logits = vocab()
    rng = np.random.default_rng(SEED)
    n_vocab = len(tokens)
    # RMSNorm makes the final hidden state ~sqrt(n_embd) * u, so divide that out.
    scale = 1.0 / np.sqrt(n_embd)
    # The noise a row adds grows with sqrt(width): shrink it so that a wider model keeps ``u`` as strong.
    narrow = np.sqrt(SIZES["small"].n_embd / n_embd)

    def noise(*shape: int, sigma: float) -> np.ndarray:
        return (rng.standard_normal(shape) * (sigma * narrow)).astype(np.float32)

    def matrix(*shape: int, sigma: float) -> np.ndarray:
        return noise(*shape, sigma=sigma).astype(matrix_type)

    embeddings = noise(n_vocab, n_embd, sigma=0.1)
    embeddings[:, 0] = 4.0
    output = noise(n_vocab, n_embd, sigma=0.12)
    output[:, 0] = np.array(base_logits, dtype=np.float32) * scale

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".demo-", suffix=".gguf", dir=directory)
    os.close(fd)
    try:
        w = GGUFWriter(tmp, "llama")
        w.add_name("llamad-demo")
        w.add_context_length(TRAIN_CONTEXT)
        w.add_embedding_length(n_embd)
        w.add_block_count(n_layer)
        w.add_feed_forward_length(n_ff)
        w.add_head_count(shape.n_head)
        w.add_head_count_kv(shape.n_head)
        w.add_rope_dimension_count(n_embd // shape.n_head)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_file_type(0 if matrix_type is np.float32 else 1)  # all F32, or mostly F16
        w.add_vocab_size(n_vocab)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_add_bos_token(True)
        w.add_add_eos_token(False)
        w.add_chat_template(CHAT_TEMPLATE)
        # Mean pooling, so that llama-server --embeddings (backend.embeddings) answers /v1/embeddings
        # with no --pooling flag; generation ignores it.
        w.add_pooling_type(PoolingType.MEAN)

        w.add_tensor("token_embd.weight", embeddings)
        for layer in range(n_layer):
            p = f"blk.{layer}."
            w.add_tensor(p + "attn_norm.weight", np.ones(n_embd, dtype=np.float32))
            for name in ("attn_q", "attn_k", "attn_v"):
                w.add_tensor(p + name + ".weight", matrix(n_embd, n_embd, sigma=0.2))
            w.add_tensor(p + "attn_output.weight", matrix(n_embd, n_embd, sigma=0.02))
            w.add_tensor(p + "ffn_norm.weight", np.ones(n_embd, dtype=np.float32))
            w.add_tensor(p + "ffn_gate.weight", matrix(n_ff, n_embd, sigma=0.2))
            w.add_tensor(p + "ffn_up.weight", matrix(n_ff, n_embd, sigma=0.2))
            w.add_tensor(p + "ffn_down.weight", matrix(n_embd, n_ff, sigma=0.02))
        w.add_tensor("output_norm.weight", np.ones(n_embd, dtype=np.float32))
        w.add_tensor("output.weight", output)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
