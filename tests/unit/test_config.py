"""The config contract: precedence, env names, exact error lines, render, derived paths."""

from __future__ import annotations

import os
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.endpoints import _parseServer

from llamad import config
from llamad.config import ConfigError

MODEL = "/models/m.gguf"
BASE_ENV = {"DATA_DIR": "/data", "MODEL_PATH": MODEL}


def load(
    toml: str | Path = "", env: dict[str, str] | None = None, options: dict[str, Any] | None = None,
    check_files: bool = False,
) -> config.Loaded:
    """Load with BASE_ENV plus ``env`` (an empty value unsets a base name); ``""`` means no file."""
    return config.load(str(toml), {**BASE_ENV, **(env or {})}, options, check_files=check_files)


def write(tmp_path: Path, text: str, name: str = "llamad.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return str(info.value)


# --- precedence ---------------------------------------------------------------


def test_defaults() -> None:
    loaded = load()
    assert loaded.config.backend.parallel == 4
    assert loaded.config.api.listen == "tcp:8000"
    assert loaded.config.health.ping == "always"
    assert loaded.config.idle.timeout == 0.0
    assert loaded.sources["backend.parallel"] == "default"


@pytest.mark.parametrize(
    "layers, value, source",
    [
        ((), 4, "default"),
        (("toml",), 2, "FILE"),
        (("toml", "env"), 3, "env PARALLEL"),
        (("toml", "env", "option"), 5, "option"),
        (("env", "option"), 5, "option"),
        (("toml", "option"), 5, "option"),
    ],
)
def test_precedence(tmp_path: Path, layers: tuple[str, ...], value: int, source: str) -> None:
    path = write(tmp_path, "[backend]\nparallel = 2\n")
    loaded = load(
        toml=path if "toml" in layers else "",
        env={"PARALLEL": "3"} if "env" in layers else {},
        options={"backend.parallel": "5"} if "option" in layers else None,
    )
    assert loaded.config.backend.parallel == value
    assert loaded.sources["backend.parallel"] == source.replace("FILE", path)


def test_option_non_string_value_is_type_checked() -> None:
    assert load(options={"backend.parallel": 6}).config.backend.parallel == 6
    assert error(options={"backend.parallel": 1.5}) == "backend.parallel: expected an integer, got 1.5 (from option)"


def test_default_config_file_read_when_no_config_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "[backend]\ncontext = 8192\n")
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", path)
    loaded = config.load(None, BASE_ENV, check_files=False)
    assert loaded.config.backend.context == 8192
    assert loaded.sources["backend.context"] == path


def test_missing_default_config_file_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DEFAULT_CONFIG_FILE", str(tmp_path / "absent.toml"))
    assert config.load(None, BASE_ENV, check_files=False).config.backend.context == 4096


# --- error lines ----------------------------------------------------------------


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path, "foo = 1\n")
    assert error(toml=path) == f"foo: unknown key (from {path})"


def test_unknown_key_in_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[api]\nfoo = 1\n")
    assert error(toml=path) == f"api.foo: unknown key (from {path})"


def test_unknown_option_key() -> None:
    assert error(options={"bogus": "1"}) == "bogus: unknown key (from option)"


def test_section_that_is_not_a_table(tmp_path: Path) -> None:
    path = write(tmp_path, "api = 1\n")
    assert error(toml=path) == f"api: expected a [api] table, got 1 (from {path})"


@pytest.mark.parametrize(
    "text, message",
    [
        ('[backend]\nparallel = "four"\n', "backend.parallel: expected an integer, got 'four'"),
        ("[backend]\nparallel = true\n", "backend.parallel: expected an integer, got True"),
        ('[idle]\ntimeout = "5"\n', "idle.timeout: expected a number, got '5'"),
        ("[auth]\nenabled = 1\n", "auth.enabled: expected a boolean, got 1"),
        ("[backend]\nextra_args = [1]\n", "backend.extra_args: expected a list of strings, got [1]"),
        ("data_dir = 3\n", "data_dir: expected a string, got 3"),
    ],
)
def test_wrong_type_in_toml(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    assert error(toml=path) == f"{message} (from {path})"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PARALLEL": "x"}, "backend.parallel: expected an integer, got 'x' (from env PARALLEL)"),
        (
            {"AUTH_ENABLED": "maybe"},
            "auth.enabled: expected a boolean (true/false/1/0/yes/no/on/off), got 'maybe' (from env AUTH_ENABLED)",
        ),
        ({"IDLE_TIMEOUT": "soon"}, "idle.timeout: expected a number, got 'soon' (from env IDLE_TIMEOUT)"),
        ({"CTX": "4k"}, "backend.context: expected an integer, got '4k' (from env CTX)"),
        ({"PARALLEL": "0"}, "backend.parallel: must be >= 1, got 0 (from env PARALLEL)"),
        ({"NGL": "-2"}, "backend.gpu_layers: must be >= -1, got -2 (from env NGL)"),
        ({"PORT": "70000"}, "api.listen: port 70000 out of range 0-65535 (from env PORT)"),
        ({"PORT": "-1"}, "api.listen: port -1 out of range 0-65535 (from env PORT)"),
        ({"PORT": "http"}, "api.listen: port must be an integer, got 'http' (from env PORT)"),
        ({"PORT_HEALTH": "65536"}, "health.listen: port 65536 out of range 0-65535 (from env PORT_HEALTH)"),
    ],
)
def test_bad_env_value(env: dict[str, str], message: str) -> None:
    assert error(env=env) == message


def test_body_timeout_and_incomplete_request_limit(tmp_path: Path) -> None:
    api = load().config.api
    assert (api.body_timeout, api.max_incomplete_per_client) == (30.0, 64)
    unlimited = load(toml=write(tmp_path, "[api]\nmax_incomplete_per_client = 0\n")).config.api
    assert unlimited.max_incomplete_per_client == 0
    path = write(tmp_path, "[api]\nbody_timeout = 0\n")
    assert error(toml=path) == f"api.body_timeout: must be > 0, got 0.0 (from {path})"
    path = write(tmp_path, "[api]\nmax_incomplete_per_client = -1\n")
    assert error(toml=path) == f"api.max_incomplete_per_client: must be >= 0, got -1 (from {path})"


@pytest.mark.parametrize("text, shown", [("{A = 1}", "{'A': 1}"), ('"A=1"', "'A=1'")])
def test_wrong_type_for_backend_env(tmp_path: Path, text: str, shown: str) -> None:
    path = write(tmp_path, f"[backend]\nenv = {text}\n")
    assert error(toml=path) == f"backend.env: expected a table of strings, got {shown} (from {path})"


def test_missing_model_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    assert error(env={"MODEL_PATH": str(missing)}, check_files=True) == (
        f"backend.model: model file not found: {missing} (from env MODEL_PATH)"
    )


def test_missing_model_name_file_names_the_resolved_path(tmp_path: Path) -> None:
    env = {"DATA_DIR": str(tmp_path), "MODEL_PATH": "", "MODEL_NAME": "q4.gguf"}
    assert error(env=env, check_files=True) == (
        f"backend.model: model file not found: {tmp_path}/models/q4.gguf (from env MODEL_NAME)"
    )


def test_no_model_configured() -> None:
    assert error(env={"MODEL_PATH": ""}) == (
        "backend.model: no model configured (set backend.model, MODEL_PATH or MODEL_NAME)"
    )


def test_command_checked_only_with_check_files(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.touch()
    absent = tmp_path / "no-such-llama-server"
    env = {"MODEL_PATH": str(model), "LLAMA_SERVER_BIN": str(absent)}
    assert error(env=env, check_files=True) == (
        f"backend.command: '{absent}' not found or not executable (set LLAMA_SERVER_BIN) (from env LLAMA_SERVER_BIN)"
    )
    assert load(env=env).config.backend.command == str(absent)
    ok = load(env={**env, "LLAMA_SERVER_BIN": sys.executable}, check_files=True)
    assert ok.config.backend.command == sys.executable
    assert ok.config.backend.model == str(model)


def test_listen_port_out_of_range_in_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nlisten = "tcp:99999"\n')
    assert error(toml=path) == f"api.listen: port 99999 out of range 0-65535 (from {path})"


def test_listen_without_port_in_toml(tmp_path: Path) -> None:
    path = write(tmp_path, '[health]\nlisten = "tcp:interface=127.0.0.1"\n')
    assert error(toml=path) == f"health.listen: endpoint 'tcp:interface=127.0.0.1' has no valid port (from {path})"


def test_unsupported_endpoint_kind(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nlisten = "http:8000"\n')
    assert error(toml=path) == (
        f"api.listen: unsupported endpoint 'http:8000' (use tcp:PORT, unix:PATH or systemd:...) (from {path})"
    )


def test_unknown_backend_kind(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nkind = "vllm"\n')
    assert error(toml=path) == (
        "backend.kind: unknown value 'vllm' (expected one of: llama-server, llama-cpp-python, external, none) "
        f"(from {path})"
    )


def test_unknown_ping_mode_from_option() -> None:
    assert error(options={"health.ping": "sometimes"}) == (
        "health.ping: unknown value 'sometimes' (expected one of: always, runpod) (from option)"
    )


def test_bad_toml_syntax(tmp_path: Path) -> None:
    text = '[backend\nkind = "external"\n'
    path = write(tmp_path, text)
    with pytest.raises(tomllib.TOMLDecodeError) as parse_error:
        tomllib.loads(text)
    assert error(toml=path) == f"config: {path} is not valid TOML: {parse_error.value}"
    assert "line 1" in error(toml=path)


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    assert error(toml=path) == f"config: file not found: {path}"


def test_external_kind_without_url(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nkind = "external"\n')
    assert error(toml=path, env={"MODEL_PATH": ""}) == "backend.url: kind 'external' needs an http:// URL, got ''"


def test_external_kind_refuses_https(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nkind = "external"\nurl = "https://10.0.0.5"\n')
    assert error(toml=path) == (
        f"backend.url: kind 'external' needs an http:// URL, got 'https://10.0.0.5' (from {path})"
    )


def test_external_kind_with_url_needs_no_model(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nkind = "external"\nurl = "http://127.0.0.1:8080"\n')
    loaded = load(toml=path, env={"MODEL_PATH": ""}, check_files=True)
    assert loaded.config.backend.url == "http://127.0.0.1:8080"


def test_bad_backend_env_name(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nenv = {"A=B" = "x"}\n')
    assert error(toml=path) == f"backend.env: bad variable name 'A=B' (from {path})"


# --- removed keys ------------------------------------------------------------------

FAST_PATH_GONE = ("api.fast_path: no longer does anything (every request is served by llamad's own HTTP/1.1 "
                  "front); remove it")


def test_a_removed_key_in_the_file_is_one_warning_and_changes_nothing(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nfast_path = false\nmax_headers = 32\n')
    loaded = load(toml=path)
    assert loaded.warnings == (f"{FAST_PATH_GONE} (from {path})",)
    assert loaded.config.api.max_headers == 32
    assert "api.fast_path" not in loaded.values and "api.fast_path" not in loaded.sources
    assert not hasattr(loaded.config.api, "fast_path")
    assert "fast_path" not in config.render(loaded)


def test_a_removed_key_as_an_option_is_one_warning_whatever_its_value() -> None:
    assert load(options={"api.fast_path": "false"}).warnings == (f"{FAST_PATH_GONE} (from option)",)
    assert load(options={"api.fast_path": 7}).warnings == (f"{FAST_PATH_GONE} (from option)",)


def test_a_removed_key_is_no_key_of_the_schema() -> None:
    assert set(config.REMOVED_KEYS).isdisjoint(config.KEY_TYPES)


# --- logs.format -------------------------------------------------------------------


def test_log_format_is_text_by_default_and_json_from_file_or_option(tmp_path: Path) -> None:
    assert load().config.logs.format == "text"
    path = write(tmp_path, '[logs]\nformat = "json"\n')
    assert load(toml=path).config.logs.format == "json"
    assert load(options={"logs.format": "json"}).config.logs.format == "json"


def test_log_format_names_its_choices(tmp_path: Path) -> None:
    path = write(tmp_path, '[logs]\nformat = "xml"\n')
    assert error(toml=path) == f"logs.format: unknown value 'xml' (expected one of: text, json) (from {path})"
    assert error(options={"logs.format": "JSON"}) == (  # any case: the variable only
        "logs.format: unknown value 'JSON' (expected one of: text, json) (from option)")


# --- environment names -----------------------------------------------------------


def test_model_path() -> None:
    loaded = load(env={"MODEL_PATH": "/srv/q8.gguf"})
    assert loaded.config.backend.model == "/srv/q8.gguf"
    assert loaded.config.backend.model_id == "q8"
    assert loaded.sources["backend.model"] == "env MODEL_PATH"


def test_model_name_resolves_under_models_dir() -> None:
    loaded = load(env={"MODEL_PATH": "", "MODEL_NAME": "q4.gguf"})
    assert loaded.config.backend.model == "/data/models/q4.gguf"
    assert loaded.sources["backend.model"] == "env MODEL_NAME"


def test_model_name_resolves_under_models_dir_env() -> None:
    loaded = load(env={"MODEL_PATH": "", "MODEL_NAME": "q4.gguf", "MODELS_DIR": "/gguf"})
    assert loaded.config.backend.model == "/gguf/q4.gguf"
    assert loaded.sources["backend.models_dir"] == "env MODELS_DIR"


def test_model_name_with_existing_file(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "q4.gguf").touch()
    env = {"DATA_DIR": str(tmp_path), "MODEL_PATH": "", "MODEL_NAME": "q4.gguf", "LLAMA_SERVER_BIN": sys.executable}
    assert load(env=env, check_files=True).config.backend.model == str(tmp_path / "models" / "q4.gguf")


def test_model_path_wins_over_model_name() -> None:
    loaded = load(env={"MODEL_PATH": "/srv/a.gguf", "MODEL_NAME": "b.gguf"})
    assert loaded.config.backend.model == "/srv/a.gguf"
    assert loaded.sources["backend.model"] == "env MODEL_PATH"


def test_model_name_overrides_toml_model(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nmodel = "/srv/a.gguf"\n')
    loaded = load(toml=path, env={"MODEL_PATH": "", "MODEL_NAME": "b.gguf"})
    assert loaded.config.backend.model == "/data/models/b.gguf"


def test_bare_model_file_name_in_toml_resolves_under_models_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, '[backend]\nmodel = "q4.gguf"\n')
    assert load(toml=path, env={"MODEL_PATH": ""}).config.backend.model == "/data/models/q4.gguf"


def test_data_dir_and_derived_paths() -> None:
    loaded = load(env={"DATA_DIR": "/vol"})
    assert loaded.config.data_dir == "/vol"
    assert loaded.sources["data_dir"] == "env DATA_DIR"
    assert loaded.config.backend.models_dir == "/vol/models"
    assert loaded.config.logs.dir == "/vol/logs"
    assert loaded.config.auth.keys_file == "/vol/api_keys.txt"
    for key in ("backend.models_dir", "logs.dir", "auth.keys_file"):
        assert loaded.sources[key] == "derived from data_dir"


def test_explicit_paths_are_not_derived(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nmodels_dir = "/gguf"\n')
    loaded = load(toml=path, env={"LOG_DIR": "/var/log/llamad", "AUTH_KEYS_FILE": "/etc/keys"})
    assert loaded.config.backend.models_dir == "/gguf"
    assert loaded.sources["backend.models_dir"] == path
    assert loaded.config.logs.dir == "/var/log/llamad"
    assert loaded.sources["logs.dir"] == "env LOG_DIR"
    assert loaded.config.auth.keys_file == "/etc/keys"
    assert loaded.sources["auth.keys_file"] == "env AUTH_KEYS_FILE"


def test_port_keeps_interface(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nlisten = "tcp:8000:interface=127.0.0.1"\n')
    loaded = load(toml=path, env={"PORT": "9000"})
    assert loaded.config.api.listen == "tcp:9000:interface=127.0.0.1"
    assert loaded.sources["api.listen"] == "env PORT"
    assert loaded.config.health.listen == "tcp:8001"


def test_port_health() -> None:
    loaded = load(env={"PORT_HEALTH": "9001"})
    assert loaded.config.health.listen == "tcp:9001"
    assert loaded.sources["health.listen"] == "env PORT_HEALTH"
    assert loaded.config.api.listen == "tcp:8000"


def test_port_leaves_unix_endpoint_alone(tmp_path: Path) -> None:
    path = write(tmp_path, '[api]\nlisten = "unix:/run/llamad.sock"\n')
    assert load(toml=path, env={"PORT": "9000"}).config.api.listen == "unix:/run/llamad.sock"


@pytest.mark.parametrize(
    "name, value, section, attr, expected",
    [
        ("NGL", "0", "backend", "gpu_layers", 0),
        ("NGL", "-1", "backend", "gpu_layers", -1),
        ("CTX", "8192", "backend", "context", 8192),
        ("PARALLEL", " 2 ", "backend", "parallel", 2),
        ("THREADS", "16", "backend", "threads", 16),
        ("IDLE_TIMEOUT", "90", "idle", "timeout", 90.0),
        ("IDLE_TIMEOUT", "1.5", "idle", "timeout", 1.5),
        ("LLAMA_SERVER_BIN", "/opt/llama/bin/llama-server", "backend", "command", "/opt/llama/bin/llama-server"),
    ],
)
def test_env_names(name: str, value: str, section: str, attr: str, expected: object) -> None:
    loaded = load(env={name: value})
    got = getattr(getattr(loaded.config, section), attr)
    assert got == expected and type(got) is type(expected)
    assert loaded.sources[f"{section}.{attr}"] == f"env {name}"


def test_extra_args_are_shell_words() -> None:
    loaded = load(env={"EXTRA_ARGS": "--flash-attn on  --alias 'my model' --x=\"a b\""})
    assert loaded.config.backend.extra_args == ("--flash-attn", "on", "--alias", "my model", "--x=a b")
    assert loaded.sources["backend.extra_args"] == "env EXTRA_ARGS"


def test_extra_args_unbalanced_quote_is_a_config_error() -> None:
    assert error(env={"EXTRA_ARGS": "--alias 'my model"}) == (
        "backend.extra_args: No closing quotation (from env EXTRA_ARGS)"
    )


def test_list_option_splits_on_commas_and_spaces() -> None:
    loaded = load(options={"scale_from_zero.namespaces": "a, b c"})
    assert loaded.config.scale_from_zero.namespaces == ("a", "b", "c")


@pytest.mark.parametrize("word", ["1", "true", "yes", "on", "TRUE", "Yes", "On", " true "])
def test_auth_enabled_true_spellings(word: str) -> None:
    loaded = load(env={"AUTH_ENABLED": word})
    assert loaded.config.auth.enabled is True
    assert loaded.sources["auth.enabled"] == "env AUTH_ENABLED"


@pytest.mark.parametrize("word", ["0", "false", "no", "off", "FALSE", "No", "OFF"])
def test_auth_enabled_false_spellings(tmp_path: Path, word: str) -> None:
    path = write(tmp_path, "[auth]\nenabled = true\n")
    loaded = load(toml=path, env={"AUTH_ENABLED": word})
    assert loaded.config.auth.enabled is False
    assert loaded.sources["auth.enabled"] == "env AUTH_ENABLED"


def test_parse_bool_directly() -> None:
    assert config.parse_bool("") is False
    with pytest.raises(ValueError) as info:
        config.parse_bool("2")
    assert str(info.value) == "expected a boolean (true/false/1/0/yes/no/on/off), got '2'"


def test_empty_env_values_are_unset(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[backend]\nparallel = 2\nmodel = "/srv/f.gguf"\n[auth]\nenabled = true\n[api]\nlisten = "tcp:8100"\n',
    )
    names = [*config.ENV_KEYS, *config.PORT_ENV_KEYS, "MODEL_NAME"]
    loaded = load(toml=path, env={name: "" for name in names})
    assert loaded.config.backend.parallel == 2
    assert loaded.config.backend.model == "/srv/f.gguf"
    assert loaded.config.auth.enabled is True
    assert loaded.config.api.listen == "tcp:8100"
    assert not any(source.startswith("env ") for source in loaded.sources.values())


def test_sources(tmp_path: Path) -> None:
    path = write(tmp_path, "[backend]\ncontext = 8192\n")
    loaded = load(toml=path, env={"NGL": "10", "PORT": "9000"}, options={"idle.action": "exit"})
    assert set(loaded.sources) == set(config.KEY_TYPES)
    expected = {
        "data_dir": "env DATA_DIR",
        "backend.model": "env MODEL_PATH",
        "backend.context": path,
        "backend.gpu_layers": "env NGL",
        "api.listen": "env PORT",
        "idle.action": "option",
        "backend.models_dir": "derived from data_dir",
        "logs.dir": "derived from data_dir",
        "auth.keys_file": "derived from data_dir",
    }
    assert {k: v for k, v in loaded.sources.items() if v != "default"} == expected


def test_max_concurrent_follows_parallel() -> None:
    assert load(env={"PARALLEL": "3"}).config.max_concurrent == 3
    assert load(options={"admission.max_concurrent": "8"}).config.max_concurrent == 8


# --- data_dir auto-detection ---------------------------------------------------------


def test_data_dir_auto_detects_first_existing_candidate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runpod, workspace = tmp_path / "runpod-volume", tmp_path / "workspace"
    workspace.mkdir()
    monkeypatch.setattr(config, "DATA_DIR_CANDIDATES", (str(runpod), str(workspace)))
    loaded = load(env={"DATA_DIR": ""})
    assert loaded.config.data_dir == str(workspace)
    assert loaded.sources["data_dir"] == "auto-detected"
    assert loaded.config.logs.dir == str(workspace / "logs")
    runpod.mkdir()
    assert load(env={"DATA_DIR": ""}).config.data_dir == str(runpod)


def test_data_dir_falls_back_to_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DATA_DIR_CANDIDATES", (str(tmp_path / "a"), str(tmp_path / "b")))
    loaded = load(env={"DATA_DIR": ""})
    assert loaded.config.data_dir == "./var"
    assert loaded.config.backend.models_dir == os.path.join("./var", "models")


def test_data_dir_from_toml_is_not_auto_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "DATA_DIR_CANDIDATES", (str(tmp_path),))
    path = write(tmp_path, 'data_dir = "/vol"\n')
    loaded = load(toml=path, env={"DATA_DIR": ""})
    assert loaded.config.data_dir == "/vol"
    assert loaded.sources["data_dir"] == path


# --- render -----------------------------------------------------------------------


def _lookup(doc: dict[str, Any], key: str) -> Any:
    section, _, name = key.rpartition(".")
    return doc[section][name] if section else doc[name]


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def test_render_is_valid_toml_with_the_same_values(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[backend]\ncontext = 8192\nenv = {CUDA_VISIBLE_DEVICES = "0", HF_HOME = "C:\\\\hf \\"x\\""}\n'
        '[scale_from_zero]\nnamespaces = ["a", "b"]\n',
    )
    loaded = load(
        toml=path,
        env={"EXTRA_ARGS": "--alias 'my \"model\"'", "AUTH_ENABLED": "yes", "IDLE_TIMEOUT": "2.5"},
        options={"backend.threads": "3"},
    )
    text = config.render(loaded)
    doc = tomllib.loads(text)
    for key in config.KEY_TYPES:
        assert _lookup(doc, key) == _plain(loaded.values[key]), key
    assert doc["backend"]["env"]["HF_HOME"] == 'C:\\hf "x"'


def test_render_comments_each_line_with_its_source() -> None:
    lines = config.render(load(env={"PARALLEL": "3"})).splitlines()
    assert any(line.startswith("parallel = 3 ") and line.endswith("# env PARALLEL") for line in lines)
    assert any(line.startswith("data_dir = ") and line.endswith("# env DATA_DIR") for line in lines)
    assert sum(line.startswith("[") for line in lines) == len(config.SECTIONS)


def test_render_of_loaded_file_loads_back_the_same(tmp_path: Path) -> None:
    first = load(env={"PORT": "9000", "EXTRA_ARGS": "-fa on"}, options={"health.ping": "runpod"})
    path = write(tmp_path, config.render(first), "rendered.toml")
    second = config.load(path, {}, check_files=False)
    assert second.values == first.values


def test_render_escapes_newlines_in_strings() -> None:
    loaded = load(env={"EXTRA_ARGS": "--system-prompt 'line one\nline two'"})
    doc = tomllib.loads(config.render(loaded))
    assert doc["backend"]["extra_args"] == ["--system-prompt", "line one\nline two"]


def test_render_quotes_env_table_keys(tmp_path: Path) -> None:
    path = write(tmp_path, '[backend]\nenv = {"otel.service" = "llamad"}\n')
    doc = tomllib.loads(config.render(load(toml=path)))
    assert doc["backend"]["env"] == {"otel.service": "llamad"}


def test_nan_is_rejected() -> None:
    with pytest.raises(ConfigError) as info:
        load(env={"IDLE_TIMEOUT": "nan"})
    assert info.value.key == "idle.timeout"


# --- replace_port ----------------------------------------------------------------


def _port_of(endpoint: str) -> int:
    _, args, kwargs = _parseServer(endpoint, None)
    return int(kwargs.get("port", args[0] if args else -1))


@given(st.integers(min_value=0, max_value=65535))
def test_replace_port_sets_any_valid_port(port: int) -> None:
    endpoint = config.replace_port("tcp:8000:interface=127.0.0.1", str(port), "api.listen", "env PORT")
    assert _port_of(endpoint) == port
    _, _, kwargs = _parseServer(endpoint, None)
    assert kwargs["interface"] == "127.0.0.1"


@given(st.integers(max_value=-1) | st.integers(min_value=65536))
def test_replace_port_rejects_out_of_range(port: int) -> None:
    with pytest.raises(ConfigError) as info:
        config.replace_port("tcp:8000:interface=127.0.0.1", str(port), "api.listen", "env PORT")
    assert str(info.value) == f"api.listen: port {port} out of range 0-65535 (from env PORT)"


@pytest.mark.parametrize(
    "endpoint, expected",
    [
        ("tcp:8000", "tcp:9"),
        ("tcp6:8000:interface=\\:\\:1", "tcp6:9:interface=\\:\\:1"),
        ("tcp:interface=127.0.0.1:port=8000", "tcp:interface=127.0.0.1:port=9"),
        ("tcp:interface=127.0.0.1", "tcp:interface=127.0.0.1:port=9"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_replace_port_forms(endpoint: str, expected: str) -> None:
    assert config.replace_port(endpoint, "9", "api.listen", "env PORT") == expected


@pytest.mark.parametrize("endpoint", ["tcp6:interface=\\:\\:1", "tcp6:port=8000:interface=\\:\\:1"])
def test_replace_port_with_ipv6_interface_and_no_positional_port(endpoint: str) -> None:
    _, args, kwargs = _parseServer(config.replace_port(endpoint, "9", "api.listen", "env PORT"), None)
    assert (args, kwargs) == ([], {"port": "9", "interface": "::1"})


def test_valid_ipv6_endpoint_with_named_port_is_accepted() -> None:
    listen = "tcp6:port=8000:interface=\\:\\:1"
    assert load(options={"api.listen": listen}).config.api.listen == listen


def test_llama_server_bin_does_not_apply_to_the_python_backend(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"")
    env = {"LLAMA_SERVER_BIN": "/opt/llama/llama-server", "MODEL_PATH": str(model)}
    loaded = config.load("", env, {"backend.kind": "llama-cpp-python"}, check_files=False)
    assert loaded.config.backend.command == "llama-server"
    assert loaded.sources["backend.command"].startswith("default")
    loaded = config.load("", env, {}, check_files=False)
    assert loaded.config.backend.command == "/opt/llama/llama-server"


# --- errors that would otherwise surface only at bind time or at the first reload -----------

EXTERNAL = {"backend.kind": "external", "backend.url": "http://127.0.0.1:9"}


def test_keys_file_that_is_a_directory(tmp_path: Path) -> None:
    env = {"AUTH_ENABLED": "true", "AUTH_KEYS_FILE": str(tmp_path)}
    with pytest.raises(ConfigError) as info:
        load(env=env, options=EXTERNAL, check_files=True)
    assert str(info.value) == f"auth.keys_file: {tmp_path} is a directory, not a keys file (from env AUTH_KEYS_FILE)"
    assert load(env={**env, "AUTH_ENABLED": "false"}, options=EXTERNAL, check_files=True)
    assert load(env=env, options=EXTERNAL, check_files=False)  # check-config --no-file-checks
    assert load(env={**env, "AUTH_KEYS_FILE": str(tmp_path / "absent")}, options=EXTERNAL, check_files=True)


@pytest.mark.parametrize("listen", ["unix:", "unix:mode=660", "unix:address="])
def test_unix_endpoint_without_a_path(listen: str) -> None:
    assert error(options={"api.listen": listen}) == (
        f"api.listen: endpoint {listen!r} has no socket path (use unix:/path/to/socket) (from option)"
    )


@pytest.mark.parametrize(
    "api, health, key",
    [
        ("tcp:8000", "tcp:8000", "health.listen"),
        ("tcp:8000", "tcp:port=8000", "health.listen"),
        ("tcp:8000", "tcp:8000:interface=127.0.0.1", "health.listen"),
        ("tcp:8000:interface=127.0.0.1", "tcp:8000:interface=127.0.0.1", "health.listen"),
        ("tcp6:8000", "tcp:8000:interface=127.0.0.1", "health.listen"),
        ("tcp6:8000:interface=\\:\\:1", "tcp:8000:interface=0\\:0\\:\\:1", "health.listen"),
        ("unix:/run/llamad.sock", "unix:address=/run/llamad.sock", "health.listen"),
    ],
)
def test_health_listen_on_the_api_endpoint(api: str, health: str, key: str) -> None:
    message = error(options={"api.listen": api, "health.listen": health})
    assert message.startswith(f"{key}: {health!r} binds the same ") and f"as api.listen ({api!r})" in message
    assert message.endswith("(from option)") and "\n" not in message


def test_api_listen_moved_onto_the_default_health_port_names_api_listen() -> None:
    assert error(env={"PORT": "8001"}) == (
        "api.listen: 'tcp:8001' binds the same port as health.listen ('tcp:8001'): the API and health endpoints "
        "need different ports (from env PORT)"
    )


@pytest.mark.parametrize(
    "api, health",
    [
        ("tcp:8000:interface=127.0.0.1", "tcp:8000:interface=127.0.0.2"),
        ("tcp:8000:interface=127.0.0.1", "tcp6:8000:interface=\\:\\:1"),
        ("tcp:0", "tcp:0"),
        ("unix:/run/a.sock", "unix:/run/b.sock"),
        ("unix:/run/a.sock", "tcp:8001"),
        ("systemd:domain=INET:index=0", "systemd:domain=INET:index=0"),
    ],
)
def test_endpoints_that_do_not_clash(api: str, health: str) -> None:
    loaded = load(options={"api.listen": api, "health.listen": health})
    assert (loaded.config.api.listen, loaded.config.health.listen) == (api, health)


@pytest.mark.parametrize(
    "listen, problem",
    [
        ("tcp:8000:interface=300.1.1.1", "interface '300.1.1.1' is not an IP address"),
        ("tcp:8000:interface=localhost", "interface 'localhost' is not an IP address"),
        ("tcp6:8000:interface=\\:\\:1\\:", "interface '::1:' is not an IP address"),
        ("tcp6:8000:interface=127.0.0.1", "interface '127.0.0.1' is not an IPv6 address (tcp6 needs one)"),
    ],
)
def test_interface_must_be_an_ip_address(listen: str, problem: str) -> None:
    assert error(options={"api.listen": listen}) == f"api.listen: {problem} (from option)"


@pytest.mark.parametrize("listen", ["tcp:8000:interface=0.0.0.0", "tcp:8000:interface=\\:\\:1",
                                    "tcp6:8000:interface=fe80\\:\\:1%eth0", "tcp:interface=10.0.0.1:port=8000"])
def test_ip_address_interfaces_are_accepted(listen: str) -> None:
    assert load(options={"api.listen": listen}).config.api.listen == listen
