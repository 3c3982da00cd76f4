"""The fleet's models: ``[models.<id>]`` tables and the GGUFs of ``fleet.models_dir``, each inheriting
``[backend]``, with each model's effective keys and their sources, and the checks per model and across them."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Mapping

from llamad.config.commands import command_missing, find_command
from llamad.config.errors import ConfigError
from llamad.config.schema import (
    ALIAS, BACKEND_KEYS, CHOICES, MINIMUM, MMPROJ_FLAGS, MODEL_DEFAULTS, MODEL_ID, MODEL_KEY_TYPES, MODEL_ONLY_KEYS,
    POSITIVE, BackendConfig, Bytes, ModelConfig, defaults, mmproj_of,
)
from llamad.config.values import check_choice, check_number, coerce, parse_text

# The source of what a scan of fleet.models_dir found.
SCANNED = "scanned from fleet.models_dir"
# A shard of a split model: name-00001-of-00003.gguf.
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class ScannedModel:
    """A model found in fleet.models_dir; a problem is an error unless the model's table settles it."""

    model: str
    mmproj: str = ""
    model_problem: str = ""  # several model files: the table must set model
    mmproj_problem: str = ""  # several projectors: the table's extra_args must name one


def _is_gguf(name: str) -> bool:
    return name.lower().endswith(".gguf")


def _is_mmproj(name: str) -> bool:
    return "mmproj" in name.lower()


def _scan_subdir(path: str, name: str) -> ScannedModel | str:
    """A sub-directory's model (a multimodal or a split one), or why it holds none."""
    files = sorted(f for f in os.listdir(path) if _is_gguf(f) and os.path.isfile(os.path.join(path, f)))
    mmprojs = [f for f in files if _is_mmproj(f)]
    weights = [f for f in files if not _is_mmproj(f)]
    models = [f for f in weights if not (m := SHARD.search(f)) or int(m.group(1)) == 1]
    if not models:
        return f"{name}/ holds no model file" + (" (shards, but no -00001-of- one)" if weights else "")
    return ScannedModel(
        os.path.join(path, models[0]),
        os.path.join(path, mmprojs[0]) if mmprojs else "",
        f"{name}/ holds more than one model ({', '.join(models)}): set model in [models.{name}], "
        "or keep one" if len(models) > 1 else "",
        f"{name}/ holds more than one mmproj file ({', '.join(mmprojs)}): name one in [models.{name}] extra_args "
        "(--mmproj PATH), or keep one" if len(mmprojs) > 1 else "",
    )


def scan_models_dir(directory: str, source: str = "") -> tuple[dict[str, ScannedModel], list[str]]:
    """The models in a directory laid out for llama-server's --models-dir, and warnings about what was left out.

    A ``*.gguf`` file is a model named after its stem (a top-level split model: after the stem of its first
    shard, less the shard suffix); a sub-directory is a model named after it: its ``*mmproj*.gguf`` is the
    projector, its other GGUF (or first shard) the model.  Projector files are never models; hidden entries
    are skipped.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise ConfigError("fleet.models_dir", f"cannot read {directory}: {e.strerror}", source) from None
    found: dict[str, ScannedModel] = {}
    where: dict[str, str] = {}
    warnings: list[str] = []
    for entry in entries:
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            model_id, scanned = entry.name, _scan_subdir(entry.path, entry.name)
            if isinstance(scanned, str):
                warnings.append(f"fleet.models_dir: {scanned}; skipped")
                continue
        elif entry.is_file() and _is_gguf(entry.name) and not _is_mmproj(entry.name):
            shard = SHARD.search(entry.name)
            if shard and int(shard.group(1)) != 1:
                continue
            model_id = entry.name[:shard.start()] if shard else entry.name[:-len(".gguf")]
            scanned = ScannedModel(entry.path)
        else:
            continue
        if not MODEL_ID.match(model_id):
            warnings.append(f"fleet.models_dir: {entry.name} skipped: a model id is letters, digits and . _ : - "
                            "(starting with a letter or digit); rename it, or give it a [models.<id>] table")
            continue
        if model_id in found:
            here = entry.name + ("/" if entry.is_dir() else "")
            raise ConfigError("fleet.models_dir", f"two models named {model_id!r} in {directory}: "
                              f"{where[model_id]} and {here}", source)
        found[model_id], where[model_id] = scanned, entry.name + ("/" if entry.is_dir() else "")
    return found, warnings


def fleet_models(
    values: dict[str, Any], sources: dict[str, str], tables: dict[str, dict[str, Any]] | None,
    options: dict[str, dict[str, Any]], check_files: bool, require_model: bool, warnings: list[str], path: str,
) -> dict[str, ModelConfig]:
    """The fleet's models, by id; each one's effective keys go into values and sources as models.<id>.<key>."""
    if values["backend.kind"] == "none":
        raise ConfigError("backend.kind", "'none' runs no model, but the config defines some ([models] or "
                          "fleet.models_dir): remove them, or pick a kind that runs them", sources["backend.kind"])
    directory, dir_source = values["fleet.models_dir"], sources["fleet.models_dir"]
    if tables == {} and not directory:
        raise ConfigError("models", "the [models] table holds no model: add [models.<id>] tables, or set "
                          "fleet.models_dir", path)
    scanned: dict[str, ScannedModel] = {}
    if directory and os.path.isdir(directory):
        scanned, notes = scan_models_dir(directory, dir_source)
        warnings.extend(notes)
    elif directory and check_files:
        raise ConfigError("fleet.models_dir", f"not a directory: {directory}", dir_source)
    elif directory:
        warnings.append(f"fleet.models_dir: {directory} is not a directory here; its models are left out")
    tables = tables or {}
    ids = [*tables, *(model_id for model_id in scanned if model_id not in tables)]
    for model_id in options:
        if model_id not in tables and model_id not in scanned:
            raise ConfigError(f"models.{model_id}", "no such model (--set changes a model of a [models.<id>] table "
                              "or of fleet.models_dir)", "option")
    models: dict[str, ModelConfig] = {}
    served: set[str] = set()  # files the tables run: not served a second time under a scanned name
    for model_id in ids:
        if model_id not in tables and os.path.realpath(scanned[model_id].model) in served:
            continue
        vals, srcs, raw = _model_keys(model_id, values, sources, tables.get(model_id, {}), path,
                                      scanned.get(model_id), options.get(model_id, {}), warnings)
        if check_files:
            find_command(vals, srcs, "command", "kind")
        _validate_model(model_id, vals, raw, check_files, model_id in scanned)
        for key in MODEL_KEY_TYPES:
            values[f"models.{model_id}.{key}"] = vals[key]
            sources[f"models.{model_id}.{key}"] = srcs[key]
        backend = BackendConfig(**{key: vals[key] for key in BACKEND_KEYS}, name=model_id)
        if backend.model:
            served.add(os.path.realpath(backend.model))
        models[model_id] = ModelConfig(model_id, backend, **{key: vals[key] for key in MODEL_ONLY_KEYS},
                                       mmproj=mmproj_of(backend.extra_args), scanned=model_id in scanned)
    _check_fleet(models, values, sources)
    if directory and os.path.isdir(directory) and not models and require_model:
        raise no_models(directory, dir_source)
    if sources["backend.model"] != "default" and values["backend.model"] and not any(
        sources[f"models.{model_id}.model"].startswith("inherited") for model_id in models
    ):
        warnings.append(f"backend.model ({values['backend.model']}, from {sources['backend.model']}) is not served: "
                        "in a fleet it is only the model of a [models.<id>] table that names none")
    return models


def _model_keys(
    model_id: str, values: dict[str, Any], sources: dict[str, str], table: dict[str, Any], path: str,
    scanned: ScannedModel | None, options: dict[str, Any], warnings: list[str],
) -> tuple[dict[str, Any], dict[str, str], dict[str, str]]:
    """One model's effective keys: [backend] < the scan < its table < options.

    Returns the values, the sources ``check-config`` shows, and the plain sources errors name.
    """
    prefix = f"models.{model_id}."
    own: dict[str, tuple[Any, str]] = {name: (value, path) for name, value in table.items()}
    for name, value in options.items():
        key = prefix + name
        own[name] = (parse_text(key, value, "option") if isinstance(value, str) else coerce(key, value, "option"),
                     "option")
    vals: dict[str, Any] = {}
    srcs: dict[str, str] = {}
    raw: dict[str, str] = {}

    def put(name: str, value: Any, source: str, plain: str | None = None) -> None:
        vals[name], srcs[name], raw[name] = value, source, source if plain is None else plain

    for name in BACKEND_KEYS:
        source = sources[f"backend.{name}"]
        put(name, values[f"backend.{name}"], f"inherited from [backend] ({source})", source)
    if sources["backend.start"] == "default":
        put("start", "lazy", "default (a fleet model starts on demand unless preload)", "default")
    put("idle_timeout", values["idle.timeout"], f"inherited from idle.timeout ({sources['idle.timeout']})",
        sources["idle.timeout"])
    for name in ("aliases", "memory", "pinned", "preload"):
        put(name, MODEL_DEFAULTS[name], "default")
    if scanned is not None:
        put("model", scanned.model, SCANNED, sources["fleet.models_dir"])
    inherited_env = vals["env"]
    for name, (value, source) in own.items():
        put(name, value, source)
    if "env" in own and inherited_env:  # merged, so a model adds variables without repeating [backend]'s
        put("env", {**inherited_env, **vals["env"]}, f"{raw['env']}, over [backend] env", raw["env"])
    if not vals["models_dir"]:
        vals["models_dir"] = values["backend.models_dir"]
    model = vals["model"]
    if "model" in own and model and os.sep not in model and not os.path.exists(model):
        vals["model"] = os.path.join(vals["models_dir"], model)  # a bare file name, as backend.model
    if vals["kind"] != "llama-server" and "command" not in own and raw["command"] == "env LLAMA_SERVER_BIN":
        put("command", defaults()["backend.command"], "default (LLAMA_SERVER_BIN is for kind llama-server)",
            "default")
    if vals["kind"] == "external" and "memory" not in own:
        put("memory", Bytes(0), "default (kind external takes no memory here)")

    # preload and start are one setting: the later layer wins; both in one layer must agree.
    preload, start = own.get("preload"), own.get("start")
    if preload and start and preload[0] != (start[0] == "eager") and preload[1] == start[1]:
        raise ConfigError(prefix + "preload", f"preload = {str(preload[0]).lower()} contradicts "
                          f"start = {start[0]!r} (set one of them)", preload[1])
    if preload and not (start and start[1] == "option" and preload[1] != "option"):
        put("start", "eager" if vals["preload"] else "lazy", f"follows preload ({raw['preload']})", raw["preload"])
    elif raw["start"] != "default":
        put("preload", vals["start"] == "eager", f"follows start ({raw['start']})", raw["start"])

    if scanned is not None:
        if scanned.model_problem and "model" not in own:
            raise ConfigError("fleet.models_dir", scanned.model_problem, sources["fleet.models_dir"])
        named = any(arg.partition("=")[0] in MMPROJ_FLAGS for arg in vals["extra_args"])
        if scanned.mmproj_problem and not named:
            raise ConfigError("fleet.models_dir", scanned.mmproj_problem, sources["fleet.models_dir"])
        if scanned.mmproj and not named:
            if vals["kind"] == "llama-server":
                put("extra_args", (*vals["extra_args"], "--mmproj", scanned.mmproj),
                    f"{srcs['extra_args']}, --mmproj {SCANNED}", raw["extra_args"])
            else:
                warnings.append(f"models.{model_id}: {scanned.mmproj} is not passed to kind {vals['kind']!r} "
                                "(only llama-server takes --mmproj; set extra_args)")
    return vals, srcs, raw


def _validate_model(model_id: str, vals: dict[str, Any], raw: dict[str, str], check_files: bool,
                    scanned: bool) -> None:
    """One model's keys, checked as [backend]'s are; errors name models.<id>.<key>."""
    prefix = f"models.{model_id}."
    for name, hint in MODEL_KEY_TYPES.items():
        key, value, source = prefix + name, vals[name], raw[name]
        if name == "kind":
            check_choice(key, value, tuple(c for c in CHOICES["backend.kind"] if c != "none"), source)
        elif f"backend.{name}" in CHOICES:
            check_choice(key, value, CHOICES[f"backend.{name}"], source)
        check_number(key, value, hint, source, MINIMUM.get(f"backend.{name}", 0), f"backend.{name}" in POSITIVE)
    for name in vals["env"]:
        if not name or "=" in name:
            raise ConfigError(prefix + "env", f"bad variable name {name!r}", raw["env"])
    for alias in vals["aliases"]:
        if not ALIAS.match(alias):
            raise ConfigError(prefix + "aliases", f"{alias!r} is no usable name (no spaces, commas or control "
                              "characters)", raw["aliases"])
    kind = vals["kind"]
    if kind == "external":
        if scanned:
            raise ConfigError(prefix + "kind", "a model of fleet.models_dir runs its file; kind 'external' runs "
                              "none", raw["kind"])
        if not re.match(r"^http://[^/\s]+", vals["url"]):
            raise ConfigError(prefix + "url", f"kind 'external' needs an http:// URL, got {vals['url']!r}",
                              raw["url"])
        return
    model = vals["model"]
    if not model:
        raise ConfigError(prefix + "model", f"no model file (set model in [models.{model_id}])", raw["model"])
    if not check_files:
        return
    if not os.path.isfile(model):
        raise ConfigError(prefix + "model", f"model file not found: {model}", raw["model"])
    command = vals["command"]
    if kind == "llama-server" and shutil.which(command) is None:
        raise ConfigError(prefix + "command", command_missing(command), raw["command"])


def _check_fleet(models: Mapping[str, ModelConfig], values: dict[str, Any], sources: dict[str, str]) -> None:
    """What holds across models: every name routes to one model, and the limits leave room for what must load."""
    owner = {model_id: model_id for model_id in models}
    for model_id, model in models.items():
        for alias in model.aliases:
            other = owner.setdefault(alias, model_id)
            if other != model_id:
                what = f"the id of models.{alias}" if alias in models else f"already an alias of models.{other}"
                raise ConfigError(f"models.{model_id}.aliases", f"{alias!r} is {what}",
                                  sources[f"models.{model_id}.aliases"])
    limit = values["fleet.max_loaded"]
    for flag in ("preload", "pinned"):
        marked = [model_id for model_id, model in models.items() if getattr(model, flag)]
        if limit and len(marked) > limit:
            raise ConfigError("fleet.max_loaded", f"{limit} is fewer than the models with {flag} = true "
                              f"({', '.join(marked)})", sources["fleet.max_loaded"])


def no_models(directory: str, source: str) -> ConfigError:
    return ConfigError("fleet.models_dir", f"no models in {directory} (a *.gguf file, or a sub-directory holding one, "
                       "is a model)", source)
