"""Scale-from-zero decisions, with no I/O: which variants are inactive, which EPP
endpoints to scrape (once per pass, however many variants share them), and
which variants have requests waiting.

Objects are the plain JSON dicts the Kubernetes API returns.  Both
InferencePool shapes are understood: ``inference.networking.k8s.io/v1``
(``spec.selector.matchLabels``, ``spec.endpointPickerRef``) and
``inference.networking.x-k8s.io/v1alpha2`` (flat ``spec.selector``,
``spec.extensionRef``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

Obj = Mapping[str, Any]
POOL_V1 = "inference.networking.k8s.io"
POOL_V1ALPHA2 = "inference.networking.x-k8s.io"
ACCELERATOR_LABEL = "inference.optimization/acceleratorName"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
VA_API_VERSION = "llmd.ai/v1alpha1"


def meta(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def key(obj: Obj) -> tuple[str, str]:
    """(namespace, name)."""
    m = meta(obj)
    return m.get("namespace", ""), m.get("name", "")


def being_deleted(obj: Obj) -> bool:
    return bool(meta(obj).get("deletionTimestamp"))


@dataclass(frozen=True)
class Variant:
    """What a VariantAutoscaling asks for."""

    namespace: str
    name: str
    model_id: str
    deployment: str
    accelerator: str  # from the label, else the last status; "" when neither


class Skip(Exception):
    """A variant that cannot be handled this pass; the message says why (for the log)."""


def variant(va: Obj) -> Variant:
    """Read a VariantAutoscaling, or :class:`Skip` with the reason."""
    namespace, name = key(va)
    if being_deleted(va):
        raise Skip(f"{namespace}/{name}: being deleted")
    spec = va.get("spec") or {}
    ref = spec.get("scaleTargetRef") or {}
    api_version = ref.get("apiVersion") or "apps/v1"  # empty means apps/v1 (llm-d's autoscaler requires it)
    if ref.get("kind") != "Deployment" or api_version != "apps/v1" or not ref.get("name"):
        raise Skip(f"{namespace}/{name}: scaleTargetRef must name an apps/v1 Deployment, got {dict(ref)!r}")
    model_id = spec.get("modelID") or ""
    if not model_id:
        raise Skip(f"{namespace}/{name}: spec.modelID is empty")
    labels = meta(va).get("labels") or {}
    status = va.get("status") or {}
    accelerator = labels.get(ACCELERATOR_LABEL) or (status.get("desiredOptimizedAlloc") or {}).get("accelerator", "")
    return Variant(namespace, name, model_id, ref["name"], accelerator)


def inactive(deployment: Obj) -> bool:
    """Scaled to zero: ``spec.replicas == 0`` (absent means 1)."""
    replicas = (deployment.get("spec") or {}).get("replicas", 1)
    return replicas == 0


def template_labels(deployment: Obj) -> Mapping[str, str]:
    return ((((deployment.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels")) or {}


def pool_selector(pool: Obj) -> Mapping[str, str]:
    selector = (pool.get("spec") or {}).get("selector") or {}
    if isinstance(selector.get("matchLabels"), Mapping):
        return selector["matchLabels"]  # v1
    return {k: v for k, v in selector.items() if isinstance(v, str)}  # v1alpha2: a flat map


def pool_epp(pool: Obj) -> tuple[str, int | None]:
    """The EndpointPicker Service's name, and the port the pool names (v1 only)."""
    spec = pool.get("spec") or {}
    ref = spec.get("endpointPickerRef") or spec.get("extensionRef") or {}
    port = (ref.get("port") or {}).get("number") if isinstance(ref.get("port"), Mapping) else None
    return ref.get("name", ""), port


def pools_for(deployment: Obj, pools: Iterable[Obj]) -> list[Obj]:
    """Pools in the Deployment's namespace whose selector is a subset of its pod-template labels."""
    namespace = key(deployment)[0]
    labels = template_labels(deployment)
    found = []
    for pool in pools:
        selector = pool_selector(pool)
        if key(pool)[0] == namespace and selector and all(labels.get(k) == v for k, v in selector.items()):
            found.append(pool)
    return sorted(found, key=key)


def metrics_port(service: Obj) -> int | None:
    """The first Service port whose name contains ``metric`` (Helm calls it ``http-metrics``)."""
    for port in (service.get("spec") or {}).get("ports") or []:
        if "metric" in (port.get("name") or ""):
            return int(port.get("targetPort") if isinstance(port.get("targetPort"), int) else port["port"])
    return None


def ready_endpoints(slices: Iterable[Obj]) -> dict[tuple[str, str], list[str]]:
    """EndpointSlices to each Service's ready addresses (``ready`` absent counts as ready, as the API says)."""
    found: dict[tuple[str, str], set[str]] = {}
    for es in slices:
        service = (meta(es).get("labels") or {}).get(SERVICE_NAME_LABEL)
        if not service or es.get("addressType") not in ("IPv4", "IPv6"):
            continue
        ips = found.setdefault((key(es)[0], service), set())
        for endpoint in es.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is not False:
                ips.update(endpoint.get("addresses") or [])
    return {k: sorted(v) for k, v in found.items()}


def host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def queued(text: str, metric_names: Iterable[str]) -> dict[str, float]:
    """The EPP queue per ``target_model_name`` (summed over its series) from Prometheus text.

    Only the queue families are handed to ``prometheus_client``'s parser, so a
    large exposition costs little; a malformed queue line raises ValueError.
    Series without ``target_model_name`` (EPP < v1.3, or ``model_name`` only)
    can never match a model.
    """
    names = tuple(metric_names)
    wanted = [line for line in text.splitlines()
              if line.startswith(names) or (line.startswith("#") and any(f" {n} " in line for n in names))]
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families("\n".join(wanted) + "\n"):
        for sample in family.samples:
            model = sample.labels.get("target_model_name")
            if sample.name in names and model:
                totals[model] = totals.get(model, 0.0) + sample.value
    return totals


SCALED_CONDITIONS = (("MetricsAvailable", "ScaleFromZero", "requests are waiting in the EPP queue"),
                     ("OptimizationReady", "ScaleFromZeroMode", "scaled from zero to one replica"))


def status_patch(va: Obj, accelerator: str, now: str) -> dict[str, Any]:
    """The merge patch of ``status`` after a 0 -> 1 scale.

    A merge patch replaces lists whole, so every condition is sent: the two set
    here, with ``lastTransitionTime`` kept when their status does not change,
    and the others as they were.
    """
    status = va.get("status") or {}
    conditions = [dict(c) for c in status.get("conditions") or []]
    by_type = {c.get("type"): c for c in conditions}
    generation = meta(va).get("generation")
    for kind, reason, message in SCALED_CONDITIONS:
        condition = by_type.get(kind)
        if condition is None:
            condition = {"type": kind}
            conditions.append(condition)
        if condition.get("status") != "True" or not condition.get("lastTransitionTime"):
            condition["lastTransitionTime"] = now
        condition.update(status="True", reason=reason, message=message)
        if generation is not None:
            condition["observedGeneration"] = generation
    patch: dict[str, Any] = {"actuation": {"applied": True}, "conditions": conditions}
    if accelerator:
        patch["desiredOptimizedAlloc"] = {"numReplicas": 1, "accelerator": accelerator, "lastRunTime": now}
    return {"status": patch}


def scaled_event(va: Obj, v: Variant, now: str, instance: str) -> dict[str, Any]:
    """A core/v1 Event on the VariantAutoscaling saying what was scaled and why."""
    m = meta(va)
    return {
        "apiVersion": "v1", "kind": "Event",
        "metadata": {"generateName": f"{v.name}.", "namespace": v.namespace},
        "involvedObject": {"apiVersion": VA_API_VERSION, "kind": "VariantAutoscaling", "name": v.name,
                           "namespace": v.namespace, "uid": m.get("uid", ""),
                           "resourceVersion": m.get("resourceVersion", "")},
        "reason": "ScaledFromZero", "type": "Normal",
        "message": f"Scaled Deployment {v.deployment} from 0 to 1: requests for {v.model_id} wait in the EPP queue",
        "source": {"component": "llamad-scale-from-zero"},
        "reportingComponent": "llamad-scale-from-zero", "reportingInstance": instance,
        "firstTimestamp": now, "lastTimestamp": now, "count": 1,
    }


@dataclass
class Pass:
    """One pass's work: the inactive variants, and each EPP endpoint to scrape once for all of them."""

    scrape: dict[str, list[Variant]] = field(default_factory=dict)  # "ip:port" -> variants it serves
    skipped: list[tuple[str, str]] = field(default_factory=list)  # ("ns/name", why) per variant skipped
    inactive: set[tuple[str, str]] = field(default_factory=set)  # (ns, name) of every inactive variant


def plan(vas: Iterable[Obj], deployments: Mapping[tuple[str, str], Obj], pools: Iterable[Obj],
         services: Mapping[tuple[str, str], Obj], endpoints: Mapping[tuple[str, str], list[str]]) -> Pass:
    """Decide what to scrape this pass.

    ``endpoints`` maps an EPP Service (namespace, name) to its ready pod IPs.
    """
    work = Pass()
    pool_list = list(pools)
    for va in vas:
        try:
            v = variant(va)
            deployment = deployments.get((v.namespace, v.deployment))
            if deployment is None:
                raise Skip(f"{v.namespace}/{v.name}: Deployment {v.deployment} not found")
            if being_deleted(deployment):
                raise Skip(f"{v.namespace}/{v.name}: Deployment {v.deployment} is being deleted")
            if not inactive(deployment):
                continue
            work.inactive.add((v.namespace, v.name))
            matches = pools_for(deployment, pool_list)
            if not matches:
                raise Skip(f"{v.namespace}/{v.name}: no InferencePool selects Deployment {v.deployment}")
            if len(matches) > 1:
                names = ", ".join(key(p)[1] for p in matches)
                raise Skip(f"{v.namespace}/{v.name}: several InferencePools select {v.deployment} ({names})")
            service_name, _ = pool_epp(matches[0])
            service = services.get((v.namespace, service_name))
            if service is None:
                raise Skip(f"{v.namespace}/{v.name}: EPP Service {service_name} not found")
            port = metrics_port(service)
            if port is None:
                raise Skip(f"{v.namespace}/{v.name}: EPP Service {service_name} has no port named *metric*")
            ips = endpoints.get((v.namespace, service_name)) or []
            if not ips:
                raise Skip(f"{v.namespace}/{v.name}: EPP Service {service_name} has no ready endpoint")
            for ip in ips:
                work.scrape.setdefault(host_port(ip, port), []).append(v)
        except Skip as reason:
            work.skipped.append(("/".join(key(va)), str(reason)))
    return work
