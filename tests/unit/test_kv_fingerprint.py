"""The fingerprint of a saved KV cache: any change to what it hashes changes it; the same inputs give the same one."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from llamad.config import BackendConfig
from llamad.kv.fingerprint import (
    HEAD_BYTES, FileIdentity, Layout, build_identity, file_identity, fingerprint, layout_of, options_of,
)

MODEL = FileIdentity("/models/m.gguf", 1_000_000, 1_700_000_000_000_000_000, "ab" * 32)
BUILD = "/usr/bin/llama-server:123456:1700000000000000000"
LAYOUT = Layout(slot_context=2048, parallel=2)
BASE = fingerprint(MODEL, BUILD, LAYOUT)


def test_the_same_inputs_give_the_same_short_hex() -> None:
    again = fingerprint(FileIdentity(*dataclasses.astuple(MODEL)), str(BUILD), Layout(2048, 2))
    assert again == BASE
    assert len(BASE) == 16 and int(BASE, 16) >= 0


@pytest.mark.parametrize("change", [
    {"path": "/models/other.gguf"}, {"size": 1_000_001}, {"mtime_ns": MODEL.mtime_ns + 1},
    {"head_sha256": "cd" * 32},
])
def test_any_change_of_the_model_file_changes_it(change: dict) -> None:
    assert fingerprint(dataclasses.replace(MODEL, **change), BUILD, LAYOUT) != BASE


def test_another_build_changes_it() -> None:
    assert fingerprint(MODEL, BUILD + "1", LAYOUT) != BASE
    assert fingerprint(MODEL, "", LAYOUT) != BASE


@pytest.mark.parametrize("change", [
    {"slot_context": 4096}, {"parallel": 4}, {"cache_type_k": "q8_0"}, {"cache_type_v": "q4_0"},
    {"options": (("flash-attn", "on"),)},
])
def test_any_change_of_the_layout_changes_it(change: dict) -> None:
    assert fingerprint(MODEL, BUILD, dataclasses.replace(LAYOUT, **change)) != BASE


def backend(*extra: str, context: int = 4096, parallel: int = 2, env: dict | None = None) -> BackendConfig:
    return BackendConfig(model="/models/m.gguf", context=context, parallel=parallel, extra_args=tuple(extra),
                         env=env or {})


def test_the_layout_of_a_backend() -> None:
    assert layout_of(backend()) == Layout(slot_context=2048, parallel=2, cache_type_k="f16", cache_type_v="f16")
    assert layout_of(backend(context=8192, parallel=4)).slot_context == 2048
    assert layout_of(backend(parallel=0)).slot_context == 4096


@pytest.mark.parametrize("extra", [
    ("-ctk", "q8_0"), ("--cache-type-k", "q8_0"), ("-ctv", "q8_0"), ("--cache-type-v=q4_0",),
    ("-fa",), ("-fa", "on"), ("--flash-attn", "off"), ("--swa-full",), ("-kvu",), ("--kv-unified",),
    ("-no-kvu",), ("--kv-unified-per-slot", "1024"), ("-nkvo",), ("--no-kv-offload",),
    ("--rope-scaling", "yarn"), ("--rope-scale", "2"), ("--rope-freq-base", "10000"), ("--rope-freq-scale", "0.5"),
    ("--yarn-orig-ctx", "4096"), ("--yarn-ext-factor", "1"), ("--yarn-attn-factor", "1"),
    ("--yarn-beta-slow", "1"), ("--yarn-beta-fast", "32"), ("--lora", "a.gguf"), ("--lora-scaled", "a.gguf:0.5"),
    ("--control-vector", "v.gguf"), ("--control-vector-layer-range", "1", "4"),
    ("--override-kv", "llama.context_length=int:8192"), ("--mmproj", "p.gguf"),
    ("-c", "8192"), ("--ctx-size", "2048"), ("-np", "4"), ("--parallel", "1"),
])
def test_each_layout_option_changes_it(extra: tuple[str, ...]) -> None:
    assert layout_of(backend(*extra)) != layout_of(backend())
    assert layout_of(backend("--jinja", *extra, "--metrics")) == layout_of(backend(*extra))


@pytest.mark.parametrize("extra", [
    ("-ngl", "99"), ("--n-gpu-layers", "0"), ("--jinja",), ("-b", "512"), ("-ub", "128"), ("-t", "8"),
    ("--chat-template", "chatml"), ("--alias", "x"),
])
def test_options_that_leave_the_layout_alone_do_not(extra: tuple[str, ...]) -> None:
    assert layout_of(backend(*extra)) == layout_of(backend())


def test_the_last_option_wins_and_the_command_line_beats_the_environment() -> None:
    assert options_of(["-ctk", "q8_0", "--cache-type-k", "q4_0"])["cache-type-k"] == "q4_0"
    assert options_of(["-ctk", "q8_0"], {"LLAMA_ARG_CACHE_TYPE_K": "q4_0"})["cache-type-k"] == "q8_0"
    assert options_of([], {"LLAMA_ARG_CACHE_TYPE_K": "q4_0"})["cache-type-k"] == "q4_0"
    assert options_of(["-fa", "--jinja"]) == {"flash-attn": "on"}  # a bare -fa takes no value from the next option
    assert options_of(["--lora", "a", "--lora", "b"])["lora"] == "a\nb"  # repeatable: every one counts
    assert options_of(["-kvu", "-no-kvu"]) == {"kv-unified": "off"}


def test_the_environment_counts_for_the_child() -> None:
    assert layout_of(backend(), {"LLAMA_ARG_FLASH_ATTN": "on"}) != layout_of(backend())
    assert layout_of(backend(env={"LLAMA_ARG_CACHE_TYPE_V": "q8_0"})).cache_type_v == "q8_0"
    assert layout_of(backend(), {"LLAMA_ARG_CTX_SIZE": "999"}) == layout_of(backend())  # -c on argv wins
    assert layout_of(backend(), {"HOME": "/root"}) == layout_of(backend())


def test_the_identity_of_a_model_file(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * (HEAD_BYTES + 10))
    first = file_identity(str(path))
    assert first == file_identity(str(path)) and first.size == HEAD_BYTES + 14
    with open(path, "r+b") as f:
        f.seek(HEAD_BYTES + 5)
        f.write(b"x")  # past the head: only the mtime tells
    os.utime(path, ns=(first.mtime_ns, first.mtime_ns))
    assert file_identity(str(path)) == first
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"x")
    os.utime(path, ns=(first.mtime_ns, first.mtime_ns))
    assert file_identity(str(path)).head_sha256 != first.head_sha256
    with pytest.raises(OSError):
        file_identity(str(tmp_path / "absent.gguf"))


def test_the_identity_of_a_build(tmp_path: Path) -> None:
    binary = tmp_path / "llama-server"
    binary.write_bytes(b"v1")
    first = build_identity(str(binary))
    assert first.startswith(str(binary)) and first == build_identity(str(binary))
    binary.write_bytes(b"v22")
    assert build_identity(str(binary)) != first
    assert build_identity(str(tmp_path / "absent")) == ""
