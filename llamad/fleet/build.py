"""The fleet built from the config: one supervised child (or external server) per model, each with
its gate, activity and idle watch, placed by the fleet by its memory need."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

from twisted.internet import defer
from twisted.logger import Logger

from llamad import runfiles
from llamad.activity import Activity, IdleWatch
from llamad.config import AUTO, Config, ConfigError, ModelConfig
from llamad.fleet import gguf, machine, memory, placement
from llamad.fleet.fleet import Fleet, FleetBackend
from llamad.fleet.gate import Gate
from llamad.fleet.runtime import BackendReporter, IdleAction, ModelRuntime
from llamad.interfaces import Backend
from llamad.kv.cache import KVCache
from llamad.kv.http import child_http
from llamad.kv.slots import SlotClient
from llamad.kv.store import Store, thread_runner
from llamad.logs import ChildLog, model_log
from llamad.metrics import Metrics
from llamad.notify import Notifier
from llamad.status import Status
from llamad.supervisor import ExternalBackend, Probe, Supervisor

log = Logger(namespace="llamad")


def build_fleet(config: Config, status: Status, metrics: Metrics, notifier: Notifier, reactor: Any,
                writer: Any, probe_for: Callable[[str], Probe],
                everyone: Activity | None = None) -> tuple[Fleet, dict[str, ModelRuntime]]:
    """Every model of the config, each placed by the fleet by its memory need.

    A config with only ``[backend]`` is a fleet of one: no memory budget (the one model
    always has the room), and the one-model log layout (``llama/latest.txt``).  ``probe_for``:
    the readiness probe of a child that holds the given API key; ``everyone``: the process-wide
    activity, which a fleet of one takes as its model's (one count per request, not two).  A
    model that can never fit the budget is a :class:`ConfigError`.
    """
    one = config.single_model
    if one:
        budget, how, has_gpu = None, "one model", False
    else:
        gpus = machine.gpu_totals(5.0)  # asked once at boot: for the budget and for what a need counts
        budget, how = config.fleet.budget(lambda reserve: machine.auto_budget(reserve, gpus=gpus))
        has_gpu = bool(gpus)
        log.info("fleet: memory budget {budget} ({how}), max_loaded {n}", budget=placement.format_bytes(budget),
                 how=how, n=config.fleet.max_loaded or "no limit")
    fleet = Fleet(reactor, budget, 0 if one else config.fleet.max_loaded, config.fleet.min_resident,
                  on_swap=lambda gone, made_room_for: metrics.model_swaps.labels(gone).inc(),
                  measure=memory_probe(reactor, has_gpu), swap_quantum=config.fleet.swap_quantum)
    models: dict[str, ModelRuntime] = {}
    run_dir = runfiles.runtime_dir(config.data_dir)
    kv_store = Store(os.path.join(config.data_dir, "state", "kv"), config.fleet.kv_cache_disk or None,
                     thread_runner(reactor))
    for model in config.models.values():
        need = 0 if one else model_need(model, has_gpu)
        if budget is not None and need > budget:
            raise ConfigError(f"models.{model.id}.memory", f"needs {placement.format_bytes(need)}, more than the "
                              f"whole budget {placement.format_bytes(budget)} ({how}): it can never be loaded")
        backend_config = dataclasses.replace(model.backend, start="lazy")  # the fleet decides when
        backend: Backend
        log_file = None
        if backend_config.kind == "external":
            backend = ExternalBackend(backend_config.url)
        else:
            key = runfiles.new_key()
            output = (ChildLog(writer, model_id=model.id) if one else
                      model_log(writer, config.logs.dir, model.id, config.logs.max_bytes, config.logs.keep))
            kv = None
            if backend_config.kv_cache and backend_config.kind == "llama-server":
                get, post = child_http(reactor, key)
                kv = KVCache(reactor, kv_store, model.id, backend_config, SlotClient(reactor, get, post),
                             config.fleet.kv_save_timeout, env={**os.environ, **backend_config.env})
                metrics.watch_kv_cache(model.id, kv.snapshot)
            supervisor = Supervisor(reactor, reactor, backend_config, config.supervisor,
                                    probe=probe_for(key), key=key, run_dir=run_dir, output=output,
                                    child_name="llama" if one else model.id, kv=kv)
            log_file = output.path
            supervisor.setName(f"model {model.id}")
            supervisor.setServiceParent(fleet)
            backend = supervisor
        counts = metrics.for_model(model.id)
        backend.add_listener(BackendReporter(backend, counts, notifier, status,
                                             "backend" if one else f"model {model.id}"))
        gate = Gate(reactor, status, FleetBackend(backend, fleet, model.id),
                    config.admission.max_concurrent or backend_config.parallel, config.admission.max_queue,
                    config.admission.queue_timeout, counts)
        activity = everyone if one and everyone is not None else Activity(reactor)
        idle = None
        if config.idle.action == "unload" and model.idle_timeout > 0:
            idle = IdleWatch(reactor, activity, model.idle_timeout, IdleAction("unload", backend, counts, reactor.stop))
            idle.setName(f"idle {model.id}")
            idle.setServiceParent(fleet)
        runtime = ModelRuntime(model.id, backend, gate, activity, idle, log_file)
        fleet.add(runtime, need, model.pinned, model.preload, backend_config.model or backend_config.url,
                  model.aliases, model.scanned, estimated=model.memory == AUTO)
        models[model.id] = runtime
        if not one:
            log.info("model {id}: {path}, needs {need}", id=model.id,
                     path=backend_config.model or backend_config.url, need=placement.format_bytes(need))
    return fleet, models


def memory_probe(reactor: Any, gpu: bool) -> Any:
    """What each child uses: GPU memory from ``nvidia-smi`` (off the reactor), else its RSS."""

    def measure(pids: list[int]) -> defer.Deferred[dict[int, int] | None]:
        if gpu:
            return machine.gpu_memory_by_pid(reactor)
        return defer.succeed({pid: machine.rss_bytes(pid) or 0 for pid in pids})

    return measure


def model_need(model: ModelConfig, gpu: bool) -> int:
    """Bytes ``model`` takes loaded: its ``memory``, else the estimate from its GGUF.

    A GGUF llamad cannot read is that model's problem only: its size stands in for the
    estimate, and its child will fail to start with llama.cpp's own words, while the other
    models serve on.
    """
    if model.memory != AUTO:
        return int(model.memory)
    if model.backend.kind == "external":
        return 0
    try:
        return memory.estimate(model.backend.model, model.backend.gpu_layers, model.backend.context,
                               model.backend.parallel, gpu=gpu).total
    except gguf.MemoryEstimateError as e:
        size = os.path.getsize(model.backend.model) if os.path.isfile(model.backend.model) else 0
        log.warn("model {id}: cannot estimate its memory ({e}); counting its file size, {size}", id=model.id,
                 e=e, size=placement.format_bytes(size))
        return size
