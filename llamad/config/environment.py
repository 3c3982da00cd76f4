"""The environment layer: which variable sets which key, and the variables with a rule of their own.

Most names are llama-gguf-inference's, read with its units, so its deployments move over as they are; its
variables that mean nothing here are each one warning.
"""

from __future__ import annotations

from typing import Any, Mapping

from llamad.config.endpoints import replace_interface, replace_port
from llamad.config.schema import CHOICES
from llamad.config.values import parse_text

# Environment variables: name -> key (or keys).  MODEL_NAME is special (resolved under models_dir).
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
    "LOG_FORMAT": "logs.format",
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
    "WORKER_TYPE": "the child's log is always {logs.dir}/llama/; give each worker its own LOG_DIR",
    "LOG_NAME": "the child's log is always {logs.dir}/llama/; give each worker its own LOG_DIR",
    "DEBUG_SHELL": "llamad always starts serving; `llamad check-config` shows the effective config",
    "MOCK_BACKEND": "there is no mock mode; `llamad demo-model` writes a tiny real model",
}
# Every variable that sets a key (INSTANCE_ID, read by the logs, sets none).
ENV_NAMES: tuple[str, ...] = (*ENV_KEYS, *PORT_ENV_KEYS, *INTERFACE_ENV_KEYS, "MODEL_NAME")


def read_environment(environ: Mapping[str, str], values: dict[str, Any], sources: dict[str, str]) -> list[str]:
    """Lay the variables over ``values`` and ``sources`` (``env NAME``); returns a warning per variable
    that has no effect."""
    # An empty variable counts as unset: platform templates often define them blank.
    environ = {name: value for name, value in environ.items() if value != ""}
    warnings = [f"{name} is ignored: {why}" for name, why in IGNORED_ENV.items() if name in environ]
    for name, target in ENV_KEYS.items():
        if name not in environ:
            continue
        for key in (target,) if isinstance(target, str) else target:
            value = parse_text(key, environ[name], f"env {name}")
            source = f"env {name}"
            if key in CHOICES:
                value = _any_case(value, CHOICES[key])
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
    return warnings


def _any_case(text: str, choices: tuple[str, ...]) -> str:
    """The choice a variable names in any case (``LOG_FORMAT=JSON``); else the text as given, for the error."""
    word = text.strip().lower()
    return word if word in choices else text
