"""``llamad check-config``: the effective config on stdout, or one error line and exit 2."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from fakes import clean_config_env

from llamad import cli


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return clean_config_env(tmp_path, monkeypatch)


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


# --- llamad keys on a file that is not all UTF-8, or cannot be read ---------------------


def keys(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["keys", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_keys_list_skips_a_line_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "api_keys"
    path.write_bytes(b"alice:" + b"a" * 20 + b"\n# caf\xe9\n")
    code, out, err = keys(["--file", str(path), "list"], capsys)
    assert code == 0 and out.startswith("alice\taaaa...aa\t")
    assert err == f"warning: {path}:2: skipped: not UTF-8 (byte 0xe9 at offset 5)\n"


def test_keys_revoke_keeps_a_line_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "api_keys"
    path.write_bytes(b"alice:" + b"a" * 20 + b"\n# caf\xe9\nbob:" + b"b" * 20 + b"\n")
    code, out, _ = keys(["--file", str(path), "revoke", "alice"], capsys)
    assert code == 0 and out.startswith("revoked alice")
    assert path.read_bytes() == b"# caf\xe9\nbob:" + b"b" * 20 + b"\n"


@pytest.mark.parametrize("action", [["list"], ["generate", "carol"], ["revoke", "alice"]])
def test_keys_on_an_unreadable_file_is_one_line_and_exit_1(
    tmp_path: Path, action: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = keys(["--file", str(tmp_path), *action], capsys)
    assert (code, out) == (1, "")
    assert err == f"llamad keys: cannot read {tmp_path}: Is a directory\n"
