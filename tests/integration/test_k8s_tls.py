"""https to the API server is always verified: the right CA passes, any other fails, a client cert is sent."""

from __future__ import annotations

import datetime
import ipaddress

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor, ssl
from twisted.web.server import Site

from k8s_fake import FakeKube
from llamad.k8s.client import KubeClient
from llamad.k8s.connect import Cluster, static_token

pytestmark = pytest.mark.integration


def issue(name: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None = None,
          ip: str | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True))
    if ip:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256()), key


def pem(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> bytes:
    out = cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        out += key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    return out


@pytest.fixture
def tls_kube():
    ca, ca_key = issue("test CA")
    server, server_key = issue("kube-apiserver", (ca.subject, ca_key), ip="127.0.0.1")
    client, client_key = issue("poller", (ca.subject, ca_key))
    seen: list[object] = []

    class Recording(FakeKube):
        def render(self, request):  # type: ignore[no-untyped-def]
            seen.append(request.transport.getPeerCertificate())
            return super().render(request)

    kube = Recording()
    options = ssl.PrivateCertificate.loadPEM(pem(server, server_key)).options(
        ssl.Certificate.loadPEM(pem(ca)))  # ask for (and verify) a client certificate
    port = reactor.listenSSL(0, Site(kube), options, interface="127.0.0.1")
    url = f"https://127.0.0.1:{port.getHost().port}"
    yield url, pem(ca), pem(client, client_key), seen
    port.stopListening()


@pytest_twisted.ensureDeferred
async def test_the_cluster_ca_verifies_and_a_client_certificate_is_sent(tls_kube):
    url, ca, client, seen = tls_kube
    cluster = Cluster(url, static_token("secret-token"), ca, client)
    listed = await KubeClient(cluster.http(reactor), cluster.server, cluster.token).request(
        "GET", "/apis/apps/v1/deployments")
    assert listed["kind"] == "List"
    assert seen and seen[0] is not None  # the server saw our certificate


@pytest_twisted.ensureDeferred
async def test_another_ca_is_refused(tls_kube):
    url, _, client, seen = tls_kube
    other_ca, _ = issue("someone else's CA")
    cluster = Cluster(url, static_token("secret-token"), pem(other_ca), client)
    with pytest.raises(Exception, match="certificate verify failed|SSL"):
        await KubeClient(cluster.http(reactor), cluster.server, cluster.token).request(
            "GET", "/apis/apps/v1/deployments")
    assert seen == []
