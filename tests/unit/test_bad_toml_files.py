"""A config or keys file that is not UTF-8, or nests a value deeper than the stack: one line naming the file
and the problem (exit 2 for the config), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import clean_config_env

from llamad import cli, config
from llamad.keys import keysfile
from llamad.keys.auth import KeyStore
from llamad.config import ConfigError
from llamad.tap import Options

DEEP = "a = " + "[" * 100_000 + "\n"
NOT_UTF8 = b'[api]\nlisten = "tcp:8000"\n# caf\xe9\n'
NOT_UTF8_PROBLEM = "not UTF-8 (byte 0xe9 at line 3, offset 31)"


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return clean_config_env(tmp_path, monkeypatch)


def config_file(tmp_path: Path, data: bytes | str) -> str:
    path = tmp_path / "llamad.toml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


@pytest.mark.parametrize("data, problem", [
    (NOT_UTF8, NOT_UTF8_PROBLEM),
    (DEEP, "a value is nested too deeply"),
    ("[backend]\nextra_args = " + "{a = " * 100_000 + "\n", "a value is nested too deeply"),
])
def test_a_bad_config_file_is_one_config_error(tmp_path: Path, data: bytes | str, problem: str) -> None:
    path = config_file(tmp_path, data)
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"config: {path} is not valid TOML: {problem}"


def test_a_value_nested_too_deeply_in_a_variable_or_set_is_one_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, options={"api.cors_origins": "[" * 100_000})
    assert str(info.value).startswith("api.cors_origins: not a valid TOML value: ")
    assert str(info.value).endswith("(a value is nested too deeply) (from option)")


@pytest.mark.parametrize("data, problem", [(NOT_UTF8, NOT_UTF8_PROBLEM), (DEEP, "a value is nested too deeply")])
def test_check_config_prints_one_line_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  data: bytes | str, problem: str) -> None:
    path = config_file(tmp_path, data)
    assert cli.main(["check-config", "--config", path]) == 2
    out, err = capsys.readouterr()
    assert (out, err) == ("", f"llamad: config error: config: {path} is not valid TOML: {problem}\n")


@pytest.mark.parametrize("data, problem", [(NOT_UTF8, NOT_UTF8_PROBLEM), (DEEP, "a value is nested too deeply")])
def test_twistd_options_print_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  data: bytes | str, problem: str) -> None:
    path = config_file(tmp_path, data)
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(["--config", path])
    assert info.value.code == 2
    assert capsys.readouterr().err == f"llamad: config error: config: {path} is not valid TOML: {problem}\n"


def test_a_config_error_stays_one_line_whatever_the_path_holds(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "evil\n\x1b[31m.toml")
    assert cli.main(["check-config", "--config", path]) == 2
    shown = f"{tmp_path}/evil\\n\\x1b[31m.toml"
    assert capsys.readouterr().err == f"llamad: config error: config: file not found: {shown}\n"
    with pytest.raises(SystemExit):
        Options().parseOptions(["--config", path])
    assert capsys.readouterr().err.count("\n") == 1


# --- the TOML keys file ---------------------------------------------------------------------------


@pytest.mark.parametrize("data, problem", [
    (NOT_UTF8, NOT_UTF8_PROBLEM),
    (DEEP, "not valid TOML: a value is nested too deeply"),
])
def test_a_bad_keys_file_holds_no_key_and_says_why(tmp_path: Path, data: bytes | str, problem: str) -> None:
    path = tmp_path / "keys.toml"
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    with pytest.raises(ValueError) as info:
        keysfile.read_toml_keys(str(path))
    assert str(info.value) == problem
    store = KeyStore()
    assert store.load(str(path)) == [f"{path}: cannot read: {problem}"] and len(store) == 0


def test_an_edit_that_would_nest_too_deeply_is_refused() -> None:
    with pytest.raises(ValueError, match="nested too deeply"):
        keysfile.check_text(DEEP)


def test_a_table_name_with_control_characters_is_named_as_toml_writes_it() -> None:
    text = '[keys."x\\n\\u001b[31m\\u007f"]\nkey = "s3cret-team-a-0123456789"\n'
    entries, warnings = keysfile.parse_toml_keys(text, "keys.toml")
    assert entries == []
    assert warnings == ['keys.toml: [keys."x\\n\\u001b[31m\\u007f"] skipped: '
                        "a key id is letters, digits, '_' and '-'"]
