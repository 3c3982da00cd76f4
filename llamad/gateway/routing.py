# -*- test-case-name: tests.unit.test_routing -*-
"""Which model a request is for: by the body's ``model``, ``?model=``, or ``/upstream/<id>/...``.

The way llama-server's router mode routes (a JSON body by its ``model``, else
``?model=``), plus llama-swap's ``/upstream/<id>/`` passthrough.  No model
named is fine when there is one model or a default; otherwise the answer is
400 listing the choices, and an unknown name is 404 ``model_not_found``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import parse_qs

from llamad.errors import ApiError

UPSTREAM_PREFIX = b"/upstream/"


def child_path(path: bytes) -> bytes:
    """The path a model's server gets: ``/upstream/<id>`` taken off.  What a request is (inference or
    not, which checks it passes) is decided on this path, so the prefix changes only the model."""
    if not path.startswith(UPSTREAM_PREFIX):
        return path
    return b"/" + path[len(UPSTREAM_PREFIX):].partition(b"/")[2]


@dataclass(frozen=True)
class Routed:
    """A request's model, and the path to send to that model's server."""

    model: str
    uri: bytes


class ModelDirectory:
    """Model ids and their aliases, and the default for requests that name none."""

    def __init__(self, ids: Sequence[str], aliases: Mapping[str, Sequence[str]] | None = None,
                 default: str = "", lenient: bool = False) -> None:
        """``lenient``: every name goes to the one model (a one-model llamad, like llama-server alone)."""
        self.ids = tuple(ids)
        self.lenient = lenient and len(self.ids) == 1
        self.names: dict[str, str] = {model: model for model in self.ids}
        for model, names in (aliases or {}).items():
            for name in names:
                self.names[name] = model
        self.default: str | None = (self.names.get(default) if default
                                    else self.ids[0] if len(self.ids) == 1 else None)

    def resolve(self, name: str | None, allowed: Callable[[str], bool] | None = None) -> str:
        """The id ``name`` stands for (an id or an alias); the default for no name.  ``allowed``: the
        models the caller's key may use; any other answers as a model that does not exist."""
        if not name:
            if self.default is not None and (allowed is None or allowed(self.default)):
                return self.default
            raise ApiError(400, "this server has several models: name one in \"model\" "
                           f"(one of: {self.listing(allowed)})", "model_required", param="model")
        model = self.ids[0] if self.lenient else self.names.get(name)
        if model is None or (allowed is not None and not allowed(model)):
            raise ApiError(404, f"The model '{name}' does not exist (models here: {self.listing(allowed)})",
                           "model_not_found", param="model")
        return model

    def listing(self, allowed: Callable[[str], bool] | None = None) -> str:
        names = sorted(name for name, model in self.names.items() if allowed is None or allowed(model))
        return ", ".join(names) or "none for this key"

    def route(self, method: bytes, uri: bytes, payload: Mapping[str, Any] | None,
              allowed: Callable[[str], bool] | None = None) -> Routed:
        """The model for one request.  ``payload``: the parsed JSON object body of a POST, if any; one
        that names no model goes by ``?model=`` (then the default)."""
        if uri.startswith(UPSTREAM_PREFIX):
            name, _, rest = uri[len(UPSTREAM_PREFIX):].partition(b"/")
            model = self.resolve(name.decode("utf-8", "replace") or None, allowed)
            return Routed(model, b"/" + rest)
        if payload is not None and method == b"POST":
            named = payload.get("model")
            if named is not None and not isinstance(named, str):
                raise ApiError(400, f"\"model\" must be a string, not {type(named).__name__}", "invalid_model",
                               param="model")
            if named or b"?" not in uri:
                return Routed(self.resolve(named, allowed), uri)
        _, _, query = uri.partition(b"?")
        values = parse_qs(query.decode("latin-1")).get("model") if query else None
        return Routed(self.resolve(values[0] if values else None, allowed), uri)
