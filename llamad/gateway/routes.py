"""Every route of port 8000 in one table, with what each needs: a key and its role, the gate, activity.

The guard reads the roles, the proxy path reads the gate and how a body is
checked, and llamad's own routes (answered by the Klein app in
``gateway/app.py``) take their methods from here.  A path not listed is the
child's (``/props``, ``/slots``, ...): any method, the inference role, no gate.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

Role = Literal["public", "any", "inference", "admin"]
Body = Literal["", "json-object", "json", "form"]
AnsweredBy = Literal["llamad", "router", "child"]

GET = frozenset({"GET", "HEAD"})
POST = frozenset({"POST"})


@dataclasses.dataclass(frozen=True)
class Route:
    """One route: who answers it, the role a key needs, whether the gate admits it, how its body is checked."""

    path: str
    methods: frozenset[str]
    role: Role  # "public": no key; "any": any valid key; else a key with that role
    answered_by: AnsweredBy  # llamad (Klein), llamad's router API over the fleet, or the model's child
    gate: bool = False  # queued by the model's gate (slots, cold start) and counted as inference activity
    body: Body = ""  # "json-object": a strict JSON object, "json": any strict JSON, "form": multipart, "": as sent
    local: bool = False  # with auth off, loopback only: reaching the port makes no one an admin


def _inference(path: str, body: Body = "json-object") -> Route:
    return Route(path, POST, "inference", "child", gate=True, body=body)


def _child_json(path: str, body: Body = "json-object") -> Route:
    return Route(path, POST, "inference", "child", body=body)


ROUTES: tuple[Route, ...] = (
    # llamad's own (Klein); /metrics asks for a key only with auth.protect_metrics: it shows every model and key
    Route("/ping", GET, "public", "llamad"),
    Route("/health", GET, "public", "llamad"),
    Route("/metrics", GET, "admin", "llamad"),
    Route("/admin/reload", POST, "admin", "llamad", local=True),
    Route("/reload", POST, "admin", "llamad", local=True),  # llama-gguf-inference's path for the same
    Route("/admin/restart", POST, "admin", "llamad", local=True),
    # the status page: its files hold no data (no key); what it reads is the admin role's, never wakes a model
    Route("/ui", GET, "public", "llamad"),
    Route("/ui/", GET, "public", "llamad"),
    Route("/ui/app.js", GET, "public", "llamad"),
    Route("/ui/style.css", GET, "public", "llamad"),
    Route("/admin/status", GET, "admin", "llamad", local=True),
    Route("/admin/logs", GET, "admin", "llamad", local=True),
    Route("/admin/requests", GET, "admin", "llamad", local=True),
    Route("/admin/keys", GET, "admin", "llamad", local=True),
    # llama-server's router API, over the fleet; each key lists its own models
    Route("/v1/models", GET, "any", "router"),
    Route("/models", GET, "any", "router"),
    Route("/models/load", POST, "admin", "router", body="json-object"),
    Route("/models/unload", POST, "admin", "router", body="json-object"),
    # inference: the model runs
    *(_inference(path) for path in (
        "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank", "/v1/reranking",
        "/v1/responses", "/v1/messages", "/chat/completions", "/completions", "/completion", "/responses",
        "/embedding", "/embeddings", "/infill", "/rerank", "/reranking",
    )),
    _inference("/v1/audio/transcriptions", "form"),
    _inference("/audio/transcriptions", "form"),
    # the child's other JSON routes: held to the same strict JSON, routed by their "model"
    *(_child_json(path) for path in (
        "/tokenize", "/detokenize", "/apply-template", "/v1/chat/completions/control",
        "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens", "/responses/input_tokens",
        "/v1/responses/input_tokens", "/v1/messages/count_tokens", "/v1/streams/lookup", "/tools",
    )),
    _child_json("/lora-adapters", "json"),  # a JSON array (or object)
    # the child's, named for their own metric label
    Route("/props", frozenset(), "inference", "child"),
    Route("/slots", frozenset(), "inference", "child"),
)

BY_PATH: dict[str, Route] = {route.path: route for route in ROUTES}

# POST /slots/<id>?action=... takes a JSON object (erase may come with none).  /upstream/<id>/<path>
# is <path> sent to model <id> (``gateway/routing.py``).
SLOTS_PREFIX = b"/slots/"


def _paths(test: object) -> frozenset[str]:
    return frozenset(route.path for route in ROUTES if test(route))  # type: ignore[operator]


INFERENCE_ROUTES = _paths(lambda r: r.gate)
FORM_ROUTES = _paths(lambda r: r.body == "form")
JSON_BODY_ROUTES = _paths(lambda r: r.gate and r.body == "json-object")
CHILD_JSON_ROUTES = _paths(lambda r: r.answered_by == "child" and not r.gate and r.body)
JSON_ARRAY_ROUTES = _paths(lambda r: r.body == "json")
OWN_ROUTES = _paths(lambda r: r.answered_by == "llamad")
MODEL_LIST_ROUTES = _paths(lambda r: r.answered_by == "router" and r.methods == GET)
MODEL_LIST_PATHS = frozenset(path.encode() for path in MODEL_LIST_ROUTES)
MODELS_API_ROUTES = frozenset(r.path.encode() for r in ROUTES if r.answered_by == "router" and r.methods == POST)
# The guard's roles, by path.
PUBLIC_PATHS = frozenset(r.path.encode() for r in ROUTES if r.role == "public")
ADMIN_PATHS = frozenset(r.path.encode() for r in ROUTES if r.role == "admin")
ANY_ROLE_PATHS = frozenset(r.path.encode() for r in ROUTES if r.role == "any")
LOCAL_PATHS = frozenset(r.path.encode() for r in ROUTES if r.local)
# Each listed route is counted under its own metric label; any other path is "other" (bounded cardinality).
_LABELS = {route.path.encode(): route.path for route in ROUTES}


def route_label(path: bytes) -> str:
    """The metric label of ``path``: its route, or ``"other"``."""
    return _LABELS.get(path, "other")


def own_methods(path: str) -> list[str]:
    """The methods of one of llamad's own routes, for its Klein decorator."""
    route = BY_PATH[path]
    assert route.answered_by == "llamad", path
    return sorted(route.methods)
