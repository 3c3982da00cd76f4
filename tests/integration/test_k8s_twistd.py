"""A poller-only ``twistd -n llamad`` against the fake cluster, as a user would run it."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import wait_for
from k8s_fake import model_objects

pytestmark = pytest.mark.integration

FAKE = Path(__file__).resolve().parents[1] / "k8s_fake.py"


class FakeCluster:
    def __init__(self, epp_token: str | None = None) -> None:
        argv = [sys.executable, str(FAKE), "--epps", "127.0.0.2,127.0.0.3"]
        if epp_token:
            argv += ["--epp-token", epp_token]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None
        ports = json.loads(self.proc.stdout.readline())
        self.url, self.epp_port = ports["api"], ports["epp_port"]

    def call(self, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        with urllib.request.urlopen(urllib.request.Request(self.url + path, data=data), timeout=5) as r:
            return json.loads(r.read())

    def add(self, name: str, **kwargs: Any) -> None:
        kwargs.setdefault("epp_ips", ("127.0.0.2", "127.0.0.3"))
        self.call("/_fake/objects", {"objects": model_objects(name, epp_port=self.epp_port, **kwargs)})

    def state(self) -> dict[str, Any]:
        return self.call("/_fake/state")


@pytest.fixture
def fake_cluster() -> Iterator[FakeCluster]:
    cluster = FakeCluster(epp_token="epp-secret")
    yield cluster
    cluster.proc.terminate()
    cluster.proc.wait(10)


def kubeconfig(path: Path, token: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: test\n"
        "clusters:\n- name: fake\n  cluster:\n    server: https://kubernetes.invalid:6443\n"
        "contexts:\n- name: test\n  context:\n    cluster: fake\n    user: poller\n"
        f"users:\n- name: poller\n  user:\n    token: {token}\n"
    )
    return path


def test_a_poller_only_llamad_wakes_the_right_deployments(start_llamad, fake_cluster, tmp_path):
    fake_cluster.add("qwen", model="Qwen/Qwen2.5-7B")
    fake_cluster.add("llama", model="meta/llama-3")
    fake_cluster.add("busy", replicas=1)
    fake_cluster.add("elsewhere", namespace="other-team")
    fake_cluster.call("/_fake/queue", {"model": "busy", "size": 5})
    fake_cluster.call("/_fake/queue", {"model": "elsewhere", "size": 5})
    (tmp_path / "epp-token").write_text("epp-secret\n")
    config = kubeconfig(tmp_path / "kubeconfig", "secret-token")
    daemon = start_llamad(
        backend={"kind": "none", "model": ""}, wait="listening",
        toml=("[scale_from_zero]\nenabled = true\ninterval = 0.05\n"
              f'api_server = "{fake_cluster.url}"\nkubeconfig = "{config}"\n'
              f'epp_token_file = "{tmp_path / "epp-token"}"\nnamespaces = ["models"]\n'),
    )
    wait_for(lambda: daemon.request("GET", "/readyz", port="health")[0] == 200, 10, "caches listed")
    code, body, _ = daemon.request("POST", "/v1/chat/completions", body={"messages": []})
    assert code == 503 and b"no_backend" in body

    fake_cluster.call("/_fake/queue", {"model": "Qwen/Qwen2.5-7B", "size": 3, "ips": ["127.0.0.3"]})
    wait_for(lambda: fake_cluster.state()["replicas"]["models/qwen"] == 1, 10, "qwen scaled")
    wait_for(lambda: fake_cluster.state()["vas"]["models/qwen"], 10, "qwen's status persisted")
    state = fake_cluster.state()
    assert state["replicas"] == {"models/qwen": 1, "models/llama": 0, "models/busy": 1, "other-team/elsewhere": 0}
    puts = [path for _, method, path in state["writes"] if method == "PUT"]
    assert puts == ["/apis/apps/v1/namespaces/models/deployments/qwen/scale"]
    assert state["vas"]["models/qwen"]["conditions"][0]["type"] == "MetricsAvailable"
    assert state["events"] == 1

    _, text, _ = daemon.request("GET", "/metrics")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text.decode()) for s in family.samples}
    assert samples[("llamad_scale_from_zero_scale_ups_total", (("namespace", "models"), ("variant", "qwen")))] == 1
    assert samples[("llamad_scale_from_zero_passes_total", ())] > 0
    assert samples[("llamad_scale_from_zero_detection_seconds_count", ())] == 1

    _, health, _ = daemon.request("GET", "/health")
    assert json.loads(health)["scale_from_zero"]["synced"] is True
    daemon.proc.terminate()
    assert daemon.proc.wait(30) == 0
