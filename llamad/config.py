"""The config contract: defaults < TOML file < environment < twistd options.

Everything that reads configuration goes through :func:`load`, which returns a
frozen :class:`Config` and, for ``check-config``, where each value came from.
``Config.models`` holds every model: the ``[models.<id>]`` tables and the GGUFs of
``fleet.models_dir`` (each inheriting ``[backend]``), or else the one model of ``[backend]``.
Every problem is a :class:`ConfigError` naming the key, so the daemon can exit
with one line before any port is bound.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import shlex
import shutil
import sys
import tomllib
import typing
from collections import abc
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

DEFAULT_CONFIG_FILE = "/etc/llamad/llamad.toml"
DATA_DIR_CANDIDATES = ("/runpod-volume", "/workspace")
FALLBACK_DATA_DIR = "./var"


class ConfigError(Exception):
    """A bad config value; ``str()`` is the one line shown to the user."""

    def __init__(self, key: str, problem: str, source: str = "") -> None:
        self.key = key
        self.problem = problem
        self.source = source
        where = f" (from {source})" if source and source != "default" else ""
        super().__init__(f"{key}: {problem}{where}")


# A size in bytes: an integer, or text such as "8GiB" (binary units) or "8GB" (decimal ones).
Bytes = typing.NewType("Bytes", int)
# A size in bytes, or "auto": measured or estimated by the caller when it needs the number.
AUTO = "auto"
MemorySize = typing.Union[Bytes, typing.Literal["auto"]]
GIB = 1 << 30
# Dataclass fields that carry state but are no config key (no TOML, env, option or render line).
NOT_A_KEY = {"config_key": False}


@dataclass(frozen=True)
class ApiConfig:
    listen: str = "tcp:8000"
    max_body_bytes: int = 10485760
    request_timeout: float = 600
    drain_timeout: float = 30
    cors_origins: tuple[str, ...] = ()
    header_timeout: float = 10
    body_timeout: float = 30  # seconds a request body may go without a byte
    max_incomplete_per_client: int = 64  # requests one client IP may have arriving at once; 0 = no limit
    max_headers: int = 64  # headers in one request (431 past it)
    max_header_line: int = 8192  # bytes in one header line (431 past it)
    max_request_line: int = 8192  # bytes in the request line (414 past it)
    fast_path: bool = True  # httptools' parser and llamad's own HTTP/1.1 server; false: twisted.web
    metrics_format: str = "prometheus"  # what /metrics answers a client that names neither format; or "json"


@dataclass(frozen=True)
class HealthConfig:
    listen: str = "tcp:8001"
    ping: str = "always"


@dataclass(frozen=True)
class BackendConfig:
    kind: str = "llama-server"
    command: str = "llama-server"
    model: str = ""
    models_dir: str = ""
    url: str = ""
    gpu_layers: int = 99
    context: int = 4096
    parallel: int = 4
    threads: int = 0
    embeddings: bool = False  # serve /v1/embeddings (llama-server --embeddings)
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    start: str = "eager"
    ready_timeout: float = 600
    # Not a key: a fleet model's id, so the child answers to the name requests route by.
    name: str = field(default="", metadata=NOT_A_KEY)

    @property
    def model_id(self) -> str:
        """The id shown in ``/v1/models``: the fleet id if any, else the model file's stem."""
        return self.name or (Path(self.model).stem if self.model else "")


@dataclass(frozen=True)
class SupervisorConfig:
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    crash_loop_limit: int = 5
    crash_loop_window: float = 120
    failed_retry_after: float = 300
    stop_timeout: float = 30
    health_interval: float = 5  # seconds between health checks of a ready child; 0 = none
    health_timeout: float = 3
    health_failures: int = 3  # failed checks in a row that mark the child wedged


@dataclass(frozen=True)
class AdmissionConfig:
    max_concurrent: int = 0
    max_queue: int = 128
    queue_timeout: float = 300


@dataclass(frozen=True)
class IdleConfig:
    timeout: float = 0
    action: str = "unload"


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False
    keys_file: str = ""
    protect_metrics: bool = False
    default_rate: int = 0  # requests per minute for a key whose line sets none; 0 = no limit
    priorities: Mapping[str, int] = field(default_factory=dict)  # class name -> level (higher first)
    priority_ageing: float = 30.0  # seconds of waiting that count as one level


@dataclass(frozen=True)
class LogsConfig:
    dir: str = ""
    max_bytes: int = 52428800
    keep: int = 10
    access: bool = True  # logs/access/latest.txt: one JSON line per API request


@dataclass(frozen=True)
class ScaleFromZeroConfig:
    enabled: bool = False
    interval: float = 0.1
    namespaces: tuple[str, ...] = ()
    api_server: str = ""
    kubeconfig: str = ""
    pool_group: str = "inference.networking.k8s.io"
    epp_token_file: str = ""
    queue_metrics: tuple[str, ...] = (
        "inference_extension_flow_control_queue_size",
        "llm_d_epp_flow_control_queue_size",
    )
    max_concurrency: int = 10
    scrape_timeout: float = 5


@dataclass(frozen=True)
class FleetConfig:
    models_dir: str = ""  # serve every GGUF in this directory, laid out as for llama-server --models-dir; "" = none
    default: str = ""  # the model (id or alias) for a request that names none; "" = none
    memory_budget: MemorySize = AUTO  # bytes the loaded models may take; "auto": GPU (else system) memory - reserve
    memory_reserve: Bytes = Bytes(GIB)  # bytes "auto" leaves free
    max_loaded: int = 0  # models loaded at once; 0 = no limit
    min_resident: float = 5  # seconds a loaded model with requests keeps its memory at least; an idle one gives way
    swap_quantum: float = 10  # seconds a model with requests keeps its memory once another waits for room

    def budget(self, auto_budget: Callable[[int], tuple[int, str]]) -> tuple[int, str]:
        """The budget in bytes and how it was found; "auto" asks ``auto_budget(memory_reserve)``
        (``llamad.fleet.machine.auto_budget``) only now, so loading a config probes no GPU."""
        if self.memory_budget == AUTO:
            return auto_budget(self.memory_reserve)
        return int(self.memory_budget), "fleet.memory_budget"


@dataclass(frozen=True)
class ModelConfig:
    """One model: how to run its child (a full BackendConfig) and how the fleet treats it."""

    id: str
    backend: BackendConfig
    aliases: tuple[str, ...] = ()  # more names that route here
    memory: MemorySize = AUTO  # bytes it takes loaded; "auto": the caller estimates from the GGUF
    idle_timeout: float = 0  # seconds without a request before it is unloaded; 0 = never
    pinned: bool = False  # never evicted to make room
    preload: bool = False  # started at boot (always equals backend.start == "eager")
    # Not keys: what the config found out.
    mmproj: str = field(default="", metadata=NOT_A_KEY)  # the multimodal projector in extra_args, "" if none
    scanned: bool = field(default=False, metadata=NOT_A_KEY)  # found in fleet.models_dir

    @property
    def names(self) -> tuple[str, ...]:
        """Every name a request may use for this model."""
        return (self.id, *self.aliases)


@dataclass(frozen=True)
class Config:
    data_dir: str = ""
    api: ApiConfig = field(default_factory=ApiConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    scale_from_zero: ScaleFromZeroConfig = field(default_factory=ScaleFromZeroConfig)
    # True: no [models] and no fleet.models_dir, today's one model from [backend].
    single_model: bool = True
    # The fleet's models ([models.<id>] tables and fleet.models_dir), in order; unused when single_model.
    fleet_models: Mapping[str, ModelConfig] = field(default_factory=dict)

    @property
    def max_concurrent(self) -> int:
        """Admission limit: 0 means one per llama.cpp slot."""
        return self.admission.max_concurrent or self.backend.parallel

    @cached_property
    def models(self) -> Mapping[str, ModelConfig]:
        """Every model by id; a single-model config has one, built from [backend] (none for kind "none")."""
        return self.fleet_models if not self.single_model else single_model(self)

    @cached_property
    def names(self) -> Mapping[str, str]:
        """Every id and alias -> the model's id."""
        return {name: model.id for model in self.models.values() for name in model.names}

    @property
    def default_model(self) -> str:
        """The id for a request that names no model: fleet.default's model, else a single model's id, else ""."""
        if self.fleet.default:
            return self.names.get(self.fleet.default, "")
        return next(iter(self.models), "") if self.single_model else ""


def single_model(config: Config) -> dict[str, ModelConfig]:
    """Today's one model, from [backend]: its id is the file's stem (the URL's host for kind external)."""
    backend = config.backend
    if backend.kind == "none":
        return {}
    external = backend.kind == "external"
    model_id = backend.model_id or (urlsplit(backend.url).hostname or "" if external else "") or "default"
    if backend.model_id != model_id:
        backend = dataclasses.replace(backend, name=model_id)
    return {model_id: ModelConfig(model_id, backend, memory=Bytes(0) if external else AUTO,
                                  idle_timeout=config.idle.timeout, preload=backend.start == "eager",
                                  mmproj=mmproj_of(backend.extra_args))}


# Flags that give llama-server a multimodal projector (or none): a scanned one is not added next to them.
MMPROJ_FLAGS = ("--mmproj", "-mm", "--mmproj-url", "-mmu", "--no-mmproj")


def mmproj_of(extra_args: tuple[str, ...]) -> str:
    """The projector file named in extra_args ('--mmproj PATH', '-mm PATH' or '--mmproj=PATH'); "" if none."""
    for i, arg in enumerate(extra_args):
        if arg in ("--mmproj", "-mm") and i + 1 < len(extra_args):
            return extra_args[i + 1]
        if arg.startswith("--mmproj="):
            return arg.partition("=")[2]
    return ""


# Environment variables: name -> key (or keys).  MODEL_NAME is special (resolved under models_dir).
# Most are llama-gguf-inference's names, read with its units, so its deployments move over as they are.
ENV_KEYS: dict[str, str | tuple[str, ...]] = {
    "DATA_DIR": "data_dir",
    "MODEL_PATH": "backend.model",
    "MODELS_DIR": "backend.models_dir",
    "LLAMA_SERVER_BIN": "backend.command",
    "NGL": "backend.gpu_layers",
    "CTX": "backend.context",
    "PARALLEL": "backend.parallel",
    "THREADS": "backend.threads",
    "EXTRA_ARGS": "backend.extra_args",
    "EMBEDDINGS": "backend.embeddings",
    "IDLE_TIMEOUT": "idle.timeout",
    "AUTH_ENABLED": "auth.enabled",
    "AUTH_KEYS_FILE": "auth.keys_file",
    "LOG_DIR": "logs.dir",
    "CORS_ORIGINS": "api.cors_origins",
    "MAX_REQUEST_BODY_SIZE": "api.max_body_bytes",
    "REQUEST_TIMEOUT": "api.request_timeout",
    "CLIENT_HEADER_TIMEOUT": ("api.header_timeout", "api.body_timeout"),
    "MAX_HEADERS": "api.max_headers",
    "MAX_HEADER_LINE_SIZE": "api.max_header_line",
    "MAX_REQUEST_LINE_SIZE": "api.max_request_line",
    "MAX_CONCURRENT_REQUESTS": "admission.max_concurrent",
    "MAX_QUEUE_SIZE": "admission.max_queue",
    "HEALTH_TIMEOUT": "supervisor.health_timeout",
    "METRICS_AUTH_ENABLED": "auth.protect_metrics",
    "MAX_REQUESTS_PER_MINUTE": "auth.default_rate",
}
# A bounded queue stands for llama-gguf-inference's unbounded one: far more waiters than one server holds.
UNLIMITED_QUEUE = 1_000_000
# Variables whose 0 means "unlimited" where the key has no such 0: name -> the value it becomes.
ENV_ZERO_MEANS_UNLIMITED: dict[str, int] = {"MAX_QUEUE_SIZE": UNLIMITED_QUEUE}
# The port of a tcp: endpoint.  GATEWAY_PORT is an older name of PORT; PORT wins, as in the old start.sh.
PORT_ENV_KEYS: dict[str, str] = {"GATEWAY_PORT": "api.listen", "PORT": "api.listen", "PORT_HEALTH": "health.listen"}
# The interface of tcp: endpoints.
INTERFACE_ENV_KEYS: dict[str, tuple[str, ...]] = {"HOST": ("api.listen", "health.listen")}
# llama-gguf-inference's variables that mean nothing here: name -> why.  Each one set is one boot warning.
IGNORED_ENV: dict[str, str] = {
    "PORT_BACKEND": "llamad picks a free loopback port for the child",
    "BACKEND_PORT": "llamad picks a free loopback port for the child",
    "BACKEND_HOST": "the child listens on 127.0.0.1 only (to proxy to another server: backend.kind = \"external\" "
                    "and backend.url)",
    "BACKEND_API_KEY": "llamad makes a new key for the child at every start",
    "BACKEND_CONNECT_TIMEOUT": "the child is on loopback: a refused connection is a 502 at once "
                               "(api.request_timeout bounds the wait for its answer)",
    "LOG_FORMAT": "llamad's log is plain text (stdout and {logs.dir}/_boot/)",
    "WORKER_TYPE": "the child's log is always {logs.dir}/llama/; give each worker its own LOG_DIR",
    "LOG_NAME": "the child's log is always {logs.dir}/llama/; give each worker its own LOG_DIR",
    "DEBUG_SHELL": "llamad always starts serving; `llamad check-config` shows the effective config",
    "MOCK_BACKEND": "there is no mock mode; `llamad demo-model` writes a tiny real model",
}
# Every variable that sets a key (INSTANCE_ID, read by the logs, sets none).
ENV_NAMES: tuple[str, ...] = (*ENV_KEYS, *PORT_ENV_KEYS, *INTERFACE_ENV_KEYS, "MODEL_NAME")
# The source of auth.enabled when it was set nowhere but the keys file exists.
AUTH_AUTO_SOURCE = "default (keys file present)"

CHOICES: dict[str, tuple[str, ...]] = {
    "health.ping": ("always", "runpod"),
    "api.metrics_format": ("prometheus", "json"),
    "backend.kind": ("llama-server", "llama-cpp-python", "external", "none"),
    "backend.start": ("eager", "lazy"),
    "idle.action": ("unload", "exit", "none"),
    "scale_from_zero.pool_group": (
        "inference.networking.k8s.io",
        "inference.networking.x-k8s.io",
    ),
}
# Smallest allowed value for numeric keys; keys not listed must be >= 0.
MINIMUM: dict[str, float] = {
    "backend.gpu_layers": -1,
    "backend.parallel": 1,
    "api.max_body_bytes": 1,
    "api.max_headers": 1,
    "api.max_header_line": 7,  # "Host: x": the shortest line of the header every HTTP/1.1 request has
    "api.max_request_line": 64,
    "supervisor.crash_loop_limit": 1,
    "supervisor.health_failures": 1,
    "logs.max_bytes": 1024,
    "logs.keep": 1,
    "scale_from_zero.max_concurrency": 1,
}
# Why a bound is what it is, said with the error.
MINIMUM_WHY: dict[str, str] = {
    "api.max_header_line": "every HTTP/1.1 request has a Host header, whose line is 7 bytes at the shortest "
                           "('Host: x', counted without its CRLF), so a smaller limit refuses every request",
}
POSITIVE = {"api.header_timeout", "api.body_timeout", "scale_from_zero.interval", "scale_from_zero.scrape_timeout",
            "auth.priority_ageing", "backend.ready_timeout", "supervisor.stop_timeout", "supervisor.health_timeout", "fleet.memory_budget"}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str) -> bool:
    """The one boolean parser for env vars and options."""
    word = text.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false/1/0/yes/no/on/off), got {text!r}")


# --- schema -----------------------------------------------------------------

_SECTIONS: dict[str, type] = {
    f.name: hint
    for f in dataclasses.fields(Config)
    if dataclasses.is_dataclass(hint := typing.get_type_hints(Config)[f.name])
}


def _config_fields(cls: type) -> dict[str, Any]:
    """A dataclass's config keys and their types (fields marked NOT_A_KEY left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.metadata.get("config_key", True)}


def _key_types() -> dict[str, Any]:
    types: dict[str, Any] = {"data_dir": str}
    for section, cls in _SECTIONS.items():
        for name, hint in _config_fields(cls).items():
            types[f"{section}.{name}"] = hint
    return types


KEY_TYPES: dict[str, Any] = _key_types()

# A [models.<id>] table: every [backend] key (inherited when unset), then the model's own keys.
BACKEND_KEYS: tuple[str, ...] = tuple(_config_fields(BackendConfig))
MODEL_ONLY_KEYS: tuple[str, ...] = tuple(k for k in _config_fields(ModelConfig) if k not in ("id", "backend"))
MODEL_KEY_TYPES: dict[str, Any] = {
    **{k: KEY_TYPES[f"backend.{k}"] for k in BACKEND_KEYS},
    **{k: _config_fields(ModelConfig)[k] for k in MODEL_ONLY_KEYS},
}
# The model keys' own defaults; idle_timeout's is idle.timeout, and kind external's memory is 0.
MODEL_DEFAULTS: dict[str, Any] = {"aliases": (), "memory": AUTO, "idle_timeout": "idle.timeout",
                                  "pinned": False, "preload": False}
# A model id: a TOML key made of letters, digits and ._:- (Ollama's "qwen2.5:7b", quoted in TOML).
MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
# An alias: any name without spaces, commas or control characters ("Qwen/Qwen2.5-7B-Instruct", "gpt-4o").
ALIAS = re.compile(r"^[^\s,\x00-\x1f\x7f]+$")


def _hint(key: str) -> Any:
    """The type of a key: a plain one, or ``models.<id>.<name>`` (the id may hold dots)."""
    if key in KEY_TYPES:
        return KEY_TYPES[key]
    return MODEL_KEY_TYPES[key.rpartition(".")[2]]


def _defaults() -> dict[str, Any]:
    base = Config()
    values: dict[str, Any] = {"data_dir": base.data_dir}
    for section, cls in _SECTIONS.items():
        for name in _config_fields(cls):
            values[f"{section}.{name}"] = getattr(getattr(base, section), name)
    return {key: float(v) if KEY_TYPES[key] is float else v for key, v in values.items()}


SIZE = re.compile(r"^\s*(-?\d+(?:\.\d+)?)\s*(B|[KMGT]i?B)?\s*$", re.IGNORECASE)


def _size(value: Any, auto: bool) -> int | str | None:
    """A size as bytes, or "auto" where allowed; None if it is neither."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if not isinstance(value, str):
        return None
    if auto and value.strip().lower() == AUTO:
        return AUTO
    m = SIZE.match(value)
    if not m:
        return None
    unit = (m.group(2) or "b").lower()
    scale = 1 if unit == "b" else (1024 if "i" in unit else 1000) ** ("kmgt".index(unit[0]) + 1)
    return int(float(m.group(1)) * scale) if "." in m.group(1) else int(m.group(1)) * scale


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "a list of strings"
    if origin in (abc.Mapping, dict):
        return "a table of integers" if typing.get_args(hint)[1] is int else "a table of strings"
    if hint is Bytes:
        return 'a size in bytes (an integer, or a string like "8GiB")'
    if hint == MemorySize:
        return 'a size in bytes (an integer, or a string like "8GiB") or "auto"'
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[hint]


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check a TOML-typed value against the key's type."""
    hint = _hint(key)
    origin = typing.get_origin(hint)
    ok: bool
    if hint is bool:
        ok = isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif hint is str:
        ok = isinstance(value, str)
    elif hint is Bytes or hint == MemorySize:
        size = _size(value, auto=hint == MemorySize)
        ok, value = size is not None, value if size is None else size
    elif origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # Mapping[str, str] or Mapping[str, int]
        kind = typing.get_args(hint)[1]
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool) for k, v in value.items()
        )
        value = dict(value) if ok else value
    if not ok:
        raise ConfigError(key, f"expected {_type_name(hint)}, got {value!r}", source)
    return value


def _parse_text(key: str, text: str, source: str) -> Any:
    """Parse a string from the environment or an option into the key's type."""
    hint = _hint(key)
    try:
        if hint is bool:
            return parse_bool(text)
        if hint is int:
            try:
                return int(text.strip())
            except ValueError:
                raise ValueError(f"expected an integer, got {text!r}") from None
        if hint is float:
            try:
                return float(text.strip())
            except ValueError:
                raise ValueError(f"expected a number, got {text!r}") from None
        if hint is str:
            return text
        if hint is Bytes or hint == MemorySize:
            return _coerce(key, text, source)
        if typing.get_origin(hint) is tuple:
            if text.lstrip().startswith("["):
                return _coerce(key, _parse_toml_value(key, text, source), source)
            if key.rpartition(".")[2] == "extra_args":
                return tuple(shlex.split(text))
            return tuple(w for w in re.split(r"[,\s]+", text) if w)
    except ValueError as e:
        raise ConfigError(key, str(e), source) from None
    if text.lstrip().startswith("{"):
        return _coerce(key, _parse_toml_value(key, text, source), source)
    raise ConfigError(key, f'expected a TOML inline table, e.g. {{A = "1"}}, got {text!r}', source)


def _parse_toml_value(key: str, text: str, source: str) -> Any:
    """A list or table written as TOML (``["*"]``, ``{A = "1"}``) in a variable or ``--set``."""
    try:
        return loads_toml(f"value = {text.strip()}")["value"]
    except ValueError as e:
        raise ConfigError(key, f"not a valid TOML value: {text!r} ({e})", source) from None


def unknown_key(key: str, source: str, table: bool = False) -> ConfigError:
    """The error for a key no schema knows, with a hint: the nearest known key (a typo, a key in the wrong
    table), or the key an environment variable's name sets (``--set CTX=...``); ``table``: a TOML table's
    name, which may be a misspelt section."""
    prefix, name = "", key
    model_id, _, model_key = key[len("models."):].rpartition(".")
    if key.startswith("models.") and model_id:
        prefix, name, known = f"models.{model_id}.", model_key, list(MODEL_KEY_TYPES)
    else:
        known = [*_SECTIONS, "models"] if table else list(KEY_TYPES)
    target = None if prefix else ENV_KEYS.get(key) or PORT_ENV_KEYS.get(key)
    if target is not None:
        keys = (target,) if isinstance(target, str) else target
        return ConfigError(key, f"unknown key ({key} is an environment variable; the key is {' and '.join(keys)})",
                           source)
    close = difflib.get_close_matches(name, known, n=1)
    return ConfigError(key, f"unknown key (did you mean {prefix}{close[0]}?)" if close else "unknown key", source)


# --- loading ----------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """The effective config and, per key, where its value came from (a fleet's models as models.<id>.<key>)."""

    config: Config
    sources: dict[str, str]
    values: dict[str, Any]
    warnings: tuple[str, ...] = ()  # settings that have no effect, one line each


def _flatten_toml(doc: dict[str, Any], path: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in doc.items():
        if name == "models":
            flat.update(_flatten_models(value, path))
        elif name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(name, f"expected a [{name}] table, got {value!r}", path)
            for sub, subvalue in value.items():
                key = f"{name}.{sub}"
                if key not in KEY_TYPES:
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

    Model tables come back as ``models.<id>.<key>``, with ``models`` holding the ids (absent: no [models]).
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


def parse_toml(data: bytes) -> dict[str, Any]:
    """A TOML document from a file's bytes; every way it can be bad is a ValueError saying where.

    ``tomllib`` leaves two failures to the caller: a byte that is not UTF-8
    (UnicodeDecodeError, with no line) and a value nested deeper than the
    interpreter's stack (RecursionError).
    """
    return loads_toml(decode_utf8(data))


def decode_utf8(data: bytes) -> str:
    """``data`` as text; a byte that is not UTF-8 is a ValueError naming it, its line and offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"not UTF-8 (byte {data[e.start]:#04x} at line {line}, offset {e.start})") from None


def loads_toml(text: str) -> dict[str, Any]:
    """``tomllib.loads``, with a value nested too deeply for the stack a ValueError rather than a RecursionError."""
    try:
        return tomllib.loads(text)
    except RecursionError:
        raise ValueError("a value is nested too deeply") from None


def _endpoint_args(rest: str) -> list[str]:
    """Split endpoint arguments on ':' but not on Twisted's escaped '\\:'."""
    return re.split(r"(?<!\\):", rest) if rest else []


def replace_port(endpoint: str, port_text: str, key: str, source: str) -> str:
    """Put PORT / PORT_HEALTH / GATEWAY_PORT into a ``tcp:`` endpoint string."""
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"port must be an integer, got {port_text!r}", source) from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} out of range 0-65535", source)
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6"):
        return endpoint
    args = _endpoint_args(rest)
    positional = [a for a in args if "=" not in a]
    if positional:
        args[args.index(positional[0])] = str(port)
    else:
        args = [a for a in args if not a.startswith("port=")] + [f"port={port}"]
    return f"{kind}:{':'.join(args)}"


def replace_interface(endpoint: str, host: str) -> str:
    """Put HOST into a ``tcp:`` endpoint string as its interface (escaped: an IPv6 address has colons)."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6"):
        return endpoint
    args = [a for a in _endpoint_args(rest) if not a.startswith("interface=")]
    escaped = host.strip().replace(":", "\\:")
    return f"{kind}:{':'.join([*args, f'interface={escaped}'])}"


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
    fleet.models_dir holds.
    """
    environ = os.environ if environ is None else environ
    values = _defaults()
    sources = {key: "default" for key in values}

    path = config_file
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    tables: dict[str, dict[str, Any]] | None = None  # [models.<id>] -> its keys; None: no [models]
    if path:
        flat = read_toml(path)
        if "models" in flat:
            tables = {model_id: {} for model_id in flat.pop("models")}
        for key, value in flat.items():
            if key.startswith("models."):
                model_id, _, name = key[len("models."):].rpartition(".")
                tables[model_id][name] = _coerce(key, value, path)  # type: ignore[index]
                continue
            values[key] = _coerce(key, value, path)
            sources[key] = path

    # An empty variable counts as unset: platform templates often define them blank.
    environ = {name: value for name, value in environ.items() if value != ""}
    warnings = [f"{name} is ignored: {why}" for name, why in IGNORED_ENV.items() if name in environ]
    for name, target in ENV_KEYS.items():
        if name not in environ:
            continue
        for key in (target,) if isinstance(target, str) else target:
            value = _parse_text(key, environ[name], f"env {name}")
            source = f"env {name}"
            if value == 0 and name in ENV_ZERO_MEANS_UNLIMITED:
                value = ENV_ZERO_MEANS_UNLIMITED[name]
                source += f" (0: unlimited, taken as {value})"
            values[key], sources[key] = value, source
    for name, key in PORT_ENV_KEYS.items():
        if name in environ:
            replaced = replace_port(values[key], environ[name], key, f"env {name}")
            if replaced != values[key]:
                values[key] = replaced
                sources[key] = f"env {name}"
    if "GATEWAY_PORT" in environ and "PORT" in environ and environ["GATEWAY_PORT"] != environ["PORT"]:
        warnings.append(f"GATEWAY_PORT={environ['GATEWAY_PORT']} is ignored: PORT={environ['PORT']} is set and wins")
    for name, keys in INTERFACE_ENV_KEYS.items():
        for key in keys if name in environ else ():
            replaced = replace_interface(values[key], environ[name])
            if replaced != values[key]:
                values[key] = replaced
                sources[key] = f"{sources[key]}, env {name}" if sources[key].startswith("env ") else f"env {name}"
    model_name = environ.get("MODEL_NAME", "")
    if model_name and "MODEL_PATH" not in environ:
        values["backend.model"] = model_name
        sources["backend.model"] = "env MODEL_NAME"

    model_options: dict[str, dict[str, Any]] = {}
    for key, value in (options or {}).items():
        model_id, _, name = key[len("models."):].rpartition(".")
        if key.startswith("models.") and model_id and name in MODEL_KEY_TYPES:
            model_options.setdefault(model_id, {})[name] = value  # parsed once the model is known
            continue
        if key not in KEY_TYPES:
            raise unknown_key(key, "option")
        values[key] = (
            _parse_text(key, value, "option") if isinstance(value, str) else _coerce(key, value, "option")
        )
        sources[key] = "option"

    if values["backend.kind"] != "llama-server" and sources["backend.command"] == "env LLAMA_SERVER_BIN":
        # The variable names the llama-server binary; other kinds run Python.
        values["backend.command"] = _defaults()["backend.command"]
        sources["backend.command"] = "default (LLAMA_SERVER_BIN is for kind llama-server)"
    _resolve_paths(values, sources)
    if sources["auth.enabled"] == "default" and os.path.exists(values["auth.keys_file"]):
        # llama-gguf-inference had auth on by default: a keys file where one is looked for means keys are wanted.
        values["auth.enabled"] = True
        sources["auth.enabled"] = AUTH_AUTO_SOURCE
    fleet = tables is not None or bool(values["fleet.models_dir"])
    if check_files and not fleet:  # a fleet's [backend] is what its models inherit: each model finds its own
        _find_command(values, sources, "backend.command", "backend.kind")
    _validate(values, sources, check_files, require_model, fleet)
    models: dict[str, ModelConfig] = {}
    if fleet:
        models = _fleet(values, sources, tables, model_options, check_files, require_model, warnings, path or "")
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


def _unescape(text: str) -> str:
    """Twisted's endpoint escaping: a backslash takes the next character as is."""
    return re.sub(r"\\(.)", r"\1", text)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# What an endpoint binds, to find two that clash: ("unix", path, None), or (family,
# port, address) where address None is every address of the family.
Binding = tuple[str, int | str, IPAddress | None]


def _check_endpoint(key: str, endpoint: str, source: str) -> Binding | None:
    """Refuse here what would only fail at bind time; returns what it binds (None: not known)."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6", "unix", "systemd", "ssl"):
        raise ConfigError(key, f"unsupported endpoint {endpoint!r} (use tcp:PORT, unix:PATH or systemd:...)", source)
    args = _endpoint_args(rest)
    positional = [_unescape(a) for a in args if "=" not in a]
    named = {name: _unescape(value) for name, value in (a.split("=", 1) for a in args if "=" in a)}
    if kind == "unix":
        path = positional[0] if positional else named.get("address", "")
        if not path:
            raise ConfigError(key, f"endpoint {endpoint!r} has no socket path (use unix:/path/to/socket)", source)
        return ("unix", os.path.abspath(path), None)
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port_text = positional[0] if positional else named.get("port", "")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"endpoint {endpoint!r} has no valid port", source) from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} out of range 0-65535", source)
    interface = named.get("interface", "")
    address: IPAddress | None = None
    if interface:
        try:
            address = ipaddress.ip_address(interface)
        except ValueError:
            raise ConfigError(key, f"interface {interface!r} is not an IP address", source) from None
        if kind == "tcp6" and address.version != 6:
            raise ConfigError(key, f"interface {interface!r} is not an IPv6 address (tcp6 needs one)", source)
    family = "ipv6" if kind == "tcp6" or (address is not None and address.version == 6) else "ipv4"
    return (family, port, None if address is None or address.is_unspecified else address)


def _clash(a: Binding | None, b: Binding | None) -> bool:
    """Whether binding both would fail: the same socket path, or the same port on overlapping addresses."""
    if a is None or b is None or a[1] == 0 or a[1] != b[1]:
        return False  # port 0 is a fresh port each time
    if "unix" in (a[0], b[0]):
        return a == b
    if a[0] == b[0]:
        return a[2] is None or b[2] is None or a[2] == b[2]
    # An IPv6 wildcard also takes IPv4 on Linux (dual stack).
    return any(family == "ipv6" and address is None for family, _, address in (a, b))


def _check_choice(key: str, value: Any, choices: tuple[str, ...], source: str) -> None:
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r} (expected one of: {', '.join(choices)})", source)


def _check_number(key: str, value: Any, hint: Any, source: str, low: float, positive: bool) -> None:
    """Finite and in range; "auto" sizes and non-numbers pass."""
    if hint is float and not math.isfinite(value):
        raise ConfigError(key, f"must be a finite number, got {value!r}", source)
    if hint in (int, float, Bytes) or (hint == MemorySize and value != AUTO):
        if value < low or (positive and value <= 0):
            bound = "> 0" if positive else f">= {low:g}"
            why = MINIMUM_WHY.get(key)
            raise ConfigError(key, f"must be {bound}, got {value!r}" + (f": {why}" if why else ""), source)


def _validate(
    values: dict[str, Any], sources: dict[str, str], check_files: bool, require_model: bool = True,
    fleet: bool = False,
) -> None:
    """Check the plain keys; in a fleet, what needs a model is checked per model."""
    for key, choices in CHOICES.items():
        _check_choice(key, values[key], choices, sources[key])
    for key, hint in KEY_TYPES.items():
        _check_number(key, values[key], hint, sources[key], MINIMUM.get(key, 0), key in POSITIVE)
    api = _check_endpoint("api.listen", values["api.listen"], sources["api.listen"])
    health = _check_endpoint("health.listen", values["health.listen"], sources["health.listen"])
    if _clash(api, health):
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
        return None if loaded.config.models else _no_models(fleet.models_dir, loaded.sources["fleet.models_dir"])
    backend = loaded.config.backend
    if backend.kind in ("llama-server", "llama-cpp-python") and not backend.model:
        return _no_model(loaded.sources["backend.model"])
    return None


def _no_models(directory: str, source: str) -> ConfigError:
    return ConfigError("fleet.models_dir", f"no models in {directory} (a *.gguf file, or a sub-directory holding one, "
                       "is a model)", source)


def _build(values: Mapping[str, Any], models: Mapping[str, ModelConfig] | None = None, fleet: bool = False) -> Config:
    sections = {}
    for section, cls in _SECTIONS.items():
        prefix = section + "."
        sections[section] = cls(**{k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)})
    return Config(data_dir=values["data_dir"], **sections, single_model=not fleet, fleet_models=dict(models or {}))


# --- the fleet: [models.<id>] tables and fleet.models_dir ---------------------------

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


def _fleet(
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
            _find_command(vals, srcs, "command", "kind")
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
        raise _no_models(directory, dir_source)
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
        own[name] = (_parse_text(key, value, "option") if isinstance(value, str) else _coerce(key, value, "option"),
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
        put("command", _defaults()["backend.command"], "default (LLAMA_SERVER_BIN is for kind llama-server)",
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
            _check_choice(key, value, tuple(c for c in CHOICES["backend.kind"] if c != "none"), source)
        elif f"backend.{name}" in CHOICES:
            _check_choice(key, value, CHOICES[f"backend.{name}"], source)
        _check_number(key, value, hint, source, MINIMUM.get(f"backend.{name}", 0), f"backend.{name}" in POSITIVE)
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


def _check_default(config: Config, source: str) -> None:
    name = config.fleet.default
    if name and name not in config.names:
        known = list(config.names)
        shown = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "") if known else "none"
        raise ConfigError("fleet.default", f"{name!r} names no model (ids and aliases: {shown})", source)


def own_bin_dirs() -> list[str]:
    """Where llamad's own executables are: the interpreter's directory and the running console script's
    (``twistd``, ``llamad``), a venv's ``bin`` where ``make setup`` links ``llama-server``."""
    dirs: list[str] = []
    for executable in (sys.executable, sys.argv[0] if sys.argv else ""):
        if executable and os.path.isfile(executable):
            directory = os.path.dirname(os.path.abspath(executable))
            if directory not in dirs:
                dirs.append(directory)
    return dirs


def beside_llamad(command: str) -> str | None:
    """A bare command that is not on PATH, found beside llamad's own executables; None otherwise.

    A systemd unit or a container that runs ``.venv/bin/twistd`` seldom puts the venv on PATH,
    yet ``make setup`` linked ``llama-server`` there.
    """
    if not command or os.sep in command or shutil.which(command) is not None:
        return None
    for directory in own_bin_dirs():
        found = shutil.which(command, path=directory)
        if found is not None:
            return os.path.abspath(found)
    return None


def _find_command(vals: dict[str, Any], srcs: dict[str, str], command_key: str, kind_key: str) -> None:
    """Run a kind llama-server command found beside llamad by its path; its source says where it was found.

    Only where files are checked: without, the config may be for another machine."""
    found = beside_llamad(vals[command_key]) if vals[kind_key] == "llama-server" else None
    if found is not None:
        vals[command_key] = found
        srcs[command_key] += f", not on PATH: found beside llamad in {os.path.dirname(found)}"


def command_missing(command: str) -> str:
    """Why a command cannot run, saying where a bare name was looked for."""
    if os.sep in command:
        return f"{command!r} not found or not executable (set LLAMA_SERVER_BIN)"
    return (f"{command!r} not found or not executable: not on PATH, nor beside llamad in "
            f"{', '.join(own_bin_dirs()) or '(unknown)'} (set LLAMA_SERVER_BIN)")


def python_command(command: str) -> str:
    """The interpreter for the llama-cpp-python backend: ours unless configured."""
    return sys.executable if command in ("", "llama-server") else command


# --- reporting ----------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + "".join(_toml_char(c) for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"


def _toml_char(c: str) -> str:
    """Escape one character for a TOML basic string."""
    if c in ('"', "\\"):
        return "\\" + c
    if c < " " and c != "\t" or c == "\x7f":
        return f"\\u{ord(c):04x}"
    return c


def _toml_key(name: str) -> str:
    """A table key, quoted unless bare (a model id with '.' or ':' is quoted)."""
    return name if re.match(r"^[A-Za-z0-9_-]+$", name) else _toml_value(name)


def render(loaded: Loaded) -> str:
    """The effective config as TOML, each line commented with its source; the models follow [fleet]."""
    lines: list[str] = []
    current = None

    def line(name: str, key: str) -> None:
        text = f"{name} = {_toml_value(loaded.values[key])}"
        lines.append(f"{text:<48} # {loaded.sources[key]}")

    def models() -> None:
        config = loaded.config
        if config.single_model:
            for model_id in config.models:
                lines.append(f"# one model, from [backend]: id {_toml_value(model_id)} "
                             "(no [models] tables, no fleet.models_dir)")
            return
        for model_id in config.models:
            lines.append(f"\n[models.{_toml_key(model_id)}]")
            for name in MODEL_KEY_TYPES:
                line(name, f"models.{model_id}.{name}")

    for key in KEY_TYPES:
        section, _, name = key.rpartition(".")
        if section != current and section:
            if current == "fleet":
                models()
            lines.append(f"\n[{section}]")
            current = section
        line(name or key, key)
    return "\n".join(lines).lstrip("\n") + "\n"
