"""The poller's timing on a Clock: a hung EPP or a failing API call never delays a healthy variant."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock

from k8s_fake import DEPLOYMENTS, model_objects
from llamad.config import ScaleFromZeroConfig
from llamad.k8s.client import ApiStatusError
from llamad.k8s.poller import KINDS, ScaleFromZero, collection
from llamad.metrics import Metrics

INTERVAL = 0.1


class MemoryKube:
    """Lists from memory, watches that stay open, and every other call recorded and answered at once."""

    def __init__(self, objs: list[tuple[str, dict[str, Any]]]) -> None:
        self.items: dict[str, list[dict[str, Any]]] = {}
        for coll, obj in objs:
            self.items.setdefault(coll, []).append(obj)
        self.calls: list[tuple[str, str]] = []
        self.forbidden: set[str] = set()  # methods answered 403

    def request(self, method: str, path: str, params: Any = None, body: Any = None,
                content_type: str = "") -> defer.Deferred[dict[str, Any]]:
        self.calls.append((method, path))
        if method in self.forbidden:
            return defer.fail(ApiStatusError(403, "forbidden"))
        if method == "GET" and path.endswith("/scale"):
            return defer.succeed({"metadata": {"resourceVersion": "7"}, "spec": {"replicas": 0}})
        if method == "GET":
            coll = next(c for c in self.items if path.endswith("/" + c.rsplit("/", 1)[1])) \
                if any(path.endswith("/" + c.rsplit("/", 1)[1]) for c in self.items) else ""
            return defer.succeed({"metadata": {"resourceVersion": "1"}, "items": self.items.get(coll, [])})
        return defer.succeed({})

    def watch(self, path: str, rv: str, on_event: Any) -> defer.Deferred[None]:
        return defer.Deferred()  # open until cancelled


class Response:
    def __init__(self, code: int, body: bytes) -> None:
        self.code = code
        self.body = body

    def content(self) -> defer.Deferred[bytes]:
        return defer.succeed(self.body)


class MemoryEPPs:
    """``hung`` endpoints never answer; the others serve a queue of 1 for every model in ``queues``."""

    def __init__(self, queues: dict[str, list[str]], hung: set[str]) -> None:
        self.queues = queues
        self.hung = hung
        self.gets: list[str] = []

    def get(self, url: str, headers: Any = None) -> defer.Deferred[Response]:
        endpoint = url.split("/")[2]
        self.gets.append(endpoint)
        if endpoint in self.hung:
            return defer.Deferred()
        lines = [f'inference_extension_flow_control_queue_size{{target_model_name="{m}"}} 1'
                 for m in self.queues.get(endpoint, [])]
        return defer.succeed(Response(200, ("\n".join(lines) + "\n").encode()))


def poller(objs: list[tuple[str, dict[str, Any]]], epps: MemoryEPPs) -> tuple[ScaleFromZero, Clock, MemoryKube]:
    clock, kube = Clock(), MemoryKube(objs)
    service = ScaleFromZero(clock, kube, ScaleFromZeroConfig(enabled=True, interval=INTERVAL, scrape_timeout=5),
                            Metrics(), epp=epps, wall=lambda: 0.0, instance="test")
    service.startService()
    return service, clock, kube


def puts(kube: MemoryKube) -> list[str]:
    return [p.split("/")[-2] for m, p in kube.calls if m == "PUT"]


def test_collections_cover_every_kind():
    assert [collection(k, "ns", "inference.networking.x-k8s.io") for k in KINDS] == [
        "/apis/llmd.ai/v1alpha1/namespaces/ns/variantautoscalings", "/apis/apps/v1/namespaces/ns/deployments",
        "/apis/inference.networking.x-k8s.io/v1alpha2/namespaces/ns/inferencepools",
        "/api/v1/namespaces/ns/services", "/apis/discovery.k8s.io/v1/namespaces/ns/endpointslices"]


def test_a_hung_epp_does_not_delay_a_healthy_variant_past_one_interval():
    objs = (model_objects("stuck", epp_ips=("10.0.0.1",)) + model_objects("healthy", epp_ips=("10.0.0.2",))
            + model_objects("no-pool", epp_ips=("10.0.0.2",), pool=False))
    epps = MemoryEPPs({"10.0.0.2:9090": ["healthy", "no-pool"], "10.0.0.1:9090": ["stuck"]}, hung={"10.0.0.1:9090"})
    service, clock, kube = poller(objs, epps)
    clock.advance(0)  # the first pass: both scrapes start, the healthy one answers at once
    assert puts(kube) == ["healthy"]
    for _ in range(10):  # a second of passes: the hung endpoint is not scraped again while in flight
        clock.advance(INTERVAL)
    assert epps.gets.count("10.0.0.1:9090") == 1 and epps.gets.count("10.0.0.2:9090") >= 10
    clock.advance(5)  # scrape_timeout: the hung scrape is given up and counted
    clock.advance(INTERVAL)  # and the next pass tries again
    assert service.metrics.registry.get_sample_value("llamad_scale_from_zero_errors_total", {"stage": "scrape"}) == 1
    assert epps.gets.count("10.0.0.1:9090") == 2
    assert puts(kube) == ["healthy"]
    service.stopService()


def test_no_second_put_while_the_watch_has_not_shown_the_scale():
    epps = MemoryEPPs({"127.0.0.2:9090": ["m"]}, hung=set())
    service, clock, kube = poller(model_objects("m"), epps)
    for _ in range(20):  # the Deployment in the cache still says 0: the GET of the scale would say 1
        clock.advance(INTERVAL)
    assert puts(kube) == ["m"]
    assert [m for m, p in kube.calls if p.endswith("/status")] == ["PATCH"]
    assert [m for m, p in kube.calls if p.endswith("/events")] == ["POST"]
    service.stopService()


def test_passes_wait_for_every_cache_and_then_run_each_interval():
    service, clock, _ = poller(model_objects("m", replicas=1), MemoryEPPs({}, set()))
    clock.advance(0)
    for _ in range(9):
        clock.advance(INTERVAL)
    assert service.metrics.registry.get_sample_value("llamad_scale_from_zero_passes_total") == 10
    assert service.snapshot()["synced"] is True and service.snapshot()["inactive"] == 0
    service.stopService()
    clock.advance(INTERVAL)
    assert service.metrics.registry.get_sample_value("llamad_scale_from_zero_passes_total") == 10
    assert not clock.getDelayedCalls()


def test_a_deployment_deleted_meanwhile_is_a_resolve_skip():
    objs = [o for o in model_objects("gone") if o[0] != DEPLOYMENTS]
    service, clock, kube = poller(objs, MemoryEPPs({"127.0.0.2:9090": ["gone"]}, set()))
    clock.advance(INTERVAL)
    assert puts(kube) == []
    assert service.metrics.registry.get_sample_value("llamad_scale_from_zero_errors_total", {"stage": "resolve"}) == 1
    service.stopService()


def test_a_forbidden_status_patch_backs_off_and_never_blocks_a_later_scale():
    objs = model_objects("m")
    clock, kube = Clock(), MemoryKube(objs)
    kube.forbidden.add("PATCH")
    epps = MemoryEPPs({"127.0.0.2:9090": ["m"]}, hung=set())
    service = ScaleFromZero(clock, kube, ScaleFromZeroConfig(enabled=True, interval=INTERVAL), Metrics(), epp=epps,
                            wall=lambda: 0.0, instance="test")
    service.startService()
    for _ in range(600):  # a minute of passes
        clock.advance(INTERVAL)
    patches = [p for m, p in kube.calls if m == "PATCH"]
    assert 5 <= len(patches) <= 12  # retried with backoff (0.1 s doubling to 60 s), not 600 times
    assert puts(kube) == ["m"]
    # Scaled back to zero by someone else (a new resourceVersion): the variant wakes again despite the owed status.
    deployment = dict(service.objects_one("deployments", ("models", "m")) or {})
    deployment["metadata"] = {**deployment["metadata"], "resourceVersion": "99"}
    service.caches["deployments"][0]._event("MODIFIED", deployment)
    clock.advance(INTERVAL)
    assert puts(kube) == ["m", "m"]
    service.stopService()
