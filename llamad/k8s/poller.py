"""The scale-from-zero service: watch the cluster, scrape EPP queues, wake Deployments 0 -> 1.

Every ``interval`` (counted from the end of the previous pass's planning) one
pass plans from the caches, then starts a scrape of each EPP endpoint that
serves an inactive variant, unless that endpoint's previous scrape is still
running.  Each scrape's result starts the scale of its variants with requests
waiting.  Nothing waits on anything else: a slow EPP or a failing API call
touches only its own variants, and the next pass starts on time.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from llamad.config import ScaleFromZeroConfig
from llamad.k8s import decide
from llamad.k8s.cache import ListWatchCache
from llamad.k8s.client import ApiStatusError, KubeClient
from llamad.k8s.connect import FileToken, plain_http, static_token
from llamad.metrics import Metrics
from llamad.timers import cancel

log = Logger(namespace="llamad.k8s")

LOG_EVERY = 60.0  # seconds between log lines about one subject
KINDS = ("variantautoscalings", "deployments", "inferencepools", "services", "endpointslices")
POOL_VERSION = {decide.POOL_V1: "v1", decide.POOL_V1ALPHA2: "v1alpha2"}


def collection(kind: str, namespace: str, pool_group: str) -> str:
    """The API path of a kind, in one namespace or (``""``) all."""
    prefix = {
        "variantautoscalings": "/apis/llmd.ai/v1alpha1",
        "deployments": "/apis/apps/v1",
        "inferencepools": f"/apis/{pool_group}/{POOL_VERSION[pool_group]}",
        "services": "/api/v1",
        "endpointslices": "/apis/discovery.k8s.io/v1",
    }[kind]
    return f"{prefix}/namespaces/{namespace}/{kind}" if namespace else f"{prefix}/{kind}"


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class _PassRecord:
    started: float
    open: int = 0
    planned: bool = False


class ScaleFromZero(MultiService):
    def __init__(self, clock: IReactorTime, kube: KubeClient, config: ScaleFromZeroConfig, metrics: Metrics,
                 epp: HTTPClient | None = None, wall: Callable[[], float] = time.time,
                 instance: str = "") -> None:
        super().__init__()
        self.clock = clock
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self.wall = wall
        self.instance = instance or socket.gethostname()
        self.epp = epp if epp is not None else plain_http(clock)
        self.epp_token = FileToken(config.epp_token_file) if config.epp_token_file else static_token(None)
        self.caches: dict[str, list[ListWatchCache]] = {}
        for kind in KINDS:
            self.caches[kind] = []
            for namespace in config.namespaces or ("",):
                cache = ListWatchCache(clock, kube, collection(kind, namespace, config.pool_group),
                                       on_change=self._changed, on_trouble=self._watch_trouble(kind))
                cache.setServiceParent(self)
                self.caches[kind].append(cache)
        self.semaphore = defer.DeferredSemaphore(config.max_concurrency)
        self._plan: decide.Pass | None = None
        self._scraping: set[str] = set()  # endpoints with a scrape in flight
        self._scaling: set[tuple[str, str]] = set()  # variants with a scale in flight
        self._scaled: dict[tuple[str, str], str] = {}  # Deployment -> its resourceVersion when we scaled it
        # Scaled, status not yet persisted: (variant, next try, delay), retried with backoff up to LOG_EVERY.
        self._status_owed: dict[tuple[str, str], tuple[decide.Variant, float, float]] = {}
        self._first_seen: dict[tuple[str, str], float] = {}  # variant -> when a scrape first saw its queue > 0
        self._logged: dict[str, float] = {}
        self._timer: Any = None

    # --- lifecycle ---------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self._timer = self.clock.callLater(0, self._tick)

    def stopService(self) -> defer.Deferred[None] | None:
        self._timer = cancel(self._timer)
        return super().stopService()

    @property
    def synced(self) -> bool:
        """Every cache has listed once."""
        return all(c.synced for caches in self.caches.values() for c in caches)

    def snapshot(self) -> dict[str, Any]:
        """For ``/health``."""
        plan = self._plan
        return {"synced": self.synced, "variants": len(self.objects("variantautoscalings")),
                "inactive": len(plan.inactive) if plan else None, "skipped": len(plan.skipped) if plan else None,
                "scraping": len(self._scraping), "scaling": len(self._scaling),
                "status_owed": len(self._status_owed)}

    def _tick(self) -> None:
        self._timer = None
        try:
            self.run_pass()
        finally:
            if self.running:
                self._timer = self.clock.callLater(self.config.interval, self._tick)

    # --- one pass ----------------------------------------------------------------

    def objects(self, kind: str) -> dict[tuple[str, str], dict[str, Any]]:
        merged: dict[tuple[str, str], dict[str, Any]] = {}
        for cache in self.caches[kind]:
            merged.update(cache.objects)
        return merged

    def _changed(self) -> None:
        self._plan = None

    def current_plan(self) -> decide.Pass:
        """The plan from the caches, computed again only after a cache changed."""
        if self._plan is None:
            services = self.objects("services")
            self._plan = decide.plan(self.objects("variantautoscalings").values(), self.objects("deployments"),
                                     self.objects("inferencepools").values(), services,
                                     decide.ready_endpoints(self.objects("endpointslices").values()))
            for subject, why in self._plan.skipped:
                self._trouble("resolve", subject, why)
            for variant_key in list(self._first_seen):
                if variant_key not in self._plan.inactive:
                    del self._first_seen[variant_key]
        return self._plan

    def run_pass(self) -> None:
        if not self.synced:
            return
        self.metrics.sfz_passes.inc()
        record = _PassRecord(self.clock.seconds())
        work = self.current_plan()
        for variant_key, (v, next_try, _) in list(self._status_owed.items()):
            if variant_key not in self._scaling and record.started >= next_try:  # the scale itself is done
                self._scaling.add(variant_key)
                d = defer.ensureDeferred(self._persist(v))
                d.addBoth(lambda _, k=variant_key: self._scaling.discard(k))
                self._track(record, d)
        for endpoint, variants in work.scrape.items():
            if endpoint not in self._scraping:
                self._track(record, self._scrape(endpoint, variants))
        record.planned = True
        self._settle(record)

    def _track(self, record: _PassRecord, d: defer.Deferred[Any]) -> None:
        record.open += 1

        def done(_: Any) -> None:
            record.open -= 1
            self._settle(record)

        d.addBoth(done)

    def _settle(self, record: _PassRecord) -> None:
        if record.planned and record.open == 0:
            self.metrics.sfz_pass_duration.observe(self.clock.seconds() - record.started)

    # --- scrape ------------------------------------------------------------------

    def _scrape(self, endpoint: str, variants: list[decide.Variant]) -> defer.Deferred[None]:
        self._scraping.add(endpoint)
        d = defer.ensureDeferred(self._fetch(endpoint))
        d.addTimeout(self.config.scrape_timeout, self.clock)

        def got(text: str) -> None:
            try:
                queues = decide.queued(text, self.config.queue_metrics)
            except Exception as e:  # the parser raises ValueError, and others on some inputs
                self._trouble("parse", f"epp {endpoint}", f"EPP {endpoint}: malformed metrics: {e}")
                return
            now = self.clock.seconds()
            for v in variants:
                if queues.get(v.model_id, 0.0) > 0:
                    self._first_seen.setdefault((v.namespace, v.name), now)
                    self._start_scale(v)
                else:  # the queue drained (cancelled requests): a later wait is a new detection
                    self._first_seen.pop((v.namespace, v.name), None)

        def failed(reason: Any) -> None:
            err = reason.value
            why = "timed out" if isinstance(err, defer.TimeoutError) else str(err) or type(err).__name__
            served = ", ".join(sorted({f"{v.namespace}/{v.name}" for v in variants}))
            self._trouble("scrape", f"epp {endpoint}", f"EPP {endpoint} (for {served}): {why}")

        def finished(result: Any) -> None:
            self._scraping.discard(endpoint)
            if isinstance(result, Failure):
                log.failure("scale-from-zero: unexpected error handling EPP {endpoint}", result, endpoint=endpoint)

        d.addCallbacks(got, failed)
        d.addBoth(finished)
        return d

    async def _fetch(self, endpoint: str) -> str:
        headers = {"accept": "text/plain"}
        token = self.epp_token()
        if token:
            headers["authorization"] = f"Bearer {token}"
        response = await self.epp.get(f"http://{endpoint}/metrics", headers=headers)
        body = await response.content()
        if response.code != 200:
            hint = " (set scale_from_zero.epp_token_file)" if response.code in (401, 403) and not token else ""
            raise Failed(f"HTTP {response.code}{hint}")
        return str(body.decode("utf-8", "replace"))

    # --- scale -------------------------------------------------------------------

    def _start_scale(self, v: decide.Variant) -> None:
        variant_key = (v.namespace, v.name)
        deployment_key = (v.namespace, v.deployment)
        if variant_key in self._scaling:
            return
        scaled_at = self._scaled.get(deployment_key)
        current = self.objects_one("deployments", deployment_key)
        if scaled_at is not None:
            if current is not None and (decide.meta(current).get("resourceVersion") or "") == scaled_at:
                return  # our PUT is acknowledged; the watch has not brought the new Deployment yet
            del self._scaled[deployment_key]
        self._scaling.add(variant_key)
        d = self.semaphore.run(lambda: defer.ensureDeferred(self._scale(v, current)))
        d.addErrback(lambda f: self._trouble("scale", "/".join(variant_key), f"{v.namespace}/{v.name}: {f.value}"))
        d.addBoth(lambda _: self._scaling.discard(variant_key))

    def objects_one(self, kind: str, key: tuple[str, str]) -> dict[str, Any] | None:
        for cache in self.caches[kind]:
            found = cache.objects.get(key)
            if found is not None:
                return found
        return None

    async def _scale(self, v: decide.Variant, deployment: dict[str, Any] | None) -> None:
        variant_key = (v.namespace, v.name)
        path = f"/apis/apps/v1/namespaces/{v.namespace}/deployments/{v.deployment}/scale"
        scale = await self.kube.request("GET", path)
        if ((scale.get("spec") or {}).get("replicas") or 0) >= 1:
            self._first_seen.pop(variant_key, None)
            return  # someone else woke it
        body = {"apiVersion": "autoscaling/v1", "kind": "Scale",
                "metadata": {"name": v.deployment, "namespace": v.namespace,
                             "resourceVersion": decide.meta(scale).get("resourceVersion", "")},
                "spec": {"replicas": 1}}
        try:
            await self.kube.request("PUT", path, body=body)
        except ApiStatusError as e:
            if e.code == 409:
                raise Failed(f"scale of Deployment {v.deployment} conflicted (409); retrying next pass")
            raise
        now = self.clock.seconds()
        self._scaled[(v.namespace, v.deployment)] = (decide.meta(deployment or {}).get("resourceVersion") or "")
        self.metrics.sfz_scale_ups.labels(v.namespace, v.name).inc()
        first = self._first_seen.pop(variant_key, now)
        self.metrics.sfz_detection.observe(now - first)
        log.info("scaled Deployment {ns}/{dep} 0 -> 1 for variant {name} (model {model}; queue seen {ms:.0f} ms "
                 "before)", ns=v.namespace, dep=v.deployment, name=v.name, model=v.model_id, ms=(now - first) * 1000)
        self._status_owed[variant_key] = (v, now, self.config.interval)
        await self._persist(v)
        await self._event(v)

    async def _persist(self, v: decide.Variant) -> None:
        """Merge-patch the status; kept owed and tried again each pass until it lands or the VA is gone."""
        variant_key = (v.namespace, v.name)
        va = self.objects_one("variantautoscalings", variant_key)
        if va is None:
            self._status_owed.pop(variant_key, None)
            return
        try:
            accelerator = decide.variant(va).accelerator  # the label or status may have changed since the plan
        except decide.Skip:
            accelerator = v.accelerator
        if not accelerator:
            self._trouble("status", f"{v.namespace}/{v.name}/accelerator",
                          f"{v.namespace}/{v.name}: no label {decide.ACCELERATOR_LABEL} and no accelerator in the "
                          "status: desiredOptimizedAlloc is left out", count=False)
        patch = decide.status_patch(va, accelerator, rfc3339(self.wall()))
        path = f"/apis/llmd.ai/v1alpha1/namespaces/{v.namespace}/variantautoscalings/{v.name}/status"
        try:
            await self.kube.request("PATCH", path, body=patch, content_type="application/merge-patch+json")
        except Exception as e:
            self._trouble("status", f"{v.namespace}/{v.name}", f"{v.namespace}/{v.name}: status patch: {e}")
            _, _, delay = self._status_owed.get(variant_key, (v, 0.0, self.config.interval))
            self._status_owed[variant_key] = (v, self.clock.seconds() + delay, min(LOG_EVERY, delay * 2))
            return
        self._status_owed.pop(variant_key, None)

    async def _event(self, v: decide.Variant) -> None:
        va = self.objects_one("variantautoscalings", (v.namespace, v.name)) or {}
        body = decide.scaled_event(va, v, rfc3339(self.wall()), self.instance)
        try:
            await self.kube.request("POST", f"/api/v1/namespaces/{v.namespace}/events", body=body)
        except Exception as e:
            self._trouble("event", f"{v.namespace}/{v.name}", f"{v.namespace}/{v.name}: event not recorded: {e}")

    # --- errors ------------------------------------------------------------------

    def _trouble(self, stage: str, subject: str, message: str, count: bool = True) -> None:
        """Count by stage; log at most once per subject per minute."""
        if count:
            self.metrics.sfz_errors.labels(stage).inc()
        now = self.clock.seconds()
        last = self._logged.get(subject)
        if last is None or now - last >= LOG_EVERY:
            self._logged[subject] = now
            log.warn("scale-from-zero {stage}: {message}", stage=stage, message=message)

    def _watch_trouble(self, kind: str) -> Callable[[str, str], None]:
        def report(what: str, why: str) -> None:
            if what == "restart":
                self.metrics.sfz_watch_restarts.labels(kind).inc()
            else:
                self.metrics.sfz_errors.labels("watch").inc()
        return report


class Failed(Exception):
    """A scrape or scale that failed in a way its message fully explains."""
