"""``backend.embeddings``: the child serves /v1/embeddings, and the demo model can answer them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import clean_config_env

from llamad import config
from llamad.backends import launch
from llamad.config import BackendConfig


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return clean_config_env(tmp_path, monkeypatch)


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("0", False), ("", False)])
def test_embeddings_from_the_environment(monkeypatch: pytest.MonkeyPatch, value: str, on: bool) -> None:
    monkeypatch.setenv("EMBEDDINGS", value)
    loaded = config.load()
    assert loaded.config.backend.embeddings is on
    assert loaded.sources["backend.embeddings"] == ("env EMBEDDINGS" if value else "default")


def test_embeddings_from_the_file_and_a_bad_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "llamad.toml"
    path.write_text("[backend]\nembeddings = true\n")
    assert config.load(str(path)).config.backend.embeddings is True
    monkeypatch.setenv("EMBEDDINGS", "maybe")
    with pytest.raises(config.ConfigError) as info:
        config.load()
    assert str(info.value).startswith("backend.embeddings: expected a boolean")
    assert str(info.value).endswith("got 'maybe' (from env EMBEDDINGS)")


def test_llama_server_gets_embeddings_only_when_asked() -> None:
    plain = launch(BackendConfig(model="/m/demo.gguf"), 9000, "k", "/run/key", base_env={})
    assert "--embeddings" not in plain.argv
    embed = launch(BackendConfig(model="/m/demo.gguf", embeddings=True, extra_args=("--pooling", "cls")), 9000, "k",
                   "/run/key", base_env={})
    assert embed.argv[embed.argv.index("--embeddings"):] == ["--embeddings", "--pooling", "cls"]  # extra_args last


def test_llama_cpp_python_gets_its_own_flag() -> None:
    embed = launch(BackendConfig(kind="llama-cpp-python", model="/m/demo.gguf", embeddings=True), 9000, "k", "",
                   base_env={})
    assert embed.argv[embed.argv.index("--embedding"):][:2] == ["--embedding", "true"]


def test_the_demo_model_carries_mean_pooling(tmp_path: Path) -> None:
    from gguf import GGUFReader, PoolingType

    from llamad.demo import write_demo_model

    reader = GGUFReader(write_demo_model(str(tmp_path / "demo.gguf")))
    field = reader.get_field("llama.pooling_type")
    assert field is not None and int(field.contents()) == PoolingType.MEAN
