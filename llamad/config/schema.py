"""What the config holds: the frozen dataclasses, and the keys they define with types, defaults and bounds.

Every other module of the package reads the keys from here: ``KEY_TYPES`` (``section.name``), the
``[models.<id>]`` keys, the allowed choices and the numeric bounds, so a field added to a dataclass is a key
everywhere (TOML, ``--set``, ``check-config``) at once.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

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
    kv_cache: bool = True  # save the slots' prompt cache on the volume before a stop, restore it at the next start
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
    format: str = "text"  # llamad's own log lines: "text", or "json" (one object per line)


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
    kv_cache_disk: Bytes = Bytes(8 * GIB)  # bytes the saved KV caches may take on the volume; LRU first; 0 = no bound
    kv_save_timeout: float = 5  # seconds a stop waits for its slots to be saved; then it stops without the rest

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


# --- the keys ---------------------------------------------------------------

CHOICES: dict[str, tuple[str, ...]] = {
    "health.ping": ("always", "runpod"),
    "api.metrics_format": ("prometheus", "json"),
    "backend.kind": ("llama-server", "llama-cpp-python", "external", "none"),
    "backend.start": ("eager", "lazy"),
    "idle.action": ("unload", "exit", "none"),
    "logs.format": ("text", "json"),
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
            "auth.priority_ageing", "backend.ready_timeout", "supervisor.stop_timeout", "supervisor.health_timeout",
            "fleet.memory_budget"}
# Keys that did something once: a file or option that sets one still loads, with a warning saying why to drop it.
REMOVED_KEYS: dict[str, str] = {
    "api.fast_path": "no longer does anything (every request is served by llamad's own HTTP/1.1 front); remove it",
}

# Each section's name -> its dataclass.
SECTIONS: dict[str, type] = {
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
    for section, cls in SECTIONS.items():
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


def key_type(key: str) -> Any:
    """The type of a key: a plain one, or ``models.<id>.<name>`` (the id may hold dots)."""
    if key in KEY_TYPES:
        return KEY_TYPES[key]
    return MODEL_KEY_TYPES[key.rpartition(".")[2]]


def defaults() -> dict[str, Any]:
    """Every plain key's built-in value (a float key's as a float), from a default ``Config``."""
    base = Config()
    values: dict[str, Any] = {"data_dir": base.data_dir}
    for section, cls in SECTIONS.items():
        for name in _config_fields(cls):
            values[f"{section}.{name}"] = getattr(getattr(base, section), name)
    return {key: float(v) if KEY_TYPES[key] is float else v for key, v in values.items()}
