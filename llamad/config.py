"""The config contract: defaults < TOML file < environment < twistd options.

Everything that reads configuration goes through :func:`load`, which returns a
frozen :class:`Config` and, for ``check-config``, where each value came from.
Every problem is a :class:`ConfigError` naming the key, so the daemon can exit
with one line before any port is bound.
"""

from __future__ import annotations

import dataclasses
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
from pathlib import Path
from typing import Any, Mapping

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

    @property
    def model_id(self) -> str:
        """The id shown in ``/v1/models``: the model file's stem."""
        return Path(self.model).stem if self.model else ""


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


@dataclass(frozen=True)
class LogsConfig:
    dir: str = ""
    max_bytes: int = 52428800
    keep: int = 10


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
class Config:
    data_dir: str = ""
    api: ApiConfig = field(default_factory=ApiConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    backend: BackendConfig = field(default_factory=BackendConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)
    admission: AdmissionConfig = field(default_factory=AdmissionConfig)
    idle: IdleConfig = field(default_factory=IdleConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    logs: LogsConfig = field(default_factory=LogsConfig)
    scale_from_zero: ScaleFromZeroConfig = field(default_factory=ScaleFromZeroConfig)

    @property
    def max_concurrent(self) -> int:
        """Admission limit: 0 means one per llama.cpp slot."""
        return self.admission.max_concurrent or self.backend.parallel


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
    "api.max_header_line": 64,
    "api.max_request_line": 64,
    "supervisor.crash_loop_limit": 1,
    "supervisor.health_failures": 1,
    "logs.max_bytes": 1024,
    "logs.keep": 1,
    "scale_from_zero.max_concurrency": 1,
}
POSITIVE = {"api.header_timeout", "api.body_timeout", "scale_from_zero.interval", "scale_from_zero.scrape_timeout",
            "backend.ready_timeout", "supervisor.stop_timeout", "supervisor.health_timeout"}

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
    f.name: typing.get_type_hints(Config)[f.name]
    for f in dataclasses.fields(Config)
    if f.name != "data_dir"
}


def _key_types() -> dict[str, Any]:
    types: dict[str, Any] = {"data_dir": str}
    for section, cls in _SECTIONS.items():
        for name, hint in typing.get_type_hints(cls).items():
            types[f"{section}.{name}"] = hint
    return types


KEY_TYPES: dict[str, Any] = _key_types()


def _defaults() -> dict[str, Any]:
    base = Config()
    values: dict[str, Any] = {"data_dir": base.data_dir}
    for section in _SECTIONS:
        for f in dataclasses.fields(getattr(base, section)):
            values[f"{section}.{f.name}"] = getattr(getattr(base, section), f.name)
    return {key: float(v) if KEY_TYPES[key] is float else v for key, v in values.items()}


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is tuple:
        return "a list of strings"
    if origin in (abc.Mapping, dict):
        return "a table of strings"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[hint]


def _coerce(key: str, value: Any, source: str) -> Any:
    """Check a TOML-typed value against the key's type."""
    hint = KEY_TYPES[key]
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
    elif origin is tuple:
        ok = isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)
        value = tuple(value) if ok else value
    else:  # Mapping[str, str]
        ok = isinstance(value, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        )
        value = dict(value) if ok else value
    if not ok:
        raise ConfigError(key, f"expected {_type_name(hint)}, got {value!r}", source)
    return value


def _parse_text(key: str, text: str, source: str) -> Any:
    """Parse a string from the environment or an option into the key's type."""
    hint = KEY_TYPES[key]
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
        if typing.get_origin(hint) is tuple:
            if text.lstrip().startswith("["):
                return _coerce(key, _parse_toml_value(key, text, source), source)
            if key == "backend.extra_args":
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
        return tomllib.loads(f"value = {text.strip()}")["value"]
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(key, f"not a valid TOML value: {text!r} ({e})", source) from None


# --- loading ----------------------------------------------------------------


@dataclass(frozen=True)
class Loaded:
    """The effective config and, per key, where its value came from."""

    config: Config
    sources: dict[str, str]
    values: dict[str, Any]
    warnings: tuple[str, ...] = ()  # settings that have no effect, one line each


def _flatten_toml(doc: dict[str, Any], path: str) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for name, value in doc.items():
        if name in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(name, f"expected a [{name}] table, got {value!r}", path)
            for sub, subvalue in value.items():
                key = f"{name}.{sub}"
                if key not in KEY_TYPES:
                    raise ConfigError(key, "unknown key", path)
                flat[key] = subvalue
        elif name in KEY_TYPES:
            flat[name] = value
        else:
            raise ConfigError(name, "unknown key", path)
    return flat


def read_toml(path: str) -> dict[str, Any]:
    """Read and flatten one TOML file; every failure names the file."""
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config", f"file not found: {path}") from None
    except OSError as e:
        raise ConfigError("config", f"cannot read {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("config", f"{path} is not valid TOML: {e}") from None
    return _flatten_toml(doc, path)


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
    """
    environ = os.environ if environ is None else environ
    values = _defaults()
    sources = {key: "default" for key in values}

    path = config_file
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path:
        for key, value in read_toml(path).items():
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

    for key, value in (options or {}).items():
        if key not in KEY_TYPES:
            raise ConfigError(key, "unknown key", "option")
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
    _validate(values, sources, check_files, require_model)
    return Loaded(_build(values), sources, values, tuple(warnings))


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


def _validate(values: dict[str, Any], sources: dict[str, str], check_files: bool, require_model: bool = True) -> None:
    for key, choices in CHOICES.items():
        if values[key] not in choices:
            raise ConfigError(
                key, f"unknown value {values[key]!r} (expected one of: {', '.join(choices)})", sources[key]
            )
    for key, hint in KEY_TYPES.items():
        if hint is float and not math.isfinite(values[key]):
            raise ConfigError(key, f"must be a finite number, got {values[key]!r}", sources[key])
        if hint in (int, float):
            low = MINIMUM.get(key, 0)
            if values[key] < low or (key in POSITIVE and values[key] <= 0):
                bound = "> 0" if key in POSITIVE else f">= {low:g}"
                raise ConfigError(key, f"must be {bound}, got {values[key]!r}", sources[key])
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
        raise ConfigError("backend.command", f"{command!r} not found or not executable (set LLAMA_SERVER_BIN)",
                          sources["backend.command"])


def _no_model(source: str) -> ConfigError:
    return ConfigError("backend.model", "no model configured (set backend.model, MODEL_PATH or MODEL_NAME)", source)


def missing_model(loaded: Loaded) -> ConfigError | None:
    """The error ``twistd llamad`` gives for this config (loaded with ``require_model`` off) if it names no model."""
    backend = loaded.config.backend
    if backend.kind in ("llama-server", "llama-cpp-python") and not backend.model:
        return _no_model(loaded.sources["backend.model"])
    return None


def _build(values: Mapping[str, Any]) -> Config:
    sections = {}
    for section, cls in _SECTIONS.items():
        prefix = section + "."
        sections[section] = cls(**{k[len(prefix):]: v for k, v in values.items() if k.startswith(prefix)})
    return Config(data_dir=values["data_dir"], **sections)


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


def render(loaded: Loaded) -> str:
    """The effective config as TOML, each line commented with its source."""
    lines: list[str] = []
    current = None
    for key in KEY_TYPES:
        section, _, name = key.rpartition(".")
        if section != current and section:
            lines.append(f"\n[{section}]")
            current = section
        text = f"{name or key} = {_toml_value(loaded.values[key])}"
        lines.append(f"{text:<48} # {loaded.sources[key]}")
    return "\n".join(lines).lstrip("\n") + "\n"
