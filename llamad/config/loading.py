"""Loading: defaults < TOML file < environment < options, then the checks, then the frozen ``Config``.

:func:`load` returns a :class:`Loaded`: the config and, for ``check-config``, where each value came from.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Mapping

from llamad.config.commands import command_missing, find_command
from llamad.config.endpoints import check_endpoint, clash
from llamad.config.environment import ENV_KEYS, PORT_ENV_KEYS, read_environment
from llamad.config.errors import ConfigError
from llamad.config.models import fleet_models, no_models
from llamad.config.schema import (
    CHOICES, KEY_TYPES, MINIMUM, MODEL_ID, MODEL_KEY_TYPES, POSITIVE, REMOVED_KEYS, SECTIONS, Config, ModelConfig,
    defaults,
)
from llamad.config.values import check_choice, check_number, coerce, parse_text, parse_toml

DEFAULT_CONFIG_FILE = "/etc/llamad/llamad.toml"
DATA_DIR_CANDIDATES = ("/runpod-volume", "/workspace")
FALLBACK_DATA_DIR = "./var"
# The source of auth.enabled when it was set nowhere but the keys file exists.
AUTH_AUTO_SOURCE = "default (keys file present)"


@dataclass(frozen=True)
class Loaded:
    """The effective config and, per key, where its value came from (a fleet's models as models.<id>.<key>)."""

    config: Config
    sources: dict[str, str]
    values: dict[str, Any]
    warnings: tuple[str, ...] = ()  # settings that have no effect, one line each


def unknown_key(key: str, source: str, table: bool = False) -> ConfigError:
    """The error for a key no schema knows, with a hint: the nearest known key (a typo, a key in the wrong
    table), or the key an environment variable's name sets (``--set CTX=...``); ``table``: a TOML table's
    name, which may be a misspelt section."""
    prefix, name = "", key
    model_id, _, model_key = key[len("models."):].rpartition(".")
    if key.startswith("models.") and model_id:
        prefix, name, known = f"models.{model_id}.", model_key, list(MODEL_KEY_TYPES)
    else:
        known = [*SECTIONS, "models"] if table else list(KEY_TYPES)
    target = None if prefix else ENV_KEYS.get(key) or PORT_ENV_KEYS.get(key)
    if target is not None:
        keys = (target,) if isinstance(target, str) else target
        return ConfigError(key, f"unknown key ({key} is an environment variable; the key is {' and '.join(keys)})",
                           source)
    close = difflib.get_close_matches(name, known, n=1)
    return ConfigError(key, f"unknown key (did you mean {prefix}{close[0]}?)" if close else "unknown key", source)


def _removed(key: str, source: str) -> str:
    """The warning for a key that no longer does anything."""
    return f"{key}: {REMOVED_KEYS[key]} (from {source})"


def _flatten_toml(doc: dict[str, Any], path: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in doc.items():
        if name == "models":
            flat.update(_flatten_models(value, path))
        elif name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(name, f"expected a [{name}] table, got {value!r}", path)
            for sub, subvalue in value.items():
                key = f"{name}.{sub}"
                if key not in KEY_TYPES and key not in REMOVED_KEYS:
                    raise unknown_key(key, path)
                flat[key] = subvalue
        elif name in KEY_TYPES:
            flat[name] = value
        else:
            raise unknown_key(name, path, table=isinstance(value, dict))
    return flat


def _flatten_models(tables: Any, path: str) -> dict[str, Any]:
    """``[models.<id>]`` tables as ``models.<id>.<key>``, and ``models``: the ids in file order."""
    if not isinstance(tables, dict):
        raise ConfigError("models", f"expected a [models] table, got {tables!r}", path)
    flat: dict[str, Any] = {"models": tuple(tables)}
    for model_id, table in tables.items():
        prefix = f"models.{model_id}"
        if not isinstance(table, dict):
            raise ConfigError(prefix, f"expected a [{prefix}] table, got {table!r} "
                              "(a model's keys go in its own [models.<id>] table)", path)
        if not MODEL_ID.match(model_id):
            raise ConfigError(prefix, "a model id is letters, digits and . _ : - (starting with a letter or digit)",
                              path)
        for key, value in table.items():
            if key not in MODEL_KEY_TYPES:
                if not isinstance(value, dict):
                    raise unknown_key(f"{prefix}.{key}", path)
                raise ConfigError(f"{prefix}.{key}", f'unknown key (an id with a dot is quoted: '
                                  f'[models."{model_id}.{key}"])', path)
            flat[f"{prefix}.{key}"] = value
    return flat


def read_toml(path: str) -> dict[str, Any]:
    """Read and flatten one TOML file; every failure names the file.

    Model tables come back as ``models.<id>.<key>``, with ``models`` holding the ids (absent: no [models]);
    a removed key (``REMOVED_KEYS``) comes back too, for the caller to warn about.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
    try:
        doc = parse_toml(data)
    except ValueError as e:
        raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    return _flatten_toml(doc, path)


def load(
    config_file: str | None = None,
    environ: Mapping[str, str] | None = None,
    options: Mapping[str, str | Any] | None = None,
    check_files: bool = True,
    require_model: bool = True,
) -> Loaded:
    """Build the effective config.

    ``options`` maps keys to values from the command line (strings are parsed
    like environment values).  With ``check_files`` off, missing model files and
    commands are not errors (``check-config`` on another machine).  With
    ``require_model`` off, naming no model is not an error: tools that only need
    the data dir or the keys file must work in a shell with no MODEL_PATH.

    Options may also set ``models.<id>.<key>`` for a model the file defines or
    fleet.models_dir holds.  A removed key, in the file or an option, is a warning.
    """
    environ = os.environ if environ is None else environ
    values = defaults()
    sources = {key: "default" for key in values}
    warnings: list[str] = []

    path = config_file
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    tables: dict[str, dict[str, Any]] | None = None  # [models.<id>] -> its keys; None: no [models]
    if path:
        flat = read_toml(path)
        if "models" in flat:
            tables = {model_id: {} for model_id in flat.pop("models")}
        for key, value in flat.items():
            if key in REMOVED_KEYS:
                warnings.append(_removed(key, path))
                continue
            if key.startswith("models."):
                model_id, _, name = key[len("models."):].rpartition(".")
                tables[model_id][name] = coerce(key, value, path)  # type: ignore[index]
                continue
            values[key] = coerce(key, value, path)
            sources[key] = path

    warnings.extend(read_environment(environ, values, sources))

    model_options: dict[str, dict[str, Any]] = {}
    for key, value in (options or {}).items():
        model_id, _, name = key[len("models."):].rpartition(".")
        if key.startswith("models.") and model_id and name in MODEL_KEY_TYPES:
            model_options.setdefault(model_id, {})[name] = value  # parsed once the model is known
            continue
        if key in REMOVED_KEYS:
            warnings.append(_removed(key, "option"))
            continue
        if key not in KEY_TYPES:
            raise unknown_key(key, "option")
        values[key] = (
            parse_text(key, value, "option") if isinstance(value, str) else coerce(key, value, "option")
        )
        sources[key] = "option"

    if values["backend.kind"] != "llama-server" and sources["backend.command"] == "env LLAMA_SERVER_BIN":
        # The variable names the llama-server binary; other kinds run Python.
        values["backend.command"] = defaults()["backend.command"]
        sources["backend.command"] = "default (LLAMA_SERVER_BIN is for kind llama-server)"
    _resolve_paths(values, sources)
    if sources["auth.enabled"] == "default" and os.path.exists(values["auth.keys_file"]):
        # llama-gguf-inference had auth on by default: a keys file where one is looked for means keys are wanted.
        values["auth.enabled"] = True
        sources["auth.enabled"] = AUTH_AUTO_SOURCE
    fleet = tables is not None or bool(values["fleet.models_dir"])
    if check_files and not fleet:  # a fleet's [backend] is what its models inherit: each model finds its own
        find_command(values, sources, "backend.command", "backend.kind")
    _validate(values, sources, check_files, require_model, fleet)
    models: dict[str, ModelConfig] = {}
    if fleet:
        models = fleet_models(values, sources, tables, model_options, check_files, require_model, warnings,
                              path or "")
    elif model_options:
        model_id = next(iter(model_options))
        raise ConfigError(f"models.{model_id}", "no such model: this config has no [models] tables and no "
                          "fleet.models_dir (a single model takes backend.* keys)", "option")
    config = _build(values, models, fleet)
    _check_default(config, sources["fleet.default"])
    return Loaded(config, sources, values, tuple(warnings))


def _resolve_paths(values: dict[str, Any], sources: dict[str, str]) -> None:
    """Fill the keys whose empty value means 'derive from data_dir'."""
    if not values["data_dir"]:
        values["data_dir"] = next(
            (d for d in DATA_DIR_CANDIDATES if os.path.isdir(d)), FALLBACK_DATA_DIR
        )
        sources["data_dir"] = "auto-detected"
    data_dir = values["data_dir"]
    derived = {
        "backend.models_dir": os.path.join(data_dir, "models"),
        "logs.dir": os.path.join(data_dir, "logs"),
        "auth.keys_file": os.path.join(data_dir, "api_keys.txt"),
    }
    for key, value in derived.items():
        if not values[key]:
            values[key] = value
            sources[key] = "derived from data_dir"
    model = values["backend.model"]
    if model and sources["backend.model"] == "env MODEL_NAME":
        values["backend.model"] = os.path.join(values["backend.models_dir"], model)
    elif model and os.sep not in model and not os.path.exists(model):
        # A bare file name resolves under models_dir, as MODEL_NAME does.
        values["backend.model"] = os.path.join(values["backend.models_dir"], model)


def _validate(
    values: dict[str, Any], sources: dict[str, str], check_files: bool, require_model: bool = True,
    fleet: bool = False,
) -> None:
    """Check the plain keys; in a fleet, what needs a model is checked per model."""
    for key, choices in CHOICES.items():
        check_choice(key, values[key], choices, sources[key])
    for key, hint in KEY_TYPES.items():
        check_number(key, values[key], hint, sources[key], MINIMUM.get(key, 0), key in POSITIVE)
    api = check_endpoint("api.listen", values["api.listen"], sources["api.listen"])
    health = check_endpoint("health.listen", values["health.listen"], sources["health.listen"])
    if clash(api, health):
        # Name the key that was set: a changed api.listen can land on the default health port.
        key, other = "health.listen", "api.listen"
        if sources[key] == "default" and sources[other] != "default":
            key, other = other, key
        what = "socket path" if api is not None and api[0] == "unix" else "port"
        raise ConfigError(key, f"{values[key]!r} binds the same {what} as {other} ({values[other]!r}): "
                          f"the API and health endpoints need different {what}s", sources[key])
    for name, value in values["backend.env"].items():
        if not name or "=" in name:
            raise ConfigError("backend.env", f"bad variable name {name!r}", sources["backend.env"])

    keys_file = values["auth.keys_file"]
    if check_files and values["auth.enabled"] and os.path.isdir(keys_file):
        raise ConfigError("auth.keys_file", f"{keys_file} is a directory, not a keys file", sources["auth.keys_file"])

    api_server = values["scale_from_zero.api_server"]
    if api_server and not re.match(r"^https?://[^/\s]+", api_server):
        raise ConfigError("scale_from_zero.api_server", f"must be an http:// or https:// URL, got {api_server!r}",
                          sources["scale_from_zero.api_server"])
    kind = values["backend.kind"]
    if fleet:
        return
    if kind == "none":
        if not values["scale_from_zero.enabled"]:
            # Nothing to serve and nothing to watch: almost surely a mistake.
            raise ConfigError("backend.kind", "'none' runs no model; it is for a scale-from-zero poller pod "
                              "(set scale_from_zero.enabled = true)", sources["backend.kind"])
        return
    if kind == "external":
        url = values["backend.url"]
        if not re.match(r"^http://[^/\s]+", url):
            # The proxy's lean client speaks plain HTTP/1.1: put TLS in front of llamad, not behind it.
            raise ConfigError("backend.url", f"kind 'external' needs an http:// URL, got {url!r}",
                              sources["backend.url"])
        return
    model = values["backend.model"]
    if not model and require_model:
        raise _no_model(sources["backend.model"])
    if not check_files:
        return
    if model and not os.path.isfile(model):
        raise ConfigError("backend.model", f"model file not found: {model}", sources["backend.model"])
    command = values["backend.command"]
    if kind == "llama-server" and shutil.which(command) is None:
        raise ConfigError("backend.command", command_missing(command), sources["backend.command"])


def _no_model(source: str) -> ConfigError:
    return ConfigError("backend.model", "no model configured (set backend.model, MODEL_PATH or MODEL_NAME)", source)


def missing_model(loaded: Loaded) -> ConfigError | None:
    """The error ``twistd llamad`` gives for this config (loaded with ``require_model`` off) if it names no model."""
    if not loaded.config.single_model:
        fleet = loaded.config.fleet
        return None if loaded.config.models else no_models(fleet.models_dir, loaded.sources["fleet.models_dir"])
    backend = loaded.config.backend
    if backend.kind in ("llama-server", "llama-cpp-python") and not backend.model:
        return _no_model(loaded.sources["backend.model"])
    return None


def _build(values: Mapping[str, Any], models: Mapping[str, ModelConfig] | None = None, fleet: bool = False) -> Config:
    sections = {}
    for section, cls in SECTIONS.items():
        prefix = section + "."
        sections[section] = cls(**{k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)})
    return Config(data_dir=values["data_dir"], **sections, single_model=not fleet, fleet_models=dict(models or {}))


def _check_default(config: Config, source: str) -> None:
    name = config.fleet.default
    if name and name not in config.names:
        known = list(config.names)
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "") if known else "none"
        raise ConfigError("fleet.default", f"{name!r} names no model (ids and aliases: {shown})", source)
