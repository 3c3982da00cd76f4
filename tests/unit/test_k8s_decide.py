"""Scale-from-zero decisions on plain API objects: no I/O."""

from __future__ import annotations

import pytest

from llamad.k8s.decide import (
    Skip, host_port, metrics_port, plan, pool_epp, pool_selector, queued, ready_endpoints, scaled_event, status_patch,
    variant,
)

NAMES = ["inference_extension_flow_control_queue_size", "llm_d_epp_flow_control_queue_size"]


def va(name="llama-va", ns="models", model="meta/llama-3.1-8b", target="llama-8b", api_version="apps/v1",
       labels=None, status=None, deleting=False):
    m = {"name": name, "namespace": ns, "labels": labels or {}}
    if deleting:
        m["deletionTimestamp"] = "2026-11-22T00:00:00Z"
    return {"metadata": m, "status": status or {},
            "spec": {"scaleTargetRef": {"apiVersion": api_version, "kind": "Deployment", "name": target},
                     "modelID": model}}


def deployment(name="llama-8b", ns="models", replicas=0, labels=None):
    spec = {"template": {"metadata": {"labels": labels or {"app": "llama-8b", "model": "m", "tier": "gpu"}}}}
    if replicas is not None:
        spec["replicas"] = replicas
    return {"metadata": {"name": name, "namespace": ns}, "spec": spec}


def pool_v1(name="llama-pool", ns="models", selector=None, epp="llama-epp"):
    return {"apiVersion": "inference.networking.k8s.io/v1", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": {"matchLabels": selector or {"app": "llama-8b"}},
                     "endpointPickerRef": {"name": epp, "port": {"number": 9002}}}}


def pool_v1alpha2(name="llama-pool", ns="models", selector=None, epp="llama-epp"):
    return {"apiVersion": "inference.networking.x-k8s.io/v1alpha2", "metadata": {"name": name, "namespace": ns},
            "spec": {"selector": selector or {"app": "llama-8b"}, "extensionRef": {"name": epp}}}


def service(name="llama-epp", ns="models", ports=None):
    return {"metadata": {"name": name, "namespace": ns},
            "spec": {"ports": ports or [{"name": "grpc", "port": 9002}, {"name": "http-metrics", "port": 9090}]}}


def world(vas=None, deployments=None, pools=None, services=None, endpoints=None):
    deployments = deployments if deployments is not None else [deployment()]
    services = services if services is not None else [service()]
    return plan(
        vas if vas is not None else [va()],
        {(d["metadata"]["namespace"], d["metadata"]["name"]): d for d in deployments},
        pools if pools is not None else [pool_v1()],
        {(s["metadata"]["namespace"], s["metadata"]["name"]): s for s in services},
        endpoints if endpoints is not None else {("models", "llama-epp"): ["127.0.0.2", "127.0.0.3"]},
    )


@pytest.mark.parametrize("make_pool", [pool_v1, pool_v1alpha2])
def test_inactive_variant_scrapes_every_ready_epp_endpoint(make_pool):
    work = world(pools=[make_pool()])
    assert sorted(work.scrape) == ["127.0.0.2:9090", "127.0.0.3:9090"]
    assert [v.name for v in work.scrape["127.0.0.2:9090"]] == ["llama-va"]
    assert work.skipped == []


def test_variants_sharing_a_pool_share_one_scrape():
    vas = [va(name=f"va{i}", model=f"m{i}") for i in range(5)]
    work = world(vas=vas, endpoints={("models", "llama-epp"): ["127.0.0.2"]})
    assert list(work.scrape) == ["127.0.0.2:9090"]
    assert [v.model_id for v in work.scrape["127.0.0.2:9090"]] == ["m0", "m1", "m2", "m3", "m4"]


@pytest.mark.parametrize("replicas", [1, 3, None])  # None: absent, which means 1
def test_active_deployments_are_left_alone(replicas):
    work = world(deployments=[deployment(replicas=replicas)])
    assert work.scrape == {} and work.skipped == []


def test_empty_api_version_means_apps_v1():
    assert variant(va(api_version="")).deployment == "llama-8b"
    with pytest.raises(Skip, match="apps/v1 Deployment"):
        variant(va(api_version="apps/v2"))


@pytest.mark.parametrize("case, kwargs, reason", [
    ("deleted variant", {"vas": [va(deleting=True)]}, "being deleted"),
    ("missing deployment", {"deployments": []}, "Deployment llama-8b not found"),
    ("no pool", {"pools": [pool_v1(selector={"app": "other"})]}, "no InferencePool selects"),
    ("pool elsewhere", {"pools": [pool_v1(ns="other")]}, "no InferencePool selects"),
    ("two pools", {"pools": [pool_v1(name="a"), pool_v1(name="b")]}, "several InferencePools select llama-8b (a, b)"),
    ("no service", {"services": []}, "EPP Service llama-epp not found"),
    ("no metrics port", {"services": [service(ports=[{"name": "grpc", "port": 9002}])]}, "no port named *metric*"),
    ("no endpoints", {"endpoints": {}}, "no ready endpoint"),
])
def test_skipped_variants_say_why(case, kwargs, reason):
    work = world(**kwargs)
    assert work.scrape == {}
    assert len(work.skipped) == 1 and reason in work.skipped[0][1], work.skipped


def test_a_broken_variant_does_not_stop_the_others():
    vas = [va(name="broken", target="gone"), va(name="good")]
    work = world(vas=vas)
    assert [v.name for v in work.scrape["127.0.0.2:9090"]] == ["good"]
    assert len(work.skipped) == 1


def test_accelerator_from_label_then_status():
    assert variant(va(labels={"inference.optimization/acceleratorName": "H100"})).accelerator == "H100"
    assert variant(va(status={"desiredOptimizedAlloc": {"accelerator": "A100"}})).accelerator == "A100"
    assert variant(va()).accelerator == ""


def test_pool_shapes():
    assert pool_selector(pool_v1()) == {"app": "llama-8b"} == pool_selector(pool_v1alpha2())
    assert pool_epp(pool_v1()) == ("llama-epp", 9002) and pool_epp(pool_v1alpha2()) == ("llama-epp", None)
    assert metrics_port(service(ports=[{"name": "metrics", "port": 80, "targetPort": 9090}])) == 9090


Q = "inference_extension_flow_control_queue_size"


@pytest.mark.parametrize("text, expected", [
    (f'# HELP {Q} Waiting.\n# TYPE {Q} gauge\n{Q}{{target_model_name="m",model_name="m"}} 3\n', {"m": 3.0}),
    ('llm_d_epp_flow_control_queue_size{target_model_name="m"} 1\n', {"m": 1.0}),
    (f'{Q}{{target_model_name="m"}} 0\n', {"m": 0.0}),
    (f'{Q}{{target_model_name="a"}} 2\n{Q}{{target_model_name="a",pool="x"}} 1\n{Q}{{target_model_name="b"}} 5\n',
     {"a": 3.0, "b": 5.0}),
    (f'{Q}{{model_name="m"}} 5\n', {}),  # EPP < 1.3: no target_model_name, never matches
    ('some_other_metric{target_model_name="m"} 5\n# TYPE x gauge\nx 1\n', {}),
    (f'{Q}_total{{target_model_name="m"}} 5\n', {}),  # a longer name with the same prefix
    ("", {}),
])
def test_queued(text, expected):
    assert queued(text, NAMES) == expected


def test_a_malformed_queue_line_raises_value_error():
    with pytest.raises(ValueError):
        queued(f'{Q}{{target_model_name="m"}} three\n', NAMES)


def test_ready_endpoints_from_slices():
    def es(service, *endpoints, family="IPv4", ns="models"):
        return {"metadata": {"namespace": ns, "labels": {"kubernetes.io/service-name": service}},
                "addressType": family, "endpoints": list(endpoints)}
    slices = [
        es("epp", {"addresses": ["10.0.0.2"], "conditions": {"ready": True}},
           {"addresses": ["10.0.0.3"], "conditions": {"ready": False}}, {"addresses": ["10.0.0.4"]}),
        es("epp", {"addresses": ["10.0.0.5"]}),  # a second slice of the same Service
        es("epp", {"addresses": ["fd00::7"]}, family="IPv6"),
        es("epp", {"addresses": ["epp.example"]}, family="FQDN"),
        {"metadata": {"namespace": "models"}, "addressType": "IPv4", "endpoints": [{"addresses": ["10.9.9.9"]}]},
    ]
    assert ready_endpoints(slices) == {("models", "epp"): ["10.0.0.2", "10.0.0.4", "10.0.0.5", "fd00::7"]}
    assert host_port("fd00::7", 9090) == "[fd00::7]:9090" and host_port("10.0.0.2", 9090) == "10.0.0.2:9090"


def test_status_patch_keeps_transition_times_that_did_not_change():
    before = {"metadata": {"generation": 3}, "status": {"conditions": [
        {"type": "TargetResolved", "status": "True", "lastTransitionTime": "t0", "reason": "Found"},
        {"type": "MetricsAvailable", "status": "True", "lastTransitionTime": "t1", "reason": "Other"},
        {"type": "OptimizationReady", "status": "False", "lastTransitionTime": "t1", "reason": "Waiting"},
    ]}}
    patch = status_patch(before, "L4", "t2")["status"]
    conditions = {c["type"]: c for c in patch["conditions"]}
    assert conditions["TargetResolved"] == before["status"]["conditions"][0]  # sent as it was: lists are replaced
    assert conditions["MetricsAvailable"]["lastTransitionTime"] == "t1"  # True -> True
    assert conditions["MetricsAvailable"]["reason"] == "ScaleFromZero"
    assert conditions["OptimizationReady"]["lastTransitionTime"] == "t2"  # False -> True
    assert conditions["OptimizationReady"]["reason"] == "ScaleFromZeroMode"
    assert conditions["OptimizationReady"]["observedGeneration"] == 3
    assert patch["desiredOptimizedAlloc"] == {"numReplicas": 1, "accelerator": "L4", "lastRunTime": "t2"}
    assert patch["actuation"] == {"applied": True}
    assert "desiredOptimizedAlloc" not in status_patch(before, "", "t2")["status"]
    assert before["status"]["conditions"][1]["reason"] == "Other"  # the cached object is not touched


def test_scaled_event_points_at_the_variant():
    obj = va(labels={}, status={})
    obj["metadata"].update(uid="u-1", resourceVersion="42")
    event = scaled_event(obj, variant(obj), "t", "poller-1")
    assert event["involvedObject"] == {"apiVersion": "llmd.ai/v1alpha1", "kind": "VariantAutoscaling",
                                       "name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
                                       "uid": "u-1", "resourceVersion": "42"}
    assert event["metadata"]["generateName"].startswith(obj["metadata"]["name"])
    assert event["reason"] == "ScaledFromZero" and event["type"] == "Normal"
