"""``twistd llamad``: command-line options, and the service tree wired from the config."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger, globalLogPublisher
from twisted.python import usage

from llamad import config as config_module
from llamad import runfiles
from llamad.activity import Activity, IdleWatch
from llamad.config import Config, ConfigError, ScaleFromZeroConfig
from llamad.fleet.build import build_fleet
from llamad.fleet.fleet import Fleet
from llamad.fleet.runtime import IdleAction, ModelRuntime
from llamad.gateway.app import Gateway, api_factory
from llamad.gateway.guard import Auth, Cors
from llamad.gateway.proxy import Proxy
from llamad.gateway.routing import ModelDirectory
from llamad.gateway.upstream import UpstreamPool, fetch
from llamad.health import health_site
from llamad.k8s import connect
from llamad.k8s.client import KubeClient
from llamad.k8s.poller import ScaleFromZero
from llamad.keys.access import AccessLog
from llamad.keys.tokenfile import FILE_NAME as TOKEN_FILE, TokenFile
from llamad.logs import Lines, access_log, boot_observer, escape, gpu_inventory, open_logs, twistd_observer
from llamad.metrics import Metrics
from llamad.notify import Notifier
from llamad.root import ListeningService, LlamadService, listen_all
from llamad.status import Status
from llamad.supervisor import Supervisor

log = Logger(namespace="llamad")


def fail(message: str) -> None:
    """Exit 2 with one line naming the problem, before twistd starts the service tree (no port kept, no child)."""
    sys.stderr.write(f"llamad: config error: {escape(message)}\n")  # one line, whatever the message quotes
    raise SystemExit(2)


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = "Serve a llama.cpp model: API on api.listen (8000), health checks on health.listen (8001)."
    optParameters = [
        ["config", "c", None, "TOML config file (default: /etc/llamad/llamad.toml if it exists)."],
        ["data-dir", "d", None, "Data directory: logs, models, keys (data_dir)."],
        ["model", "m", None, "GGUF model file (backend.model)."],
        ["listen", "l", None, "API endpoint, e.g. tcp:8000 (api.listen)."],
        ["health-listen", None, None, "Health endpoint, e.g. tcp:8001 (health.listen)."],
    ]
    _option_keys = {"data-dir": "data_dir", "model": "backend.model", "listen": "api.listen",
                    "health-listen": "health.listen"}

    def __init__(self) -> None:
        super().__init__()
        self.overrides: dict[str, str] = {}
        self.loaded: config_module.Loaded | None = None

    def opt_set(self, assignment: str) -> None:
        """Set any config key, e.g. --set backend.parallel=2 (repeatable)."""
        key, sep, value = assignment.partition("=")
        if not sep:
            # One config-error line and exit 2, as for every other bad setting.
            fail(str(ConfigError(key.strip() or "--set", f"--set needs KEY=VALUE, got {assignment!r}")))
        self.overrides[key.strip()] = value

    def postOptions(self) -> None:
        overrides = {key: self[name] for name, key in self._option_keys.items() if self[name] is not None}
        overrides.update(self.overrides)
        try:
            self.loaded = config_module.load(self["config"], os.environ, overrides)
        except ConfigError as e:
            fail(str(e))


def make_probe(reactor: Any, key: str) -> Any:
    """GET the readiness (or health) path on the child; fires with the status code."""

    def probe(port: int, path: bytes, timeout: float) -> defer.Deferred[int]:
        pool = UpstreamPool(reactor, reactor, "127.0.0.1", port, max_idle=0)
        return fetch(pool, path, key, timeout).addCallback(lambda result: result[0])

    return probe


def build(loaded: config_module.Loaded, reactor: Any) -> LlamadService:
    """The whole service tree for one config, on the given reactor."""
    config = loaded.config
    for key, endpoint in (("api.listen", config.api.listen), ("health.listen", config.health.listen)):
        try:
            serverFromString(reactor, endpoint)
        except Exception as e:
            fail(f"{key}: bad endpoint {endpoint!r}: {e}")
    metrics = Metrics(per_model=not config.single_model, per_key=config.auth.enabled)
    writer, boot_path = open_logs(config.logs.dir, config.logs.max_bytes, config.logs.keep,
                                  metrics.log_write_errors.inc, json=config.logs.format == "json")
    observer = boot_observer(writer)
    globalLogPublisher.addObserver(observer)

    notifier = Notifier(reactor)
    activity = Activity(reactor)  # every request: the drain, idle.action = "exit"
    status, fleet, models, directory = make_models(config, metrics, notifier, activity, reactor, writer)
    root = LlamadService(config, status, activity, reactor)
    root.backends, root.gates = fleet, [m.gate for m in models.values()]
    root.supervisors = [m.backend for m in models.values() if isinstance(m.backend, Supervisor)]
    if config.idle.action == "exit":
        IdleWatch(reactor, activity, config.idle.timeout,
                  IdleAction("exit", None, metrics, reactor.stop)).setServiceParent(root)
    notifier.setServiceParent(root)
    root.notifier = notifier
    status.activity = activity
    metrics.watch_activity(activity)
    proxy = Proxy(reactor, reactor, config.api.request_timeout, max_idle=config.max_concurrent)
    root.proxy = proxy
    root.boot_log = observer
    gateway, access = make_gateway(loaded, status, models, directory, proxy, metrics, activity, writer, reactor)
    auth = gateway.auth
    root.reloaders.append(auth.reload)
    if config.auth.enabled or auth.enable_on_keys:  # writes only once some key used tokens
        TokenFile(auth.policy, os.path.join(config.data_dir, TOKEN_FILE), reactor).setServiceParent(root)
    for supervisor in root.supervisors:
        root.reloaders.append(supervisor.retry)

    ListeningService(reactor, "health.listen", config.health.listen, loaded.sources["health.listen"],
                     health_site(status, config.health.ping)).setServiceParent(root)
    api = api_factory(gateway, config.api.max_body_bytes, config.api.header_timeout, config.api.body_timeout,
                      config.api.max_incomplete_per_client, max_headers=config.api.max_headers,
                      max_header_line=config.api.max_header_line, max_request_line=config.api.max_request_line)
    ListeningService(reactor, "api.listen", config.api.listen, loaded.sources["api.listen"], api).setServiceParent(root)
    if root.backends is not None:  # the supervised children, started after both sites listen
        root.backends.setServiceParent(root)
    if config.scale_from_zero.enabled:
        poller = make_poller(config.scale_from_zero, reactor, metrics)
        poller.setServiceParent(root)
        status.poller = poller

    def close() -> None:
        globalLogPublisher.removeObserver(observer)
        if access is not None:
            access.flush()
        writer.stop()

    root.closers.append(close)
    log_boot(loaded, boot_path)
    try:
        listen_all(root)  # last: the boot log has the config, and the error, when a port is taken
    except ConfigError as e:
        log.error("config error: {e}", e=e)
        if runfiles.running_daemon(config.data_dir) is None:  # no llamad serves this data dir: show this error
            writer.take_pointer()
        close()
        fail(str(e))
    writer.take_pointer()  # _boot/latest.txt names the daemon that serves, never one that failed beside it
    return root


def make_models(config: Config, metrics: Metrics, notifier: Notifier, activity: Activity, reactor: Any,
                writer: Any) -> tuple[Status, Fleet, dict[str, ModelRuntime], ModelDirectory]:
    """The fleet, its models by id and their names, and the status both sites report.

    With one model (a config with only ``[backend]``), ``/health`` shows its backend and any
    model name reaches it, as with llama-server alone.
    """
    one = config.single_model
    status = Status(reactor, None, config.backend.model_id or config.backend.url if one else "",
                    lazy=config.backend.start == "lazy" or not one,
                    backend_has_metrics=one and config.backend.kind == "llama-server")
    try:
        fleet, models = build_fleet(config, status, metrics, notifier, reactor, writer,
                                    lambda key: make_probe(reactor, key), activity)
    except ConfigError as e:
        writer.stop()
        fail(str(e))
    if one:
        status.backend = next((m.backend for m in models.values()), None)
    else:
        status.fleet = fleet
    directory = ModelDirectory(list(models), {m.id: m.aliases for m in config.models.values()},
                               config.default_model, lenient=one)
    return status, fleet, models, directory


def make_gateway(loaded: config_module.Loaded, status: Status, models: dict[str, ModelRuntime],
                 directory: ModelDirectory, proxy: Proxy, metrics: Metrics, activity: Activity, writer: Any,
                 reactor: Any) -> tuple[Gateway, AccessLog | None]:
    """Port 8000's gateway: the keys and their policy, CORS, the access log, the models."""
    config = loaded.config
    # auth.enabled set nowhere: a keys file that a reload finds with keys turns auth on, as one at boot does.
    auth = Auth(config.auth.enabled, config.auth.keys_file, config.auth.protect_metrics, reactor,
                default_rate=config.auth.default_rate, priorities=config.auth.priorities,
                priority_ageing=config.auth.priority_ageing,
                enable_on_keys=loaded.sources["auth.enabled"] == "default")
    access = (AccessLog(reactor, access_log(writer, config.logs.dir, config.logs.max_bytes, config.logs.keep),
                        json=config.logs.format == "json") if config.logs.access else None)
    gateway = Gateway(reactor, status, models, proxy, metrics, activity, auth, Cors(config.api.cors_origins),
                      directory, access, metrics_format=config.api.metrics_format)
    return gateway, access


def log_boot(loaded: config_module.Loaded, boot_path: str) -> None:
    """What the boot log says before the ports are bound: the config, the GPUs, the warnings, what is served."""
    config = loaded.config
    log.info("llamad boot log: {path}", path=boot_path)
    log.info("effective config (llamad check-config shows the same):\n{config}",
             config=Lines(config_module.render(loaded).rstrip()))
    log.info("GPUs: {gpus}", gpus=gpu_inventory())
    for warning in loaded.warnings:
        log.warn("config: {warning}", warning=warning)
    if loaded.sources["auth.enabled"] == config_module.AUTH_AUTO_SOURCE:
        log.info("auth enabled: {path} exists (auth.enabled is set nowhere); set auth.enabled = false or "
                 "AUTH_ENABLED=false to serve without keys", path=config.auth.keys_file)
    log.info("{served}; api {api}, health {health}", served=served_models(config), api=config.api.listen,
             health=config.health.listen)


def served_models(config: Config) -> str:
    """What the boot log says is served, and by which backend kind: the one model's file (or URL), or a
    fleet's model ids."""
    kinds = ", ".join(dict.fromkeys(model.backend.kind for model in config.models.values()))
    if not config.models:
        return f"no model via {config.backend.kind}"
    if config.single_model:
        return f"model {config.backend.model or config.backend.url} via {kinds}"
    ids = list(config.models)
    shown = ", ".join(ids[:12]) + (f", ... ({len(ids)} in all)" if len(ids) > 12 else "")
    return f"{len(ids)} model{'s' if len(ids) != 1 else ''}: {shown} via {kinds}"


def make_poller(sfz: ScaleFromZeroConfig, reactor: Any, metrics: Metrics) -> ScaleFromZero:
    """The Kubernetes poller, connected the way ``find`` decides; a bad connection setting exits 2."""
    try:
        cluster = connect.find(sfz.api_server, sfz.kubeconfig, os.environ)
        http = cluster.http(reactor)
    except connect.ConnectError as e:
        fail(f"scale_from_zero: {e}")
    scope = ", ".join(sfz.namespaces) or "all namespaces"
    log.info("scale-from-zero: API server {server} ({source}); watching {scope}", server=cluster.server,
             source=cluster.source, scope=scope)
    return ScaleFromZero(reactor, KubeClient(http, cluster.server, cluster.token), sfz, metrics)


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    # A shell starts background jobs with SIGINT ignored, and then Twisted would
    # leave it ignored; SIGINT must always mean "shut down" (as SIGTERM does).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    assert options.loaded is not None
    root = build(options.loaded, reactor)
    root.log_observer = twistd_observer(getattr(options, "parent", None),
                                        json=options.loaded.config.logs.format == "json")
    return root
