"""The Kubernetes manifests in deploy/kubernetes: well-formed, consistent with each other and with llamad."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from llamad import config

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "deploy" / "kubernetes"
FILES = ("crd-variantautoscaling.yaml", "rbac.yaml", "poller.yaml", "example-model.yaml")
ALL_FILES = sorted(p.name for p in MANIFESTS.glob("*.yaml"))

Doc = dict[str, Any]


def load(name: str) -> list[Doc]:
    """Every non-empty document of one manifest file."""
    with open(MANIFESTS / name) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def one(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    """The single document of ``kind`` (and ``name``, if given)."""
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def test_the_known_files_are_there() -> None:
    assert set(FILES) <= set(ALL_FILES)


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_document_has_api_version_kind_and_name(name: str) -> None:
    docs = load(name)
    assert docs
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc
        assert (doc.get("metadata") or {}).get("name"), doc


@pytest.mark.parametrize("name", ALL_FILES)
def test_every_file_starts_with_a_comment_saying_how_to_apply_it(name: str) -> None:
    text = (MANIFESTS / name).read_text()
    header = text.split("\n\n")[0].split("apiVersion:")[0]
    assert text.startswith("# ")
    assert f"kubectl apply -f deploy/kubernetes/{name}" in header


def test_crd_names_status_and_printer_columns() -> None:
    crd = one(load("crd-variantautoscaling.yaml"), "CustomResourceDefinition")
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "variantautoscalings.llmd.ai"
    assert spec["group"] == "llmd.ai" and spec["scope"] == "Namespaced"
    assert spec["names"] == {"kind": "VariantAutoscaling", "listKind": "VariantAutoscalingList",
                             "plural": "variantautoscalings", "singular": "variantautoscaling", "shortNames": ["va"]}
    [version] = spec["versions"]
    assert (version["name"], version["served"], version["storage"]) == ("v1alpha1", True, True)
    assert version["subresources"] == {"status": {}}
    columns = [(c["name"], c["jsonPath"]) for c in version["additionalPrinterColumns"]]
    assert columns == [
        ("TARGET", ".spec.scaleTargetRef.name"),
        ("MODEL", ".spec.modelID"),
        ("OPTIMIZED", ".status.desiredOptimizedAlloc.numReplicas"),
        ("METRICSREADY", '.status.conditions[?(@.type=="MetricsAvailable")].status'),
        ("AGE", ".metadata.creationTimestamp"),
    ]
    types = {c["name"]: c["type"] for c in version["additionalPrinterColumns"]}
    assert types["OPTIMIZED"] == "integer" and types["AGE"] == "date"


def test_crd_schema() -> None:
    crd = one(load("crd-variantautoscaling.yaml"), "CustomResourceDefinition")
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    spec, status = schema["spec"], schema["status"]["properties"]
    assert spec["required"] == ["scaleTargetRef", "modelID"]
    assert spec["properties"]["scaleTargetRef"]["required"] == ["kind", "name"]
    assert spec["properties"]["modelID"]["minLength"] == 1
    cost = spec["properties"]["variantCost"]
    assert cost["pattern"] == r"^\d+(\.\d+)?$" and cost["default"] == "10.0"
    alloc = status["desiredOptimizedAlloc"]["properties"]
    assert alloc["numReplicas"] == {"type": "integer", "minimum": 0}
    assert alloc["accelerator"]["minLength"] == 2 and alloc["lastRunTime"]["format"] == "date-time"
    assert status["actuation"]["properties"]["applied"]["type"] == "boolean"
    conditions = status["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map" and conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert conditions["items"]["properties"]["status"]["enum"] == ["True", "False", "Unknown"]


def grants(role: Doc) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) for every combination a role's rules allow."""
    return {(group, resource, verb)
            for rule in role["rules"]
            for group in rule.get("apiGroups", [])
            for resource in rule.get("resources", [])
            for verb in rule["verbs"]}


def test_cluster_role_grants_exactly_what_the_poller_needs() -> None:
    role = one(load("rbac.yaml"), "ClusterRole", "llamad-scale-from-zero")
    read = ("get", "list", "watch")
    expected = {
        *{("llmd.ai", "variantautoscalings", v) for v in read},
        ("llmd.ai", "variantautoscalings/status", "patch"),
        *{("apps", "deployments", v) for v in read},
        ("apps", "deployments/scale", "get"),
        ("apps", "deployments/scale", "update"),
        *{(g, "inferencepools", v) for g in ("inference.networking.k8s.io", "inference.networking.x-k8s.io")
          for v in read},
        *{("discovery.k8s.io", "endpointslices", v) for v in read},
        *{("", r, v) for r in ("services", "pods") for v in read},
        ("", "events", "create"),
        ("", "events", "patch"),
    }
    assert grants(role) == expected
    assert all("nonResourceURLs" not in rule and "resourceNames" not in rule for rule in role["rules"])


def test_epp_metrics_role_grants_only_get_on_metrics() -> None:
    role = one(load("rbac.yaml"), "ClusterRole", "llamad-scale-from-zero-epp-metrics")
    assert role["rules"] == [{"nonResourceURLs": ["/metrics"], "verbs": ["get"]}]


def test_bindings_give_the_roles_to_the_service_account() -> None:
    docs = load("rbac.yaml")
    account = one(docs, "ServiceAccount")
    subject = {"kind": "ServiceAccount", "name": account["metadata"]["name"],
               "namespace": account["metadata"]["namespace"]}
    roles = {d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"}
    bindings = [d for d in docs if d["kind"] == "ClusterRoleBinding"]
    assert {b["roleRef"]["name"] for b in bindings} == roles
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "ClusterRole"
        assert binding["subjects"] == [subject]


def poller() -> Doc:
    return one(load("poller.yaml"), "Deployment")


def test_poller_probes_use_the_health_port() -> None:
    [container] = poller()["spec"]["template"]["spec"]["containers"]
    liveness, readiness = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert (liveness["port"], liveness["path"]) == (8001, "/ping")
    assert (readiness["port"], readiness["path"]) == (8001, "/readyz")


def test_poller_runs_as_the_rbac_service_account() -> None:
    account = one(load("rbac.yaml"), "ServiceAccount")
    deployment = poller()
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    assert deployment["metadata"]["namespace"] == account["metadata"]["namespace"]


def test_poller_container_matches_the_dockerfile_and_mounts() -> None:
    pod = poller()["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert "command" not in container  # keep the image's ENTRYPOINT: twistd -n --pidfile= llamad
    assert container["args"] == ["--config", "/etc/llamad/llamad.toml"]
    assert {"name": "DATA_DIR", "value": "/var/lib/llamad"} in container["env"]
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/var/lib/llamad"]]
    assert "configMap" in volumes[mounts["/etc/llamad"]]
    [source] = volumes[mounts["/var/run/secrets/epp"]]["projected"]["sources"]
    assert source["serviceAccountToken"]["path"] == "token"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_poller_config_enables_the_poller_without_a_model() -> None:
    docs = load("poller.yaml")
    config = tomllib.loads(one(docs, "ConfigMap")["data"]["llamad.toml"])
    assert config["scale_from_zero"]["enabled"] is True
    assert config["backend"]["kind"] == "none"
    assert config["scale_from_zero"]["epp_token_file"] == "/var/run/secrets/epp/token"


def test_poller_config_is_valid_llamad_config(tmp_path: Path) -> None:
    path = tmp_path / "llamad.toml"
    path.write_text(one(load("poller.yaml"), "ConfigMap")["data"]["llamad.toml"])
    loaded = config.load(str(path), environ={"DATA_DIR": "/var/lib/llamad"}, options={}, check_files=False)
    assert loaded.config.backend.kind == "none" and loaded.config.scale_from_zero.enabled


def test_poller_service_exposes_metrics() -> None:
    service = one(load("poller.yaml"), "Service")
    [port] = service["spec"]["ports"]
    assert (port["name"], port["port"]) == ("http-metrics", 8000)
    assert service["spec"]["selector"] == poller()["spec"]["selector"]["matchLabels"]


def test_example_model_objects_fit_together() -> None:
    docs = load("example-model.yaml")
    deployment = one(docs, "Deployment")
    pool = one(docs, "InferencePool")
    va = one(docs, "VariantAutoscaling")
    assert deployment["spec"]["replicas"] == 0
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert labels["llm-d.ai/inferenceServing"] == "true"
    match = pool["spec"]["selector"]["matchLabels"]
    assert match and match.items() <= labels.items()
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    epp = one(docs, "Service", pool["spec"]["endpointPickerRef"]["name"])
    ports = {p["port"] for p in epp["spec"]["ports"]}
    assert pool["spec"]["endpointPickerRef"]["port"]["number"] in ports
    assert any("metric" in p.get("name", "") for p in epp["spec"]["ports"])
    ref = va["spec"]["scaleTargetRef"]
    assert ref == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert va["spec"]["modelID"] == "Qwen/Qwen2.5-7B-Instruct"
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"}
    assert namespaces == {"models"}


def test_the_guide_names_every_manifest() -> None:
    guide = (ROOT / "docs" / "kubernetes.md").read_text()
    assert [name for name in ALL_FILES if name not in guide] == []
