"""Every llamad metric, defined once against an injected registry."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from prometheus_client.exposition import generate_latest
from prometheus_client.utils import floatToGoString

from llamad.activity import Activity
from llamad.supervisor import State

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
POLL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
START_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)

# The *_created series double the exposition and no dashboard reads them.
disable_created_metrics()

# The ``model`` label of the request families for a request that reached no configured model (llamad's own
# routes, a refusal before routing, a model that does not exist): never a model id, which starts with a
# letter or digit, and one value whatever clients send, so the label cannot grow without bound.
NO_MODEL = "-"


class _Observations:
    """One series of a :class:`RequestHistogram`: counts per bucket (not cumulative) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Count:
    """One series of a :class:`RequestCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class _RequestFamily:
    """A family on the request path, exposed as prometheus_client exposes its own (same names, labels
    and samples) without its per-call lock and checks: every observation comes from the one reactor
    thread, and a few microseconds per request add up at thousands of requests a second."""

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.children: dict[tuple[str, ...], Any] = {}
        if not self.labelnames:
            self.children[()] = self._child()
        registry.register(self)

    def _child(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self.children.get(key)
        if child is None:
            child = self.children[key] = self._child()
        return child

    def describe(self) -> list[Metric]:
        return []


class RequestHistogram(_RequestFamily):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str] = (), *,
                 buckets: Sequence[float], registry: CollectorRegistry) -> None:
        self.bounds = (*(float(b) for b in buckets), float("inf"))
        self.le = [floatToGoString(b) for b in self.bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _child(self) -> _Observations:
        return _Observations(self.bounds)

    def observe(self, amount: float) -> None:
        self.children[()].observe(amount)

    def collect(self) -> list[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self.children.items()):
            cumulative, total = [], 0
            for le, count in zip(self.le, child.counts):
                total += count
                cumulative.append((le, total))
            family.add_metric(list(key), cumulative, child.sum)
        return [family]


class RequestCounter(_RequestFamily):
    def _child(self) -> _Count:
        return _Count()

    def inc(self, amount: float = 1) -> None:
        self.children[()].inc(amount)

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for key, child in list(self.children.items()):
            family.add_metric(list(key), child.value)
        return [family]


class Metrics:
    """The ``llamad_*`` families; one instance per process (or per test)."""

    def __init__(self, registry: CollectorRegistry | None = None, per_model: bool = False,
                 per_key: bool = False, models: Iterable[str] = ()) -> None:
        """``per_model``: several models are served; the families about one model get a ``model`` label.
        ``per_key``: API keys are checked; requests and tokens get a ``key_id`` label (one series per key
        at most; empty for the routes that take no key).  ``models``: the configured model ids, the only
        values of the request families' ``model`` label besides :data:`NO_MODEL` (more with
        :meth:`add_models`)."""
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._kv: KVCacheCollector | None = None  # registered with the first model that keeps its KV cache
        self.per_model = per_model
        self.per_key = per_key
        self.models: set[str] = set()
        self.add_models(models)
        r = self.registry
        m = ["model"] if per_model else []
        k = ["key_id"] if per_key else []
        self.requests = RequestCounter(
            "llamad_requests", "API requests answered, by route, method, status code" + (
                ", API key" if per_key else "") + " and model.",
            ["route", "method", "code", *k, "model"], registry=r,
        )
        self.request_duration = RequestHistogram(
            "llamad_request_duration_seconds", "Time from request arrival to its last byte, by route and model.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.time_to_first_byte = RequestHistogram(
            "llamad_time_to_first_byte_seconds",
            "Time from request arrival to the first body byte relayed, by route and model.",
            ["route", "model"], buckets=LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge("llamad_in_flight_requests", "Requests being proxied to the backend.", registry=r)
        self.backend_state = Gauge(
            "llamad_backend_state", "1 for the backend's current state, 0 for the others.", [*m, "state"], registry=r,
        )
        self.backend_restarts = Counter(
            "llamad_backend_restarts", "Unexpected backend exits that led to a restart or failure, by reason.",
            [*m, "reason"], registry=r,
        )
        self.backend_start_duration = Histogram(
            "llamad_backend_start_duration_seconds", "Time from spawning the backend to its readiness.",
            m, buckets=START_BUCKETS, registry=r,
        )
        self.queue_depth = Gauge("llamad_queue_depth", "Inference requests waiting for admission.", m, registry=r)
        self.queue_wait = RequestHistogram(
            "llamad_queue_wait_seconds", "Time an admitted inference request waited (queue and cold start).",
            m, buckets=LATENCY_BUCKETS, registry=r,
        )
        self.queue_rejections = Counter(
            "llamad_queue_rejections", "Inference requests refused by the gate, by reason.", [*m, "reason"],
            registry=r,
        )
        self.tokens = RequestCounter(
            "llamad_tokens", "Tokens reported in responses' usage, by kind (prompt, completion)" + (
                ", API key" if per_key else "") + " and model.", ["kind", *k, "model"],
            registry=r,
        )
        self.cold_starts = Counter(
            "llamad_cold_starts", "Backend starts triggered by a request (lazy start or after an idle unload).",
            m, registry=r,
        )
        self.cold_start_wait = Histogram(
            "llamad_cold_start_wait_seconds", "Time a request waited for the backend to start.",
            m, buckets=START_BUCKETS, registry=r,
        )
        self.idle_unloads = Counter("llamad_idle_unloads", "Backend stops after idle.timeout.", m, registry=r)
        self.model_swaps = Counter(
            "llamad_model_swaps", "Models unloaded to make room for another (thrash shows here), by model unloaded.",
            ["model"], registry=r,
        )
        self.idle_seconds = Gauge("llamad_idle_seconds", "Seconds since inference last ended (0 while busy).",
                                  registry=r)
        self.inference_in_flight = Gauge("llamad_inference_in_flight", "Inference requests in flight.", registry=r)
        self.last_activity = Gauge("llamad_last_activity_timestamp_seconds",
                                   "Unix time inference last began or ended.", registry=r)
        self.log_write_errors = Counter(
            "llamad_log_write_errors", "Log lines that could not be written to the volume (or were dropped).",
            registry=r,
        )
        self.sfz_passes = Counter("llamad_scale_from_zero_passes", "Scale-from-zero poller passes.", registry=r)
        self.sfz_pass_duration = Histogram(
            "llamad_scale_from_zero_pass_duration_seconds",
            "Time from a pass's start until every scrape and scale it started has settled.",
            buckets=POLL_BUCKETS, registry=r,
        )
        self.sfz_scale_ups = Counter(
            "llamad_scale_from_zero_scale_ups", "Deployments scaled from 0 to 1, by namespace and variant.",
            ["namespace", "variant"], registry=r,
        )
        self.sfz_errors = Counter(
            "llamad_scale_from_zero_errors",
            "Poller errors by stage (resolve, scrape, parse, scale, status, event, watch).", ["stage"], registry=r,
        )
        self.sfz_watch_restarts = Counter(
            "llamad_scale_from_zero_watch_restarts", "Watches resumed or re-listed, by resource.", ["resource"],
            registry=r,
        )
        self.sfz_detection = Histogram(
            "llamad_scale_from_zero_detection_seconds",
            "From the first scrape that saw a variant's queue > 0 to the acknowledged scale PUT.",
            buckets=POLL_BUCKETS, registry=r,
        )
        # Keyed by the model label, never by what a client sent: these stay as bounded as the series.
        self._request_children: dict[tuple[str, bytes, int, str, str], _Count] = {}
        self._route_children: dict[tuple[int, str, str], _Observations] = {}
        self._token_children: dict[tuple[str, str], tuple[_Count, _Count]] = {}
        if not per_model:
            self.set_backend_state(State.STOPPED)

    def add_models(self, model_ids: Iterable[str]) -> None:
        """Make ``model_ids`` values of the ``model`` label (the models a gateway routes to)."""
        self.models.update(model_ids)

    def model_label(self, model_id: str | None) -> str:
        """The ``model`` label for a request routed to ``model_id``: the id of a configured model, else
        :data:`NO_MODEL` (a request that reached none, or named one that does not exist)."""
        return model_id if model_id is not None and model_id in self.models else NO_MODEL

    def count_request(self, route: str, method: bytes, code: int, key_id: str = "",
                      model: str | None = None) -> None:
        """``llamad_requests_total`` on the hot path: labelled children are cached.  ``model``: the model
        the request was routed to (None: none)."""
        label = self.model_label(model)
        key = (route, method, code, key_id, label)
        child = self._request_children.get(key)
        if child is None:
            labels = (route, method.decode("latin-1"), str(code), *((key_id,) if self.per_key else ()), label)
            child = self._request_children[key] = self.requests.labels(*labels)
        child.inc()

    def count_tokens(self, prompt: int, completion: int, key_id: str = "", model: str | None = None) -> None:
        """``llamad_tokens_total`` on the hot path: the children are kept.  ``model``: the model that
        answered."""
        label = self.model_label(model)
        children = self._token_children.get((key_id, label))
        if children is None:
            extra = (*((key_id,) if self.per_key else ()), label)
            children = self._token_children[(key_id, label)] = (self.tokens.labels("prompt", *extra),
                                                                self.tokens.labels("completion", *extra))
        children[0].inc(prompt)
        children[1].inc(completion)

    def by_route(self, family: RequestHistogram, route: str, model: str | None = None) -> _Observations:
        """A route's and model's child of a per-route histogram, cached.  ``model``: the model the request
        was routed to (None: none)."""
        label = self.model_label(model)
        key = (id(family), route, label)
        child = self._route_children.get(key)
        if child is None:
            child = self._route_children[key] = family.labels(route, label)
        return child

    def watch_kv_cache(self, model_id: str, snapshot: Any) -> None:
        """Read one model's KV cache counters (``KVCache.snapshot``) at scrape time."""
        if self._kv is None:
            self._kv = KVCacheCollector()
            self.registry.register(self._kv)
        self._kv.caches[model_id] = snapshot

    def watch_activity(self, activity: Activity) -> None:
        """Read the activity gauges at scrape time."""
        self.idle_seconds.set_function(activity.idle_seconds)
        self.inference_in_flight.set_function(lambda: activity.inference_in_flight)
        self.last_activity.set_function(lambda: activity.last_activity)

    def set_backend_state(self, current: State) -> None:
        for state in State:
            self.backend_state.labels(state.value).set(1 if state == current else 0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def gateway_view(self, uptime: float, authenticated: int, unauthorized: int,
                     bytes_sent: int) -> dict[str, int | float]:
        """llama-gguf-inference's JSON ``/metrics`` fields, read from these families at scrape time.

        What no family holds comes from the caller: the key checks' counts and
        the response bytes.  Success is a status below 400, error 400 and up.
        """
        total = success = 0
        for sample in _samples(self.requests, "llamad_requests_total"):
            total += int(sample.value)
            success += int(sample.value) if int(sample.labels["code"]) < 400 else 0
        return {
            "requests_total": total,
            "requests_success": success,
            "requests_error": total - success,
            "requests_active": int(_value(self.in_flight, "llamad_in_flight_requests")),
            "requests_authenticated": authenticated,
            "requests_unauthorized": unauthorized,
            "bytes_sent": bytes_sent,
            "queue_depth": int(_value(self.queue_depth, "llamad_queue_depth")),
            "queue_rejections": int(_value(self.queue_rejections, "llamad_queue_rejections_total")),
            "queue_wait_seconds_total": round(_value(self.queue_wait, "llamad_queue_wait_seconds_sum"), 3),
            "uptime_seconds": int(uptime),
        }


    def for_model(self, model_id: str) -> Metrics | ModelMetrics:
        """What one model's gate, reporter and idle action count into: its labelled series in a
        fleet, the plain families (today's names, no label) when llamad serves one model."""
        return ModelMetrics(self, model_id) if self.per_model else self


class _WithModel:
    """A family with labels after ``model``: ``labels(reason)`` means ``labels(model, reason)``."""

    def __init__(self, family: MetricWrapperBase, model_id: str) -> None:
        self.family = family
        self.model_id = model_id

    def labels(self, *values: str) -> Any:
        return self.family.labels(self.model_id, *values)


class ModelMetrics:
    """One model's series of the per-model families, under the attribute names :class:`Metrics` has."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self.model_id = model_id
        self.backend_state = _WithModel(metrics.backend_state, model_id)
        self.backend_restarts = _WithModel(metrics.backend_restarts, model_id)
        self.queue_rejections = _WithModel(metrics.queue_rejections, model_id)
        self.backend_start_duration = metrics.backend_start_duration.labels(model_id)
        self.queue_depth = metrics.queue_depth.labels(model_id)
        self.queue_wait = metrics.queue_wait.labels(model_id)
        self.cold_starts = metrics.cold_starts.labels(model_id)
        self.cold_start_wait = metrics.cold_start_wait.labels(model_id)
        self.idle_unloads = metrics.idle_unloads.labels(model_id)
        self.set_backend_state(State.STOPPED)

    def set_backend_state(self, current: State) -> None:
        for state in State:
            self.backend_state.labels(state.value).set(1 if state == current else 0)


def _samples(family: MetricWrapperBase, name: str) -> Iterator[Sample]:
    for metric in family.collect():
        yield from (sample for sample in metric.samples if sample.name == name)


def _value(family: MetricWrapperBase, name: str) -> float:
    """The sum of a family's samples called ``name``, over all its labels."""
    return sum(sample.value for sample in _samples(family, name))


def label_child_metrics(texts: Mapping[str, bytes]) -> bytes:
    """Several children's ``llamacpp:*`` expositions as one, each sample labelled with its ``model``.

    Concatenated as they are, the families would repeat (a parse error for
    Prometheus); merged here, each family appears once with one series per model.
    """
    families: dict[str, Metric] = {}
    for model, text in texts.items():
        try:
            parsed = list(text_string_to_metric_families(text.decode("utf-8", "replace")))
        except ValueError:
            continue  # one child's odd exposition never spoils the scrape
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type)
            for sample in family.samples:
                merged.samples.append(sample._replace(labels={**sample.labels, "model": model}))

    class _Families:
        def collect(self) -> Iterator[Metric]:
            return iter(families.values())

    return generate_latest(_Families()) if families else b""  # type: ignore[arg-type]


class KVCacheCollector:
    """The ``llamad_kv_*`` families, read from each model's KV cache counters at scrape time."""

    def __init__(self) -> None:
        self.caches: dict[str, Any] = {}  # model id -> its snapshot function

    def describe(self) -> list[Metric]:
        return []  # nothing to check at registration: the families exist once a model keeps its cache

    def collect(self) -> Iterator[Metric]:
        saves = CounterMetricFamily("llamad_kv_saves", "Stops whose slots were saved, by model", labels=["model"])
        slots = CounterMetricFamily("llamad_kv_saved_slots", "Slots saved, by model", labels=["model"])
        skipped = CounterMetricFamily("llamad_kv_saves_skipped", "Saves skipped (disk full or not writable) or "
                                      "cut short by kv_save_timeout, by model and why", labels=["model", "why"])
        restores = CounterMetricFamily("llamad_kv_restores", "Saved slots met at a start, by model and result "
                                       "(ok, mismatch, corrupt, refused)", labels=["model", "result"])
        tokens = CounterMetricFamily("llamad_kv_restored_tokens", "Prompt tokens restored into fresh children, "
                                     "by model", labels=["model"])
        seconds = CounterMetricFamily("llamad_kv_seconds", "Seconds spent saving and restoring, by model and "
                                      "step", labels=["model", "step"])
        saved = GaugeMetricFamily("llamad_kv_saved_bytes", "Bytes of saved slots on the volume, by model",
                                  labels=["model"])
        disk = GaugeMetricFamily("llamad_kv_disk_bytes", "Bytes of saved slots on the volume, all models")
        total = None
        for model_id, snapshot in self.caches.items():
            facts = snapshot()
            saves.add_metric([model_id], facts["saves"])
            slots.add_metric([model_id], facts["saved_slots"])
            skipped.add_metric([model_id, "disk"], facts["saves_skipped"])
            skipped.add_metric([model_id, "timeout"], facts["saves_abandoned"])
            for result, count in facts["restores"].items():
                restores.add_metric([model_id, result], count)
            tokens.add_metric([model_id], facts["restored_tokens"])
            seconds.add_metric([model_id, "save"], facts["save_seconds"])
            seconds.add_metric([model_id, "restore"], facts["restore_seconds"])
            saved.add_metric([model_id], facts["bytes"])
            total = facts["disk_bytes"]
        if total is not None:
            disk.add_metric([], total)
        yield from (saves, slots, skipped, restores, tokens, seconds, saved, disk)
