"""Where the API server is and how to prove who we are, the way Kubernetes clients decide it.

Order: ``api_server`` (an explicit override, the only place plain ``http://``
is accepted), else the ``kubeconfig`` key, else in-cluster (the service
account), else ``$KUBECONFIG`` or ``~/.kube/config``.  Tokens are read from
their files again whenever the file changes, because projected tokens rotate.
TLS is always verified for https.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml
from treq.client import HTTPClient
from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IReactorTime
from twisted.web.client import Agent
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from llamad.http_pool import quiet_pool

SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"


class ConnectError(Exception):
    """The cluster connection cannot be set up; the message names the setting."""


class FileToken:
    """A bearer token read from a file, again whenever the file changes; None while it is missing."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._seen: tuple[int, int, int] | None = None
        self._token: str | None = None

    def __call__(self) -> str | None:
        try:
            st = os.stat(self.path)
        except OSError:
            self._seen, self._token = None, None
            return None
        seen = (st.st_ino, st.st_mtime_ns, st.st_size)
        if seen != self._seen:
            try:
                self._token = Path(self.path).read_text().strip() or None
            except OSError:
                return self._token
            self._seen = seen
        return self._token


def static_token(token: str | None) -> Callable[[], str | None]:
    return lambda: token


@implementer(IPolicyForHTTPS)
class TrustPolicy:
    """Verify the server against ``ca`` (else the system's roots), and present a client certificate if any."""

    def __init__(self, ca: ssl.Certificate | None, client: ssl.PrivateCertificate | None) -> None:
        self.ca = ca
        self.client = client

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        trust: Any = self.ca if self.ca is not None else ssl.platformTrust()
        return ssl.optionsForClientTLS(hostname.decode("ascii"), trustRoot=trust, clientCertificate=self.client)


@dataclass
class Cluster:
    """How to reach one API server."""

    server: str
    token: Callable[[], str | None]
    ca_pem: bytes | None = None
    client_cert_pem: bytes | None = None  # certificate and key, PEM, concatenated
    source: str = ""  # where it came from, for the boot log

    def http(self, reactor: IReactorTime) -> HTTPClient:
        """A treq client with persistent connections and this cluster's TLS trust."""
        try:
            ca = ssl.Certificate.loadPEM(self.ca_pem) if self.ca_pem else None
            client = ssl.PrivateCertificate.loadPEM(self.client_cert_pem) if self.client_cert_pem else None
        except Exception as e:  # OpenSSL's own error types, for a file that is not PEM
            raise ConnectError(f"{self.source}: the CA or client certificate is not valid PEM ({e!r:.120})") from None
        return HTTPClient(Agent(reactor, contextFactory=TrustPolicy(ca, client), pool=quiet_pool(reactor)))


def plain_http(reactor: IReactorTime) -> HTTPClient:
    """For EPP pods, scraped over plain HTTP with connections kept open between passes."""
    return HTTPClient(Agent(reactor, pool=quiet_pool(reactor)))


def find(api_server: str, kubeconfig: str, environ: Mapping[str, str],
         service_account: str = SERVICE_ACCOUNT) -> Cluster:
    """Decide the connection from config and environment; :class:`ConnectError` names what is wrong."""
    if api_server:
        if not api_server.startswith(("http://", "https://")):
            raise ConnectError(f"scale_from_zero.api_server must be an http:// or https:// URL, got {api_server!r}")
        server = api_server.rstrip("/")
        if kubeconfig:
            return from_kubeconfig(kubeconfig, server=server)
        if os.path.exists(os.path.join(service_account, "token")):
            return service_account_cluster(server, service_account)
        return Cluster(server, static_token(None), source="api_server, no credentials")
    if kubeconfig:
        return from_kubeconfig(kubeconfig)
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return in_cluster(environ, service_account)
    default = environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    if os.path.isfile(default):
        return from_kubeconfig(default)
    raise ConnectError("not running in a cluster (KUBERNETES_SERVICE_HOST is unset) and no kubeconfig found: "
                       "set scale_from_zero.kubeconfig or scale_from_zero.api_server")


def in_cluster(environ: Mapping[str, str], service_account: str = SERVICE_ACCOUNT) -> Cluster:
    host, port = environ["KUBERNETES_SERVICE_HOST"], environ.get("KUBERNETES_SERVICE_PORT", "443")
    if ":" in host:
        host = f"[{host}]"
    return service_account_cluster(f"https://{host}:{port}", service_account)


def service_account_cluster(server: str, service_account: str) -> Cluster:
    """The pod's service account: its token (re-read as it rotates) and the cluster CA."""
    token_path = os.path.join(service_account, "token")
    if not os.path.exists(token_path):
        raise ConnectError(f"in-cluster: no service-account token at {token_path} (automountServiceAccountToken?)")
    ca_path = os.path.join(service_account, "ca.crt")
    ca = _read(ca_path, "in-cluster CA") if server.startswith("https://") or os.path.exists(ca_path) else None
    return Cluster(server, FileToken(token_path), ca, source="service account")


def from_kubeconfig(path: str, server: str = "") -> Cluster:
    """The current context of a kubeconfig: server (unless ``server`` overrides it), CA, and credentials."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConnectError(f"kubeconfig {path}: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    context_name = doc.get("current-context", "")
    context = _named(doc, "contexts", context_name, path).get("context") or {}
    cluster = _named(doc, "clusters", context.get("cluster", ""), path).get("cluster") or {}
    user: Mapping[str, Any] = {}
    if context.get("user"):
        user = _named(doc, "users", context["user"], path).get("user") or {}
    if not server:
        server = str(cluster.get("server", "")).rstrip("/")
        if not server.startswith("https://"):
            raise ConnectError(f"kubeconfig {path}: cluster server must be https:// (plain http only via "
                               f"scale_from_zero.api_server), got {server!r}")
    if cluster.get("insecure-skip-tls-verify"):
        raise ConnectError(f"kubeconfig {path}: insecure-skip-tls-verify is not supported; TLS is always verified")
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise ConnectError(f"kubeconfig {path}: user credential plugin {unsupported!r} is not supported; "
                               "use a token, tokenFile or client certificate")
    ca = _data_or_file(cluster, "certificate-authority", base, path)
    cert = _data_or_file(user, "client-certificate", base, path)
    key = _data_or_file(user, "client-key", base, path)
    if bool(cert) != bool(key):
        raise ConnectError(f"kubeconfig {path}: client-certificate and client-key must be given together")
    token: Callable[[], str | None] = static_token(user.get("token") or None)
    if not user.get("token") and user.get("tokenFile"):
        token = FileToken(os.path.join(base, user["tokenFile"]))
    return Cluster(server, token, ca, (cert + b"\n" + key) if cert and key else None,
                   source=f"kubeconfig {path} context {context_name!r}")


def _named(doc: Mapping[str, Any], section: str, name: str, path: str) -> Mapping[str, Any]:
    for entry in doc.get(section) or []:
        if entry.get("name") == name:
            return entry
    raise ConnectError(f"kubeconfig {path}: no {section[:-1]} named {name!r}")


def _data_or_file(section: Mapping[str, Any], field: str, base: str, path: str) -> bytes | None:
    if section.get(f"{field}-data"):
        try:
            return base64.b64decode(section[f"{field}-data"])
        except ValueError:
            raise ConnectError(f"kubeconfig {path}: {field}-data is not base64") from None
    if section.get(field):
        return _read(os.path.join(base, section[field]), f"kubeconfig {path}: {field}")
    return None


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConnectError(f"{what}: {e}") from None
