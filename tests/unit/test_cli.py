"""``llamad check-config``: the effective config on stdout, or one error line and exit 2."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from llamad import cli, config


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A clean environment: a real model file and command, no stray config file."""
    for name in [*config.ENV_KEYS, *config.PORT_ENV_KEYS, "MODEL_NAME"]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    model = tmp_path / "m.gguf"
    model.touch()
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.setenv("MODEL_PATH", str(model))
    monkeypatch.setenv("LLAMA_SERVER_BIN", sys.executable)
    return model


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["check-config", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_prints_the_effective_config(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([], capsys)
    assert (code, err) == (0, "")
    doc = tomllib.loads(out)
    assert doc["backend"]["model"] == str(environment)
    assert doc["backend"]["command"] == sys.executable
    assert doc["api"]["listen"] == "tcp:8000"
    assert any(line.startswith("model = ") and line.endswith("# env MODEL_PATH") for line in out.splitlines())


def test_config_file_and_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "llamad.toml"
    path.write_text("[backend]\ncontext = 8192\nparallel = 2\n")
    code, out, _ = run(["--config", str(path), "--set", "backend.parallel=7", "--set", "health.ping=runpod"], capsys)
    assert code == 0
    doc = tomllib.loads(out)
    assert (doc["backend"]["context"], doc["backend"]["parallel"], doc["health"]["ping"]) == (8192, 7, "runpod")
    lines = out.splitlines()
    assert any(line.startswith("context = 8192") and line.endswith(f"# {path}") for line in lines)
    assert any(line.startswith("parallel = 7") and line.endswith("# option") for line in lines)


def test_no_file_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("MODEL_PATH", str(tmp_path / "elsewhere.gguf"))
    monkeypatch.setenv("LLAMA_SERVER_BIN", str(tmp_path / "no-such-bin"))
    code, out, err = run(["--no-file-checks"], capsys)
    assert (code, err) == (0, "")
    assert tomllib.loads(out)["backend"]["model"] == str(tmp_path / "elsewhere.gguf")


@pytest.mark.parametrize(
    "env, argv, message",
    [
        ({"PARALLEL": "x"}, [], "backend.parallel: expected an integer, got 'x' (from env PARALLEL)"),
        ({}, ["--set", "bogus=1"], "bogus: unknown key (from option)"),
        ({}, ["--set", "backend.kind=vllm"],
         "backend.kind: unknown value 'vllm' (expected one of: llama-server, llama-cpp-python, external, none) "
         "(from option)"),
        ({"PORT": "70000"}, [], "api.listen: port 70000 out of range 0-65535 (from env PORT)"),
        ({"MODEL_PATH": "/nonexistent/m.gguf"}, [],
         "backend.model: model file not found: /nonexistent/m.gguf (from env MODEL_PATH)"),
    ],
)
def test_bad_config_is_one_line_and_exit_2(
    env: dict[str, str], argv: list[str], message: str,
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, out, err = run(argv, capsys)
    assert (code, out) == (2, "")
    assert err == f"llamad: config error: {message}\n"


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "nope.toml"
    code, out, err = run(["-c", str(path)], capsys)
    assert (code, out, err) == (2, "", f"llamad: config error: config: file not found: {path}\n")


def test_reads_os_environ(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PORT", "9000")
    code, out, _ = run([], capsys)
    assert code == 0
    assert tomllib.loads(out)["api"]["listen"] == "tcp:9000"


def test_set_without_equals_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = cli.main(["check-config", "--set", "backend.parallel"])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert "backend.parallel" in capsys.readouterr().err
