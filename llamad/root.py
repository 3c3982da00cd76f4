"""The root of llamad's service tree: sites bound before twistd starts, SIGHUP reloads, the ordered shutdown.

:class:`LlamadService` starts the sites, then the children.  It stops in the
order the behaviour contract gives: readiness 503 and new inference 503, the
requests in flight drained for ``api.drain_timeout`` (a second SIGTERM or
SIGINT ends the drain at once), the rest cut, the children stopped, the logs
closed, and exit 0.
"""

from __future__ import annotations

import signal
from typing import Any

from twisted.application import service
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.logger import ILogObserver, Logger
from twisted.python.components import Componentized
from twisted.python.failure import Failure

from llamad import runfiles
from llamad.activity import Activity
from llamad.config import Config, ConfigError
from llamad.fleet.gate import Gate
from llamad.gateway.proxy import Proxy
from llamad.logs import BootObserver
from llamad.notify import Notifier
from llamad.status import Status
from llamad.supervisor import Supervisor

log = Logger(namespace="llamad")


class ListeningService(service.Service):
    """A site on a server endpoint, bound by :meth:`listen` while ``build`` makes the service tree.

    Not in ``privilegedStartService`` (strports' way): by then twistd has
    started logging and written its PID file, and a SystemExit there skips
    its clean-up, so a busy port would be tracebacks and a stale PID file.
    Bound in ``makeService``, it is one config-error line and exit 2, with
    no child started.
    """

    def __init__(self, reactor: Any, key: str, endpoint: str, source: str, factory: IProtocolFactory) -> None:
        self.reactor = reactor
        self.key = key
        self.endpoint = endpoint
        self.source = source
        self.factory = factory
        self.port: IListeningPort | None = None

    def listen(self) -> None:
        """Bind now; a failure is a :class:`ConfigError` naming the key and the endpoint."""
        outcome: list[Any] = []
        serverFromString(self.reactor, self.endpoint).listen(self.factory).addBoth(outcome.append)
        if not outcome:  # every endpoint kind the config allows binds at once
            raise ConfigError(self.key, f"cannot listen on {self.endpoint}: the endpoint did not bind at once",
                              self.source)
        if isinstance(outcome[0], Failure):
            err = outcome[0].value
            cause = err.socketError if isinstance(err, CannotListenError) else err
            reason = getattr(cause, "strerror", None) or str(cause)
            raise ConfigError(self.key, f"cannot listen on {self.endpoint}: {reason[:1].lower()}{reason[1:]}",
                              self.source)
        self.port = outcome[0]

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        if self.port is None:
            self.listen()

    def stopService(self) -> defer.Deferred[None]:
        super().stopService()
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)


def listen_all(root: service.MultiService) -> None:
    """Bind every site of the tree; on a failure, unbind those already bound and raise its ConfigError."""
    listeners = [s for s in root if isinstance(s, ListeningService)]
    try:
        for listener in listeners:
            listener.listen()
    except ConfigError:
        for listener in listeners:
            if listener.port is not None:
                listener.port.stopListening()
                listener.port = None
        raise


class LlamadService(service.MultiService):
    """Starts sites then backend.  Stops by refusing new inference (readiness 503), draining the
    requests in flight for ``api.drain_timeout`` (a second signal ends it at once), cutting the rest, then
    stopping the children."""

    def __init__(self, config: Config, status: Status, activity: Activity, clock: Any) -> None:
        super().__init__()
        self.config = config
        self.status = status
        self.activity = activity
        self.clock = clock
        self.closers: list[Any] = []
        self.reloaders: list[Any] = []
        self.proxy: Proxy | None = None
        self.gates: list[Gate] = []
        self.backends: service.IService | None = None  # the supervisor, or the fleet of them
        self.supervisors: list[Supervisor] = []
        self.notifier: Notifier | None = None
        self.log_observer: Any = None  # twistd's log, escaped (see llamad.logs): given to the application
        self.boot_log: BootObserver | None = None  # this boot's log file, told when twistd's logging began

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        if self.log_observer is not None and isinstance(parent, Componentized):
            parent.setComponent(ILogObserver, self.log_observer)  # twistd starts logging with it

    def startService(self) -> None:
        if self.boot_log is not None:  # twistd began logging (and replayed what came before) by now
            self.boot_log.logging_began()
        super().startService()
        # SIGHUP: re-read what can change under a running daemon (the API keys).
        signal.signal(signal.SIGHUP, self._sighup)
        # Only now that SIGHUP reloads: `llamad keys reload` finds this process by its data dir.
        try:
            runfiles.record_daemon(self.config.data_dir)
        except OSError as e:
            log.warn("cannot write llamad's PID file (`llamad keys reload` needs --pid or --url): {e}", e=e)
        if self.notifier is not None:  # both sites listen by now
            self.notifier.ready(f"serving; backend {self.status.snapshot()['state']}")

    def _sighup(self, signum: int, frame: Any) -> None:
        self.clock.callFromThread(self.reload)

    def _sighup_while_stopping(self, signum: int, frame: Any) -> None:
        self.clock.callFromThread(log.info, "SIGHUP ignored: llamad is shutting down")

    def reload(self) -> None:
        log.info("SIGHUP: reloading")
        for reload in self.reloaders:
            try:
                reload()
            except Exception:  # one failing reloader must not skip the others
                log.failure("SIGHUP: reload failed")

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        # From here SIGHUP reloads nothing: `llamad keys reload` no longer finds this process, and a SIGHUP sent
        # anyway (kill -HUP, systemctl reload) is logged, never fatal: the drain and the exit code stand.
        runfiles.forget_daemon(self.config.data_dir)
        signal.signal(signal.SIGHUP, self._sighup_while_stopping)
        if self.notifier is not None:
            self.notifier.stopping()
        log.info("shutting down: draining {n} in-flight request(s)", n=self.activity.in_flight)
        self.status.draining = True  # readiness 503 and new inference 503 from here on
        for gate in self.gates:
            gate.refuse_waiting()
        drained = self.activity.drained()
        drained.addTimeout(self.config.api.drain_timeout, self.clock)

        def now() -> None:
            # A second SIGTERM/SIGINT means "now": skip the rest of the drain, and
            # give the children seconds rather than stop_timeout.
            drained.cancel()
            for supervisor in self.supervisors:
                supervisor.hurry()

        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.clock.callFromThread(now))
        try:
            yield drained
        except (defer.TimeoutError, defer.CancelledError) as e:
            why = "drain_timeout reached" if isinstance(e, defer.TimeoutError) else "second signal"
            cut = self.proxy.cut_all("llamad is shutting down") if self.proxy is not None else 0
            log.warn("{why}: cut {n} request(s) still in flight", why=why, n=cut)
        if self.backends is not None:
            yield self.backends.stopService()
        yield super().stopService()
        for close in self.closers:
            close()
        log.info("llamad stopped")
        # twistd re-raises the signal that stopped the reactor, so a clean
        # SIGTERM shutdown would exit 143.  The contract is exit 0 after a
        # graceful stop (containers and systemd read it as success).
        if getattr(self.clock, "_exitSignal", None) is not None:
            self.clock._exitSignal = None
