"""The config contract: defaults < TOML file < environment < twistd options.

Everything that reads configuration goes through :func:`load`, which returns a frozen :class:`Config` and,
for ``check-config``, where each value came from.  ``Config.models`` holds every model: the ``[models.<id>]``
tables and the GGUFs of ``fleet.models_dir`` (each inheriting ``[backend]``), or else the one model of
``[backend]``.  Every problem is a :class:`ConfigError` naming the key, so the daemon can exit with one line
before any port is bound.

Where things live (each module imports only those above it):

- ``errors``: :class:`ConfigError`.
- ``schema``: the dataclasses, and the keys they define: types, defaults, choices, bounds, removed keys.
- ``values``: one value: TOML types checked, text parsed, sizes, booleans, choice and range checks.
- ``endpoints``: PORT and HOST put into endpoint strings; endpoints checked, and clashes between them.
- ``environment``: which variable sets which key, and the variables with a rule of their own.
- ``commands``: the child's command found on PATH or beside llamad.
- ``models``: the fleet: ``[models.<id>]`` tables and the scan of ``fleet.models_dir``.
- ``loading``: :func:`load`: the file, the layers, the checks, the frozen config.
- ``rendering``: ``check-config``'s TOML.
"""

from __future__ import annotations

import sys
import types
from typing import Any

from llamad.config import commands, endpoints, environment, errors, loading, models, rendering, schema, values
from llamad.config.commands import beside_llamad, command_missing, own_bin_dirs, python_command
from llamad.config.endpoints import endpoint_args, replace_interface, replace_port, unescape
from llamad.config.environment import (
    ENV_KEYS, ENV_NAMES, ENV_ZERO_MEANS_UNLIMITED, IGNORED_ENV, INTERFACE_ENV_KEYS, PORT_ENV_KEYS, UNLIMITED_QUEUE,
)
from llamad.config.errors import ConfigError
from llamad.config.loading import (
    AUTH_AUTO_SOURCE, DATA_DIR_CANDIDATES, DEFAULT_CONFIG_FILE, FALLBACK_DATA_DIR, Loaded, load, missing_model,
    read_toml, unknown_key,
)
from llamad.config.models import ScannedModel, scan_models_dir
from llamad.config.rendering import render
from llamad.config.schema import (
    AUTO, CHOICES, GIB, KEY_TYPES, MINIMUM, MODEL_DEFAULTS, MODEL_KEY_TYPES, MODEL_ONLY_KEYS, NOT_A_KEY, POSITIVE,
    REMOVED_KEYS, SECTIONS, AdmissionConfig, ApiConfig, AuthConfig, BackendConfig, Bytes, Config, FleetConfig,
    HealthConfig, IdleConfig, LogsConfig, MemorySize, ModelConfig, ScaleFromZeroConfig, SupervisorConfig,
    defaults, mmproj_of, single_model,
)
from llamad.config.values import decode_utf8, loads_toml, parse_bool, parse_toml

# The spellings callers outside the package used when the config was one module.
_defaults = defaults
_endpoint_args = endpoint_args
_unescape = unescape

__all__ = [
    "AUTH_AUTO_SOURCE", "AUTO", "CHOICES", "DATA_DIR_CANDIDATES", "DEFAULT_CONFIG_FILE", "ENV_KEYS", "ENV_NAMES",
    "ENV_ZERO_MEANS_UNLIMITED", "FALLBACK_DATA_DIR", "GIB", "IGNORED_ENV", "INTERFACE_ENV_KEYS", "KEY_TYPES",
    "MINIMUM", "MODEL_DEFAULTS", "MODEL_KEY_TYPES", "MODEL_ONLY_KEYS", "NOT_A_KEY", "PORT_ENV_KEYS", "POSITIVE",
    "REMOVED_KEYS", "SECTIONS", "UNLIMITED_QUEUE", "AdmissionConfig", "ApiConfig", "AuthConfig", "BackendConfig",
    "Bytes", "Config", "ConfigError", "FleetConfig", "HealthConfig", "IdleConfig", "Loaded", "LogsConfig",
    "MemorySize", "ModelConfig", "ScaleFromZeroConfig", "ScannedModel", "SupervisorConfig", "beside_llamad",
    "command_missing", "decode_utf8", "defaults", "endpoint_args", "load", "loads_toml", "missing_model",
    "mmproj_of", "own_bin_dirs", "parse_bool", "parse_toml", "python_command", "read_toml", "render",
    "replace_interface", "replace_port", "scan_models_dir", "single_model", "unescape", "unknown_key",
]

_PARTS = (errors, schema, values, endpoints, environment, commands, models, loading, rendering)


class _OneNamespace(types.ModuleType):
    """Setting a name on the package sets it in each of its modules that holds the name.

    The config was one module: replacing ``llamad.config.DEFAULT_CONFIG_FILE`` or ``own_bin_dirs`` (a test's
    monkeypatch) still changes what the code that reads them sees.
    """

    def __setattr__(self, name: str, value: Any) -> None:
        for part in _PARTS:
            if name in vars(part):
                setattr(part, name, value)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _OneNamespace
