"""A faithful fake of the Kubernetes API calls the poller makes, served over real HTTP.

List with ``resourceVersion``; watch streams of ADDED/MODIFIED/DELETED/BOOKMARK
events from a resourceVersion, 410 Gone once that version is compacted away;
409 on a stale ``resourceVersion`` in PUT; merge-patch; create with
``generateName``; bearer auth (401), and 403 or any other status injected per
call for failure tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request


class FakeKube(Resource):
    isLeaf = True

    def __init__(self, token: str = "secret-token") -> None:
        super().__init__()
        self.token = token
        self.rv = 100
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}  # collection -> (ns, name) -> obj
        self.history: list[tuple[int, str, str, dict[str, Any]]] = []  # (rv, collection, type, obj)
        self.oldest = 0  # watches from before this resourceVersion get 410
        self.watchers: list[tuple[Request, str, str]] = []  # (request, collection, namespace or "")
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call
        self.control: Any = None  # the control API, when run as its own process (see main)
        self.faults: list[tuple[str, str, int, int]] = []  # (method, path suffix, status, times; -1 = always)
        self.generated = 0
        self.writes: list[tuple[float, str, str]] = []  # (monotonic time, method, path) of PUT/PATCH/POST

    # --- test control ---------------------------------------------------------

    def put_object(self, collection: str, obj: dict[str, Any]) -> dict[str, Any]:
        """Create or replace ``obj`` in ``collection`` ("apis/apps/v1/deployments"): ADDED or MODIFIED."""
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj.setdefault("metadata", {})["resourceVersion"] = str(self.rv)
        key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
        kind = "MODIFIED" if key in self.objects.setdefault(collection, {}) else "ADDED"
        self.objects[collection][key] = obj
        self._event(collection, kind, obj)
        return obj

    def delete_object(self, collection: str, namespace: str, name: str) -> None:
        obj = self.objects[collection].pop((namespace, name))
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self._event(collection, "DELETED", obj)

    def compact(self) -> None:
        """Forget the history: a watch from an older resourceVersion now gets 410 Gone."""
        self.history.clear()
        self.oldest = self.rv

    def fail(self, method: str, suffix: str, code: int, times: int = 1) -> None:
        """Answer ``code`` to the next ``times`` calls (-1: all) of ``method`` on a path ending in ``suffix``."""
        self.faults.append((method, suffix, code, times))

    def calls(self, method: str, suffix: str = "") -> list[str]:
        return [p for m, p in self.requests if m == method and p.endswith(suffix)]

    def _fault(self, method: str, path: str) -> int | None:
        for i, (m, suffix, code, times) in enumerate(self.faults):
            if m == method and path.endswith(suffix):
                if times > 0:
                    self.faults[i] = (m, suffix, code, times - 1)
                    if times == 1:
                        del self.faults[i]
                return code
        return None

    def cut_watches(self) -> None:
        for request, _, _ in list(self.watchers):
            request.channel.transport.loseConnection()
        self.watchers.clear()

    # --- HTTP -------------------------------------------------------------------

    def _event(self, collection: str, kind: str, obj: dict[str, Any]) -> None:
        self.history.append((self.rv, collection, kind, obj))
        for request, watched, namespace in list(self.watchers):
            if watched == collection and namespace in ("", obj["metadata"].get("namespace", "")):
                request.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")

    def render(self, request: Request) -> bytes | int:
        path = request.path.decode()
        if path.startswith("/_fake/") and self.control is not None:
            return self.control(request, path)
        self.requests.append((request.method.decode(), path + ("?watch" if b"watch" in request.args else "")))
        if request.method != b"GET":
            self.writes.append((time.monotonic(), request.method.decode(), path))
        if request.getHeader(b"authorization") != f"Bearer {self.token}".encode():
            return self._status(request, 401, "Unauthorized")
        injected = self._fault(request.method.decode(), path)
        if injected is not None:
            reason = {403: "forbidden: the service account may not do this"}.get(injected, "injected failure")
            return self._status(request, injected, reason)
        collection, namespace, name, sub = self._parse(path)
        if request.method == b"POST" and not name:
            body = json.loads(request.content.read() or b"{}")
            body.setdefault("metadata", {})["namespace"] = namespace
            if not body["metadata"].get("name"):
                self.generated += 1
                body["metadata"]["name"] = f"{body['metadata'].get('generateName', 'obj-')}{self.generated:05x}"
            return self._json(request, 201, self.put_object(collection, body))
        if request.method == b"GET" and not name:
            if request.args.get(b"watch", [b""])[0] in (b"1", b"true"):
                return self._watch(request, collection, namespace)
            return self._list(request, collection, namespace)
        items = self.objects.get(collection, {})
        obj = items.get((namespace, name))
        if obj is None:
            return self._status(request, 404, f"{name} not found")
        if request.method == b"GET":
            return self._json(request, 200, self._view(obj, sub))
        body = json.loads(request.content.read() or b"{}")
        if request.method == b"PUT" and sub == "scale":
            if body.get("metadata", {}).get("resourceVersion") != obj["metadata"]["resourceVersion"]:
                return self._status(request, 409, "the object has been modified; please apply your changes "
                                                  "to the latest version and try again")
            updated = copy.deepcopy(obj)
            updated["spec"]["replicas"] = body["spec"]["replicas"]
            return self._json(request, 200, self._view(self.put_object(collection, updated), sub))
        if request.method == b"PATCH" and sub == "status":
            if request.getHeader(b"content-type") != b"application/merge-patch+json":
                return self._status(request, 415, "merge patch only")
            updated = copy.deepcopy(obj)
            _merge(updated.setdefault("status", {}), body.get("status", {}))
            return self._json(request, 200, self.put_object(collection, updated))
        return self._status(request, 405, "not supported by the fake")

    @staticmethod
    def _parse(path: str) -> tuple[str, str, str, str]:
        """(collection, namespace, name, subresource) for /api/v1/... and /apis/g/v/..."""
        parts = [p for p in path.split("/") if p]
        prefix = parts[:2] if parts[0] == "api" else parts[:3]
        rest = parts[len(prefix):]
        namespace = ""
        if rest and rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        plural = rest[0]
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        return "/".join(prefix + [plural]), namespace, name, sub

    @staticmethod
    def _view(obj: dict[str, Any], sub: str) -> dict[str, Any]:
        if sub != "scale":
            return obj
        return {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {k: obj["metadata"][k] for k in ("name", "namespace", "resourceVersion")},
                "spec": {"replicas": obj["spec"].get("replicas", 1)}}

    def _list(self, request: Request, collection: str, namespace: str) -> bytes:
        items = [o for (ns, _), o in sorted(self.objects.get(collection, {}).items())
                 if namespace in ("", ns)]
        return self._json(request, 200, {"kind": "List", "metadata": {"resourceVersion": str(self.rv)},
                                         "items": items})

    def _watch(self, request: Request, collection: str, namespace: str) -> int:
        since = int(request.args.get(b"resourceVersion", [b"0"])[0] or 0)
        request.setHeader(b"content-type", b"application/json")
        if since < self.oldest:
            gone = {"kind": "Status", "status": "Failure", "reason": "Expired", "code": 410,
                    "message": f"too old resource version: {since} ({self.oldest})"}
            request.write(json.dumps({"type": "ERROR", "object": gone}).encode() + b"\n")
            request.finish()
            return NOT_DONE_YET
        for rv, watched, kind, obj in self.history:
            if rv > since and watched == collection and namespace in ("", obj["metadata"].get("namespace", "")):
                request.write(json.dumps({"type": kind, "object": obj}).encode() + b"\n")
        request.write(json.dumps({"type": "BOOKMARK", "object": {
            "metadata": {"resourceVersion": str(self.rv)}}}).encode() + b"\n")
        entry = (request, collection, namespace)
        self.watchers.append(entry)
        request.notifyFinish().addBoth(lambda _: entry in self.watchers and self.watchers.remove(entry))
        return NOT_DONE_YET

    @staticmethod
    def _json(request: Request, code: int, body: dict[str, Any]) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body).encode()

    def _status(self, request: Request, code: int, message: str) -> bytes:
        return self._json(request, code, {"kind": "Status", "status": "Failure", "code": code, "message": message})


def _merge(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 7386 merge patch."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            _merge(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


# --- fake EndpointPickers and a model's objects ---------------------------------------

VAS = "apis/llmd.ai/v1alpha1/variantautoscalings"
DEPLOYMENTS = "apis/apps/v1/deployments"
SERVICES = "api/v1/services"
SLICES = "apis/discovery.k8s.io/v1/endpointslices"
EVENTS = "api/v1/events"
QUEUE = "inference_extension_flow_control_queue_size"


def pools(group: str = "inference.networking.k8s.io") -> str:
    return f"apis/{group}/{'v1' if group == 'inference.networking.k8s.io' else 'v1alpha2'}/inferencepools"


class FakeEPP(Resource):
    """An EndpointPicker's ``/metrics``: queue sizes per model in Prometheus text, optionally behind a token."""

    isLeaf = True

    def __init__(self, token: str | None = None, metric: str = QUEUE) -> None:
        super().__init__()
        self.token = token
        self.metric = metric
        self.queues: dict[str, float] = {}  # target_model_name -> size
        self.only_model_name = False  # EPP < v1.3 style series: model_name, no target_model_name
        self.body: bytes | None = None  # served as is when set (for malformed scrapes)
        self.scrapes = 0
        self.refused = 0

    def render(self, request: Request) -> bytes:
        self.scrapes += 1
        if self.token is not None and request.getHeader(b"authorization") != f"Bearer {self.token}".encode():
            self.refused += 1
            request.setResponseCode(401)
            return b"Unauthorized\n"
        request.setHeader(b"content-type", b"text/plain; version=0.0.4")
        if self.body is not None:
            return self.body
        lines = ["# HELP go_goroutines Number of goroutines.", "# TYPE go_goroutines gauge", "go_goroutines 42",
                 f"# HELP {self.metric} Requests waiting in the flow-control queue.", f"# TYPE {self.metric} gauge"]
        for model, size in sorted(self.queues.items()):
            labels = f'model_name="{model}"' if self.only_model_name else \
                f'inference_pool="pool",model_name="{model}",target_model_name="{model}"'
            lines.append(f"{self.metric}{{{labels}}} {size:g}")
        return ("\n".join(lines) + "\n").encode()


def model_objects(name: str, namespace: str = "models", model: str = "", replicas: int = 0,
                  group: str = "inference.networking.k8s.io", epp_ips: tuple[str, ...] = ("127.0.0.2",),
                  epp_port: int = 9090, accelerator: str = "L4", pool: bool = True,
                  ) -> list[tuple[str, dict[str, Any]]]:
    """(collection, object) for one variant: Deployment, InferencePool, EPP Service + slice, VariantAutoscaling."""
    labels = {"app": name, "llm-d.ai/inferenceServing": "true"}
    epp = f"{name}-epp"
    objs: list[tuple[str, dict[str, Any]]] = [
        (DEPLOYMENTS, {"metadata": {"name": name, "namespace": namespace}, "spec": {
            "replicas": replicas, "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}}}}),
        (SERVICES, {"metadata": {"name": epp, "namespace": namespace}, "spec": {
            "selector": {"app": epp}, "ports": [{"name": "grpc-ext-proc", "port": 9002},
                                                {"name": "http-metrics", "port": epp_port}]}}),
        (SLICES, {"metadata": {"name": f"{epp}-x1", "namespace": namespace,
                               "labels": {"kubernetes.io/service-name": epp}},
                  "addressType": "IPv4",
                  "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in epp_ips],
                  "ports": [{"name": "http-metrics", "port": epp_port}]}),
        (VAS, {"metadata": {"name": name, "namespace": namespace, "generation": 1, "uid": f"uid-{name}",
                            "labels": {"inference.optimization/acceleratorName": accelerator} if accelerator else {}},
               "spec": {"scaleTargetRef": {"kind": "Deployment", "name": name}, "modelID": model or name,
                        "variantCost": "10.0"}}),
    ]
    if pool:
        if group == "inference.networking.k8s.io":
            spec = {"selector": {"matchLabels": {"app": name}}, "targetPorts": [{"number": 8000}],
                    "endpointPickerRef": {"name": epp, "port": {"number": 9002}}}
        else:
            spec = {"selector": {"app": name}, "targetPortNumber": 8000, "extensionRef": {"name": epp}}
        objs.insert(1, (pools(group), {"metadata": {"name": f"{name}-pool", "namespace": namespace}, "spec": spec}))
    return objs


# --- run as a process: the fake cluster plus EPPs, driven over a small control API --------------


class Control:
    """``/_fake/*`` on the API port (no token): put objects, set EPP queues, read what happened."""

    def __init__(self, kube: FakeKube, epps: dict[str, FakeEPP]) -> None:
        self.kube = kube
        self.epps = epps
        self.flips: dict[str, float] = {}  # model -> monotonic time its queue last went above zero

    def __call__(self, request: Request, path: str) -> bytes:
        body = json.loads(request.content.read() or b"{}") if request.method == b"POST" else {}
        if path == "/_fake/objects":
            for collection, obj in body["objects"]:
                self.kube.put_object(collection, obj)
            return self.kube._json(request, 200, {"rv": self.kube.rv})
        if path == "/_fake/queue":
            for ip in body.get("ips") or list(self.epps):
                self.epps[ip].queues[body["model"]] = body["size"]
            if body["size"] > 0:
                self.flips.setdefault(body["model"], time.monotonic())
            return self.kube._json(request, 200, {})
        if path == "/_fake/state":
            return self.kube._json(request, 200, {
                "requests": self.kube.requests, "writes": self.kube.writes, "flips": self.flips,
                "scrapes": {ip: epp.scrapes for ip, epp in self.epps.items()},
                "replicas": {f"{ns}/{name}": d["spec"].get("replicas", 1)
                             for (ns, name), d in self.kube.objects.get(DEPLOYMENTS, {}).items()},
                "vas": {f"{ns}/{name}": va.get("status") for (ns, name), va in self.kube.objects.get(VAS, {}).items()},
                "events": len(self.kube.objects.get(EVENTS, {})),
            })
        return self.kube._status(request, 404, "no such control call")


def main(argv: list[str] | None = None) -> None:
    """Serve the fake API on 127.0.0.1 and EPPs on the given loopback addresses; print the ports as JSON."""
    from twisted.internet import reactor
    from twisted.web.server import Site

    parser = argparse.ArgumentParser()
    parser.add_argument("--epps", default="127.0.0.2,127.0.0.3")
    parser.add_argument("--epp-token", default=None)
    args = parser.parse_args(argv)
    kube = FakeKube()
    epps = {ip: FakeEPP(token=args.epp_token) for ip in args.epps.split(",") if ip}
    kube.control = Control(kube, epps)
    api = reactor.listenTCP(0, Site(kube), interface="127.0.0.1")
    epp_port = 0
    for ip, epp in epps.items():
        epp_port = reactor.listenTCP(epp_port, Site(epp), interface=ip).getHost().port
    print(json.dumps({"api": f"http://127.0.0.1:{api.getHost().port}", "epp_port": epp_port}), flush=True)
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
