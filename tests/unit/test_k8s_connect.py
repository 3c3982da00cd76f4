"""Finding the API server and credentials: api_server, kubeconfig, in-cluster."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from llamad.k8s.connect import ConnectError, FileToken, find

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def kubeconfig(tmp_path: Path, cluster: str, user: str) -> str:
    path = tmp_path / "config"
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: dev\n"
        f"clusters:\n- name: c\n  cluster:\n{cluster}"
        "contexts:\n- name: dev\n  context: {cluster: c, user: u}\n"
        f"users:\n- name: u\n  user:\n{user}"
    )
    return str(path)


def service_account(tmp_path: Path, token: str = "sa-token") -> str:
    directory = tmp_path / "sa"
    directory.mkdir()
    (directory / "token").write_text(token)
    (directory / "ca.crt").write_bytes(PEM)
    return str(directory)


def test_in_cluster_uses_the_service_host_token_and_ca(tmp_path):
    sa = service_account(tmp_path)
    cluster = find("", "", {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"}, sa)
    assert cluster.server == "https://10.96.0.1:443"
    assert cluster.token() == "sa-token" and cluster.ca_pem == PEM
    v6 = find("", "", {"KUBERNETES_SERVICE_HOST": "fd00::1", "KUBERNETES_SERVICE_PORT": "443"}, sa)
    assert v6.server == "https://[fd00::1]:443"


def test_in_cluster_without_a_token_names_the_path(tmp_path):
    with pytest.raises(ConnectError, match="no service-account token at .*/token"):
        find("", "", {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, str(tmp_path))


def test_kubeconfig_with_ca_data_and_token(tmp_path):
    ca = base64.b64encode(PEM).decode()
    path = kubeconfig(tmp_path, f"    server: https://k8s.example:6443/\n    certificate-authority-data: {ca}\n",
                      "    token: abc\n")
    cluster = find("", path, {})
    assert (cluster.server, cluster.token(), cluster.ca_pem) == ("https://k8s.example:6443", "abc", PEM)


def test_kubeconfig_files_are_relative_to_it_and_token_files_are_reread(tmp_path):
    (tmp_path / "ca.pem").write_bytes(PEM)
    (tmp_path / "cert.pem").write_bytes(b"CERT")
    (tmp_path / "key.pem").write_bytes(b"KEY")
    (tmp_path / "token").write_text("one\n")
    path = kubeconfig(tmp_path, "    server: https://k8s.example\n    certificate-authority: ca.pem\n",
                      "    tokenFile: token\n    client-certificate: cert.pem\n    client-key: key.pem\n")
    cluster = find("", path, {})
    assert cluster.ca_pem == PEM and cluster.client_cert_pem == b"CERT\nKEY"
    assert cluster.token() == "one"
    (tmp_path / "token").write_text("two, longer\n")
    assert cluster.token() == "two, longer"


@pytest.mark.parametrize("cluster, user, message", [
    ("    server: http://k8s.example\n", "    token: t\n", "must be https://"),
    ("    server: https://k8s.example\n    insecure-skip-tls-verify: true\n", "    token: t\n",
     "TLS is always verified"),
    ("    server: https://k8s.example\n", "    exec: {command: aws}\n", "credential plugin 'exec'"),
    ("    server: https://k8s.example\n", "    client-certificate-data: Q0VSVA==\n",
     "client-certificate and client-key must be given together"),
    ("    server: https://k8s.example\n    certificate-authority: missing.pem\n", "    token: t\n",
     "certificate-authority: .*missing.pem"),
])
def test_kubeconfig_problems_are_named(tmp_path, cluster, user, message):
    with pytest.raises(ConnectError, match=message):
        find("", kubeconfig(tmp_path, cluster, user), {})


def test_a_kubeconfig_that_is_not_yaml_or_lacks_the_context(tmp_path):
    bad = tmp_path / "bad"
    bad.write_text("clusters: [\n")
    with pytest.raises(ConnectError, match="kubeconfig .*bad"):
        find("", str(bad), {})
    empty = tmp_path / "empty"
    empty.write_text("current-context: nowhere\n")
    with pytest.raises(ConnectError, match="no context named 'nowhere'"):
        find("", str(empty), {})


def test_api_server_overrides_and_is_the_only_place_for_plain_http(tmp_path):
    path = kubeconfig(tmp_path, "    server: https://k8s.example\n", "    token: from-kubeconfig\n")
    cluster = find("http://127.0.0.1:8080/", path, {})
    assert (cluster.server, cluster.token()) == ("http://127.0.0.1:8080", "from-kubeconfig")
    bare = find("http://127.0.0.1:8080", "", {}, str(tmp_path / "no-service-account"))
    assert bare.token() is None
    with_sa = find("https://10.0.0.1:6443", "", {}, service_account(tmp_path))
    assert with_sa.token() == "sa-token" and with_sa.ca_pem == PEM
    with pytest.raises(ConnectError, match="api_server must be an http"):
        find("ftp://x", "", {})


def test_outside_a_cluster_with_nothing_configured(tmp_path):
    with pytest.raises(ConnectError, match="set scale_from_zero.kubeconfig or scale_from_zero.api_server"):
        find("", "", {"KUBECONFIG": str(tmp_path / "none"), "HOME": str(tmp_path)}, str(tmp_path))
    path = kubeconfig(tmp_path, "    server: https://from-env\n", "    token: t\n")
    assert find("", "", {"KUBECONFIG": path}, str(tmp_path)).server == "https://from-env"


def test_a_ca_that_is_not_pem_is_a_connect_error(tmp_path):
    from twisted.internet.task import Clock

    path = kubeconfig(tmp_path, "    server: https://k8s.example\n    certificate-authority-data: bm90IGEgY2VydA==\n",
                      "    token: t\n")
    with pytest.raises(ConnectError, match="not valid PEM"):
        find("", path, {}).http(Clock())


def test_file_token_follows_rotation_and_absence(tmp_path):
    path = tmp_path / "token"
    token = FileToken(str(path))
    assert token() is None
    path.write_text("first")
    assert token() == "first"
    replacement = tmp_path / "new"
    replacement.write_text("second")
    os.replace(replacement, path)  # how projected volumes swap files
    assert token() == "second"
    path.unlink()
    assert token() is None
