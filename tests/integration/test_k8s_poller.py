"""The scale-from-zero poller against the fake API server and fake EPPs, all over real HTTP on loopback."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.server import Site

from k8s_fake import DEPLOYMENTS, EVENTS, QUEUE, VAS, FakeEPP, FakeKube, model_objects
from llamad.config import ScaleFromZeroConfig
from llamad.k8s.client import KubeClient
from llamad.k8s.poller import ScaleFromZero
from llamad.metrics import Metrics

pytestmark = pytest.mark.integration

INTERVAL = 0.05


async def until(predicate: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if predicate():
            return
        await deferLater(reactor, 0.01)
    raise AssertionError("condition not reached")


class Cluster:
    """A fake API server, two fake EPPs on 127.0.0.2 and 127.0.0.3 (same port), and a poller to start."""

    def __init__(self) -> None:
        self.kube = FakeKube()
        self.ports = [reactor.listenTCP(0, Site(self.kube), interface="127.0.0.1")]
        self.kube.url = f"http://127.0.0.1:{self.ports[0].getHost().port}"
        self.epps: dict[str, FakeEPP] = {}
        self.epp_port = 0
        self.poller: ScaleFromZero | None = None
        self.metrics = Metrics()

    def start_epp(self, ip: str, **kwargs: Any) -> FakeEPP:
        epp = FakeEPP(**kwargs)
        port = reactor.listenTCP(self.epp_port, Site(epp), interface=ip)
        self.epp_port = port.getHost().port
        self.ports.append(port)
        self.epps[ip] = epp
        return epp

    def add(self, name: str, **kwargs: Any) -> None:
        kwargs.setdefault("epp_port", self.epp_port)
        for collection, obj in model_objects(name, **kwargs):
            self.kube.put_object(collection, obj)

    def start(self, **config: Any) -> ScaleFromZero:
        cfg = dataclasses.replace(ScaleFromZeroConfig(enabled=True, interval=INTERVAL, scrape_timeout=2), **config)
        api = KubeClient(treq, self.kube.url, lambda: self.kube.token)
        self.poller = ScaleFromZero(reactor, api, cfg, self.metrics, instance="test")
        self.poller.startService()
        return self.poller

    async def passes(self, n: int) -> None:
        """Let ``n`` more passes run."""
        target = self.value("llamad_scale_from_zero_passes_total") + n
        await until(lambda: self.value("llamad_scale_from_zero_passes_total") >= target)

    def value(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def replicas(self, name: str, namespace: str = "models") -> int:
        return int(self.kube.objects[DEPLOYMENTS][(namespace, name)]["spec"]["replicas"])

    def puts(self, name: str = "", namespace: str = "models") -> list[str]:
        return self.kube.calls("PUT", f"/namespaces/{namespace}/deployments/{name}/scale" if name else "/scale")

    async def stop(self) -> None:
        if self.poller is not None:
            await self.poller.stopService()
        self.kube.cut_watches()
        for port in self.ports:
            await port.stopListening()


@pytest_twisted.async_yield_fixture
async def cluster():
    c = Cluster()
    c.start_epp("127.0.0.2")
    yield c
    await c.stop()


@pytest_twisted.ensureDeferred
async def test_a_queue_of_three_scales_once_and_persists_the_status(cluster):
    cluster.add("qwen", model="Qwen/Qwen2.5-7B")
    cluster.epps["127.0.0.2"].queues["Qwen/Qwen2.5-7B"] = 3
    cluster.start()
    await until(lambda: cluster.replicas("qwen") == 1)
    await until(lambda: cluster.kube.objects.get(EVENTS))
    await cluster.passes(5)
    assert len(cluster.puts("qwen")) == 1
    status = cluster.kube.objects[VAS][("models", "qwen")]["status"]
    assert status["desiredOptimizedAlloc"]["numReplicas"] == 1
    assert status["desiredOptimizedAlloc"]["accelerator"] == "L4"
    assert status["actuation"] == {"applied": True}
    conditions = {c["type"]: c for c in status["conditions"]}
    assert (conditions["MetricsAvailable"]["status"], conditions["MetricsAvailable"]["reason"]) == \
        ("True", "ScaleFromZero")
    assert (conditions["OptimizationReady"]["status"], conditions["OptimizationReady"]["reason"]) == \
        ("True", "ScaleFromZeroMode")
    [event] = cluster.kube.objects[EVENTS].values()
    assert event["involvedObject"]["kind"] == "VariantAutoscaling" and event["involvedObject"]["name"] == "qwen"
    assert event["reason"] == "ScaledFromZero"
    assert cluster.value("llamad_scale_from_zero_scale_ups_total", namespace="models", variant="qwen") == 1
    assert cluster.value("llamad_scale_from_zero_detection_seconds_count") == 1
    # Steady state: one list per watched resource, then watches only.
    assert len([p for m, p in cluster.kube.requests if m == "GET" and not p.endswith(("?watch", "/scale"))]) == 5


@pytest.mark.parametrize("case", ["zero", "other model", "model_name only"])
@pytest_twisted.ensureDeferred
async def test_no_scale_without_requests_for_this_model(cluster, case):
    cluster.add("qwen", model="qwen")
    epp = cluster.epps["127.0.0.2"]
    epp.queues = {"zero": {"qwen": 0}, "other model": {"llama": 4}, "model_name only": {"qwen": 4}}[case]
    epp.only_model_name = case == "model_name only"
    cluster.start()
    await until(lambda: epp.scrapes >= 5)
    assert cluster.puts() == [] and cluster.replicas("qwen") == 0
    assert cluster.value("llamad_scale_from_zero_errors_total", stage="scrape") == 0


@pytest_twisted.ensureDeferred
async def test_a_running_deployment_is_left_alone(cluster):
    cluster.add("qwen", replicas=1)
    cluster.epps["127.0.0.2"].queues["qwen"] = 3
    cluster.start()
    await cluster.passes(5)
    assert cluster.epps["127.0.0.2"].scrapes == 0 and cluster.kube.calls("GET", "/scale") == []


@pytest_twisted.ensureDeferred
async def test_two_epp_replicas_one_down_the_other_counts(cluster):
    cluster.start_epp("127.0.0.3").queues["qwen"] = 2
    cluster.add("qwen", epp_ips=("127.0.0.2", "127.0.0.3", "127.0.0.4"))  # .4: nothing listens
    cluster.ports.pop(1).stopListening()  # and .2 goes down too
    cluster.start()
    await until(lambda: cluster.replicas("qwen") == 1)
    assert len(cluster.puts("qwen")) == 1
    await until(lambda: cluster.value("llamad_scale_from_zero_errors_total", stage="scrape") >= 2)


@pytest_twisted.ensureDeferred
async def test_an_epp_token_file_that_appears_later_is_used(cluster, tmp_path):
    epp = cluster.start_epp("127.0.0.3", token="epp-token")
    epp.queues["qwen"] = 1
    cluster.add("qwen", epp_ips=("127.0.0.3",))
    token_file = tmp_path / "token"
    cluster.start(epp_token_file=str(token_file))
    await until(lambda: cluster.value("llamad_scale_from_zero_errors_total", stage="scrape") >= 3)
    assert cluster.puts() == [] and epp.refused >= 3
    token_file.write_text("wrong\n")
    await until(lambda: epp.refused >= 6)
    assert cluster.puts() == []
    token_file.write_text("epp-token\n")  # a projected token rotated in
    await until(lambda: cluster.replicas("qwen") == 1)


@pytest.mark.parametrize("group", ["inference.networking.k8s.io", "inference.networking.x-k8s.io"])
@pytest.mark.parametrize("metric", [QUEUE, "llm_d_epp_flow_control_queue_size"])
@pytest_twisted.ensureDeferred
async def test_both_pool_versions_and_both_metric_names(cluster, group, metric):
    cluster.epps["127.0.0.2"].metric = metric
    cluster.epps["127.0.0.2"].queues["qwen"] = 1
    cluster.add("qwen", group=group)
    cluster.add("other-group", group=({"inference.networking.k8s.io", "inference.networking.x-k8s.io"} - {group}).pop())
    cluster.epps["127.0.0.2"].queues["other-group"] = 1
    cluster.start(pool_group=group)
    await until(lambda: cluster.replicas("qwen") == 1)
    await cluster.passes(3)
    assert cluster.replicas("other-group") == 0  # its pool is in the group not watched


@pytest_twisted.ensureDeferred
async def test_a_409_is_retried_next_pass_without_a_duplicate(cluster):
    cluster.add("qwen")
    cluster.epps["127.0.0.2"].queues["qwen"] = 1
    cluster.kube.fail("PUT", "/deployments/qwen/scale", 409)
    cluster.start()
    await until(lambda: cluster.replicas("qwen") == 1)
    await cluster.passes(5)
    assert len(cluster.puts("qwen")) == 2  # the refused one, then the one that landed
    assert cluster.value("llamad_scale_from_zero_scale_ups_total", namespace="models", variant="qwen") == 1
    assert cluster.value("llamad_scale_from_zero_errors_total", stage="scale") == 1


@pytest.mark.parametrize("how", ["cut", "410"])
@pytest_twisted.ensureDeferred
async def test_the_caches_recover_from_a_cut_watch_or_410(cluster, how):
    cluster.start()
    await until(lambda: cluster.poller.synced and len(cluster.kube.watchers) == 5)
    cluster.kube.cut_watches()
    cluster.epps["127.0.0.2"].queues["late"] = 1
    cluster.add("late")  # made while the watches are down
    if how == "410":
        cluster.kube.compact()
    await until(lambda: cluster.replicas("late") == 1)
    assert cluster.value("llamad_scale_from_zero_watch_restarts_total", resource="deployments") >= 1


@pytest_twisted.ensureDeferred
async def test_broken_variants_do_not_hold_up_a_healthy_one(cluster):
    cluster.add("no-pool", pool=False)
    cluster.add("no-deployment")
    cluster.kube.delete_object(DEPLOYMENTS, "models", "no-deployment")
    cluster.add("dead-epp", epp_ips=("127.0.0.9",))
    cluster.add("healthy")
    cluster.epps["127.0.0.2"].queues.update({"no-pool": 1, "healthy": 1, "dead-epp": 1})
    cluster.start()
    await until(lambda: cluster.replicas("healthy") == 1)
    assert cluster.replicas("no-pool") == 0 and cluster.replicas("dead-epp") == 0
    assert cluster.value("llamad_scale_from_zero_errors_total", stage="resolve") >= 2


@pytest_twisted.ensureDeferred
async def test_api_refusals_touch_only_their_own_stage(cluster):
    cluster.add("qwen", accelerator="")
    cluster.epps["127.0.0.2"].queues["qwen"] = 1
    cluster.kube.fail("GET", "/deployments/qwen/scale", 503)
    cluster.kube.fail("PATCH", "/variantautoscalings/qwen/status", 500)
    cluster.kube.fail("POST", "/events", 403)
    cluster.start()
    await until(lambda: cluster.replicas("qwen") == 1)
    await until(lambda: "status" in cluster.kube.objects[VAS][("models", "qwen")])  # retried on a later pass
    status = cluster.kube.objects[VAS][("models", "qwen")]["status"]
    assert "desiredOptimizedAlloc" not in status  # no accelerator anywhere: left out, and logged
    assert status["actuation"] == {"applied": True}
    assert len(cluster.puts("qwen")) == 1
    for stage in ("scale", "status", "event"):
        assert cluster.value("llamad_scale_from_zero_errors_total", stage=stage) == 1, stage


@pytest_twisted.ensureDeferred
async def test_a_malformed_scrape_is_a_parse_error(cluster):
    cluster.add("qwen")
    cluster.epps["127.0.0.2"].body = f'{QUEUE}{{target_model_name="qwen"}} three\n'.encode()
    cluster.start()
    await until(lambda: cluster.value("llamad_scale_from_zero_errors_total", stage="parse") >= 2)
    assert cluster.puts() == []


@pytest_twisted.ensureDeferred
async def test_namespaces_scope_what_is_watched(cluster):
    cluster.add("in-scope", namespace="team-a")
    cluster.add("out-of-scope", namespace="team-b")
    cluster.epps["127.0.0.2"].queues.update({"in-scope": 1, "out-of-scope": 1})
    cluster.start(namespaces=("team-a",))
    await until(lambda: cluster.replicas("in-scope", "team-a") == 1)
    await cluster.passes(3)
    assert cluster.replicas("out-of-scope", "team-b") == 0
    assert all("/namespaces/team-a/" in path for _, path in cluster.kube.requests), cluster.kube.requests
