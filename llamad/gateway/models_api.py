"""llama-server's router API for models, answered by llamad: pure functions, no I/O.

``llama-server --models-dir DIR`` (router mode) lists its models at ``GET /models``
(and ``GET /v1/models``, the same JSON) and loads and unloads them on
``POST /models/load`` and ``POST /models/unload`` with ``{"model": id}``.  Tools
written for the router (llama.cpp's web UI among them) read that JSON, so llamad
answers in exactly its shape: the same keys with the same JSON types, and the
same values wherever a client may branch on them (``object``, ``status.value``,
``status.failed``, error ``type`` and ``code``).  llamad's own facts go under one
extra key, ``"llamad"``, so that no router key changes meaning.

The shapes were captured from the real router (tests/fixtures/router_shapes.json)
and a live test checks them against the installed llama-server.

Differences from the router, each deliberate:

* ``owned_by`` is ``"llamad"`` (the router says ``"llamacpp"``): it is free text for
  OpenAI clients, llama.cpp's UI does not branch on it, and llamad's single-model
  ``/v1/models`` already says ``"llamad"``.
* An unknown model on load answers 404 ``not_found_error`` with the message
  ``"model is not found"``: the router means to say that, but its HTTP layer
  rewrites every 404 body to ``"File Not Found"``.  Status, type and code match.
* A body that is not JSON (or not an object) is a 400 ``invalid_request_error``;
  the router answers 500 ``server_error`` with its parser's exception text, and
  llamad answers every bad input with a 4xx.
* ``meta`` (the loaded model's vocabulary, context and size facts) appears only
  while the model is loaded and only when llamad has read it from the child's own
  ``/v1/models`` (:func:`child_meta`); the router shows it whenever the child runs.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Literal, Mapping, Sequence

from llamad.fleet.fleet import ModelSnapshot

RouterStatus = Literal["unloaded", "loading", "loaded"]
Answer = tuple[int, dict[str, Any]]

# llamad's backend state -> the router's status.value.
#  * backoff: the child crashed and llamad starts it again after a delay; the model is on its
#    way up, so a client waiting for "loaded" keeps waiting, as it should (the router itself
#    never restarts a crashed child on its own, and so has no such state).
#  * stopping: the router keeps showing "loaded" until the child has exited (captured), and
#    answers a load then with "already running"; llamad does the same.
#  * failed: llamad gave up starting it; the router shows a failed start as "unloaded" with
#    status.failed = true and status.exit_code.
ROUTER_STATUS: Mapping[str, RouterStatus] = {
    "stopped": "unloaded",
    "starting": "loading",
    "backoff": "loading",
    "ready": "loaded",
    "stopping": "loaded",
    "failed": "unloaded",
}

RUNNING: frozenset[str] = frozenset({"loading", "loaded"})
"""Router values of a running model: load says "already running", unload is accepted."""

OWNED_BY = "llamad"
UNKNOWN_EXIT_CODE = -1  # a failed model with no exit status (killed, never spawned): the router's field is an int

ERROR_TYPES: Mapping[int, str] = {400: "invalid_request_error", 404: "not_found_error", 500: "server_error"}


def router_status(snapshot: ModelSnapshot) -> RouterStatus:
    return ROUTER_STATUS[snapshot.state]


def is_running(snapshot: ModelSnapshot) -> bool:
    """Running as the router counts it (loading or loaded): what load and unload check."""
    return router_status(snapshot) in RUNNING


class ModelsApiError(Exception):
    """A request the models API refuses, carried to the one place that writes the answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def answer(self) -> Answer:
        return error_answer(self.status, self.message)


def error_answer(status: int, message: str) -> Answer:
    """The router's error body: ``{"error": {"code": <int status>, "message", "type"}}``.

    Unlike llamad's OpenAI-style errors (string ``code``, ``param``), the router puts
    the HTTP status in ``code`` as an integer; clients of the router read it so.
    """
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return status, {"error": {"code": status, "message": message, "type": kind}}


def success_answer() -> Answer:
    """What the router answers to an accepted load or unload (the work goes on in the background)."""
    return 200, {"success": True}


def preset_ini(snapshot: ModelSnapshot) -> str:
    """``status.preset``: the model's settings as the router's INI (a models_dir model has only its path)."""
    return f"[{snapshot.id}]\nmodel = {snapshot.path}\n\n"


def model_entry(snapshot: ModelSnapshot) -> dict[str, Any]:
    """One element of ``data``: the router's keys in the router's order, then ``"llamad"``."""
    status: dict[str, Any] = {"value": router_status(snapshot), "args": list(snapshot.args),
                              "preset": preset_ini(snapshot)}
    if snapshot.state == "failed":
        # The router flags a failure only on an unloaded model, with the child's exit status.
        status["exit_code"] = snapshot.exit_code if snapshot.exit_code is not None else UNKNOWN_EXIT_CODE
        status["failed"] = True
    entry: dict[str, Any] = {
        "id": snapshot.id,
        "aliases": list(snapshot.aliases),
        "tags": [],  # llamad has no tags; the router's models_dir models have none either
        "object": "model",
        "owned_by": OWNED_BY,
        "created": snapshot.created,
        "status": status,
        "architecture": {"input_modalities": list(snapshot.input_modalities), "output_modalities": ["text"]},
        "source": snapshot.source,
        "can_remove": False,  # only the router's download cache is removable; llamad never deletes a GGUF
    }
    if router_status(snapshot) == "loaded" and snapshot.meta is not None:
        entry["meta"] = dict(snapshot.meta)
    entry["llamad"] = {
        "state": snapshot.state,
        "reason": snapshot.reason,
        "exit_code": snapshot.exit_code,
        "pid": snapshot.pid,
        "path": snapshot.path,
        "memory": snapshot.memory_need,
        "last_used": snapshot.last_used,
        "in_flight": snapshot.in_flight,
        "queued": snapshot.queued,
    }
    if snapshot.kv is not None:
        entry["llamad"]["kv_cache"] = dict(snapshot.kv)
    return entry


def models_list(snapshots: Iterable[ModelSnapshot]) -> dict[str, Any]:
    """The body of ``GET /models`` and ``GET /v1/models`` (the router answers both alike), in config order."""
    return {"data": [model_entry(s) for s in snapshots], "object": "list"}


def find_model(snapshots: Iterable[ModelSnapshot], name: str) -> ModelSnapshot | None:
    """The model ``name`` names, as the router looks it up: an id first, then an alias."""
    candidates = list(snapshots)
    for snapshot in candidates:
        if snapshot.id == name:
            return snapshot
    for snapshot in candidates:
        if name in snapshot.aliases:
            return snapshot
    return None


def requested_model(body: bytes | str) -> str:
    """The ``model`` of a load or unload body; raises :class:`ModelsApiError` for a body that is not a JSON object.

    A missing or non-string ``model`` reads as "" (no model has that name), as in the
    router, so it gets the same not-found answer as an unknown name.
    """
    try:
        parsed = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelsApiError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ModelsApiError(400, "request body must be a JSON object with a \"model\" key")
    name = parsed.get("model", "")
    return name if isinstance(name, str) else ""


_JSON_KINDS: Mapping[type, str] = {str: "a string", int: "a number", float: "a number", list: "an array",
                                   dict: "an object", type(None): "null"}


def requested_force(body: bytes | str) -> bool:
    """An unload body's ``force`` (a body :func:`requested_model` accepted): absent is false; anything
    but a JSON boolean is a 400 (``"yes"`` or ``1`` could mean either, and a guess that cuts running
    requests is not llamad's to make)."""
    force = json.loads(body).get("force", False)
    if not isinstance(force, bool):
        raise ModelsApiError(400, f"\"force\" must be a boolean (true or false), not {_JSON_KINDS[type(force)]}")
    return force


def load_answer(snapshot: ModelSnapshot | None) -> Answer:
    """``POST /models/load``: 200 means the caller should start the model now.

    Unknown: 404 not_found_error; loading or loaded (llamad: starting, backoff, ready,
    stopping): 400 "model is already running".  A failed model may be loaded again.
    """
    if snapshot is None:
        return error_answer(404, "model is not found")
    if is_running(snapshot):
        return error_answer(400, "model is already running")
    return success_answer()


def unload_answer(snapshot: ModelSnapshot | None) -> Answer:
    """``POST /models/unload``: 200 means the caller should stop the model now.

    Unknown: 400 (not 404: the router's unload says invalid_request_error); not
    loading or loaded (stopped, failed) and no load waiting for room: 400 "model
    is not running".  A load that waits for room is called off.
    """
    if snapshot is None:
        return error_answer(400, "model is not found")
    if not is_running(snapshot) and not snapshot.waiting_for_room:
        return error_answer(400, "model is not running")
    return success_answer()


def child_meta(answer: Mapping[str, Any]) -> dict[str, Any] | None:
    """``meta`` from a child llama-server's own ``/v1/models`` answer, which the router shows as is."""
    data = answer.get("data")
    if not isinstance(data, Sequence) or not data or not isinstance(data[0], Mapping):
        return None
    meta = data[0].get("meta")
    return dict(meta) if isinstance(meta, Mapping) else None
