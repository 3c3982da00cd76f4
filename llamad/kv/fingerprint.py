"""What a saved KV cache is valid for: one short hash of the model, the server build and the KV layout.

llama-server restores a slot file into any context whose tensors have the
right sizes, and a truncated file aborts it: only llamad can tell whether a
file still belongs to what a child runs.  :func:`fingerprint` is pure; the
identities it hashes are read by :func:`file_identity` and
:func:`build_identity`, which do I/O and run in a thread.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Iterable, Mapping

if TYPE_CHECKING:
    from llamad.config import BackendConfig

HEAD_BYTES = 1 << 20  # the GGUF header and metadata of any model (tensor data follows); hashed
DEFAULT_CACHE_TYPE = "f16"
LENGTH = 16  # hex digits kept: 64 bits, plenty for the files of one model

# Every option that changes what a slot's KV cache holds or how it is laid out, by each of its spellings:
# (canonical name, how many values it takes, the value a bare flag stands for).  -1 values: an optional one.
# Not here, on purpose: -ngl and the device options (where the cache lives, not what it is), batch sizes,
# the chat template (other tokens just miss the cache).
_VALUE = 1
_OPTIONAL = -1
_OPTIONS: dict[str, tuple[str, int, str]] = {}
for _names, _canonical, _arity, _flag in (
    (("-c", "--ctx-size"), "ctx-size", _VALUE, ""),
    (("-np", "--parallel"), "parallel", _VALUE, ""),
    (("-ctk", "--cache-type-k"), "cache-type-k", _VALUE, ""),
    (("-ctv", "--cache-type-v"), "cache-type-v", _VALUE, ""),
    (("-fa", "--flash-attn"), "flash-attn", _OPTIONAL, "on"),
    (("--swa-full",), "swa-full", 0, "on"),
    (("-kvu", "--kv-unified"), "kv-unified", 0, "on"),
    (("-no-kvu", "--no-kv-unified"), "kv-unified", 0, "off"),
    (("--kv-unified-per-slot",), "kv-unified-per-slot", _VALUE, ""),
    (("-kvo", "--kv-offload"), "kv-offload", 0, "on"),
    (("-nkvo", "--no-kv-offload"), "kv-offload", 0, "off"),
    (("--rope-scaling",), "rope-scaling", _VALUE, ""),
    (("--rope-scale",), "rope-scale", _VALUE, ""),
    (("--rope-freq-base",), "rope-freq-base", _VALUE, ""),
    (("--rope-freq-scale",), "rope-freq-scale", _VALUE, ""),
    (("--yarn-orig-ctx",), "yarn-orig-ctx", _VALUE, ""),
    (("--yarn-ext-factor",), "yarn-ext-factor", _VALUE, ""),
    (("--yarn-attn-factor",), "yarn-attn-factor", _VALUE, ""),
    (("--yarn-beta-slow",), "yarn-beta-slow", _VALUE, ""),
    (("--yarn-beta-fast",), "yarn-beta-fast", _VALUE, ""),
    # What the weights are: the keys and values computed for the same tokens change with them.
    (("--lora",), "lora", _VALUE, ""),
    (("--lora-scaled",), "lora-scaled", _VALUE, ""),
    (("--control-vector",), "control-vector", _VALUE, ""),
    (("--control-vector-scaled",), "control-vector-scaled", _VALUE, ""),
    (("--control-vector-layer-range",), "control-vector-layer-range", 2, ""),
    (("--override-kv",), "override-kv", _VALUE, ""),
    (("-mm", "--mmproj"), "mmproj", _VALUE, ""),
):
    for _name in _names:
        _OPTIONS[_name] = (_canonical, _arity, _flag)
_REPEATED = {"lora", "lora-scaled", "control-vector", "control-vector-scaled", "override-kv"}
_FLASH_VALUES = {"on", "off", "auto", "true", "false", "1", "0", "enabled", "disabled"}

# llama-server reads the same options from its environment; an option on its command line wins.
_ENV = {
    "LLAMA_ARG_CTX_SIZE": "ctx-size", "LLAMA_ARG_N_PARALLEL": "parallel",
    "LLAMA_ARG_CACHE_TYPE_K": "cache-type-k", "LLAMA_ARG_CACHE_TYPE_V": "cache-type-v",
    "LLAMA_ARG_FLASH_ATTN": "flash-attn", "LLAMA_ARG_SWA_FULL": "swa-full", "LLAMA_ARG_KV_UNIFIED": "kv-unified",
    "LLAMA_ARG_KV_UNIFIED_PER_SLOT": "kv-unified-per-slot", "LLAMA_ARG_KV_OFFLOAD": "kv-offload",
    "LLAMA_ARG_ROPE_SCALING_TYPE": "rope-scaling", "LLAMA_ARG_ROPE_SCALE": "rope-scale",
    "LLAMA_ARG_ROPE_FREQ_BASE": "rope-freq-base", "LLAMA_ARG_ROPE_FREQ_SCALE": "rope-freq-scale",
    "LLAMA_ARG_YARN_ORIG_CTX": "yarn-orig-ctx", "LLAMA_ARG_YARN_EXT_FACTOR": "yarn-ext-factor",
    "LLAMA_ARG_YARN_ATTN_FACTOR": "yarn-attn-factor", "LLAMA_ARG_YARN_BETA_SLOW": "yarn-beta-slow",
    "LLAMA_ARG_YARN_BETA_FAST": "yarn-beta-fast", "LLAMA_ARG_MMPROJ": "mmproj",
}


@dataclass(frozen=True)
class FileIdentity:
    """A file as it is now: a replaced or rewritten model differs in one of these."""

    path: str
    size: int
    mtime_ns: int
    head_sha256: str = ""  # sha256 of the first HEAD_BYTES: the GGUF header and metadata


@dataclass(frozen=True)
class Layout:
    """How a child lays out each slot's KV cache."""

    slot_context: int  # context // parallel: the cells of one slot
    parallel: int
    cache_type_k: str = DEFAULT_CACHE_TYPE
    cache_type_v: str = DEFAULT_CACHE_TYPE
    options: tuple[tuple[str, str], ...] = ()  # every other layout option set, by canonical name


def fingerprint(model: FileIdentity, build: str, layout: Layout) -> str:
    """A short hex string that changes with any input: saved slots restore only into an equal one."""
    canonical = json.dumps({"model": asdict(model), "build": build, "layout": asdict(layout)},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:LENGTH]


def options_of(args: Iterable[str], env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The layout options ``args`` (a child's command line, in order) and ``env`` set, by canonical name.

    As llama-server reads them: the environment first, then each option on the command line,
    the last one winning (a repeatable one collects every value, in order).
    """
    from_env = {_ENV[k]: v for k, v in (env or {}).items() if k in _ENV}
    from_args: dict[str, str] = {}
    words = list(args)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        name, eq, inline = word.partition("=")
        inline_value = bool(eq) and name.startswith("-")
        spec = _OPTIONS.get(name if inline_value else word)
        if spec is None:
            continue
        canonical, arity, flag = spec
        if inline_value:
            value = inline
        elif arity == 0:
            value = flag
        elif arity == _OPTIONAL:
            value = flag
            if i < len(words) and words[i].lower() in _FLASH_VALUES:
                value = words[i]
                i += 1
        else:
            value = " ".join(words[i:i + arity])
            i += arity
        if canonical in _REPEATED and canonical in from_args:
            from_args[canonical] += "\n" + value
        else:
            from_args[canonical] = value
    return {**from_env, **from_args}


def layout_of(backend: BackendConfig, env: Mapping[str, str] | None = None) -> Layout:
    """The KV layout of a child started from ``backend`` (its ``extra_args`` after llamad's own options)."""
    own = ["-c", str(backend.context), "-np", str(backend.parallel)]
    options = options_of([*own, *backend.extra_args], {**(env or {}), **backend.env})
    context = _int(options.pop("ctx-size", ""), backend.context)
    parallel = _int(options.pop("parallel", ""), backend.parallel)
    return Layout(
        slot_context=context // parallel if parallel > 0 else context,
        parallel=parallel,
        cache_type_k=options.pop("cache-type-k", DEFAULT_CACHE_TYPE).lower(),
        cache_type_v=options.pop("cache-type-v", DEFAULT_CACHE_TYPE).lower(),
        options=tuple(sorted(options.items())),
    )


def _int(text: str, default: int) -> int:
    try:
        return int(text)
    except ValueError:
        return default


# --- I/O: run these in a thread ---------------------------------------------------------------------


def file_identity(path: str, head_bytes: int = HEAD_BYTES) -> FileIdentity:
    """Stat ``path`` and hash its head.  Raises OSError."""
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        head = hashlib.sha256(f.read(head_bytes)).hexdigest()
    return FileIdentity(os.path.abspath(path), st.st_size, st.st_mtime_ns, head)


def build_identity(command: str) -> str:
    """The server binary as it is now (its resolved path, size and mtime): a rebuild is another build.

    Its ``--version`` would mean a process per start; a rebuilt binary has a new mtime anyway.
    "" when it cannot be found (the child's start will say why).
    """
    found = shutil.which(command) or command
    try:
        real = os.path.realpath(found)
        st = os.stat(real)
    except OSError:
        return ""
    return f"{real}:{st.st_size}:{st.st_mtime_ns}"
