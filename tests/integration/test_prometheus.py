"""A real Prometheus (Debian's package) scrapes llamad on loopback; promtool lints the exposition."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from helpers import wait_for
from llamad.supervisor import free_port

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")


def query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.skipif(PROMETHEUS is None, reason="Debian's prometheus package is not installed (make setup installs it)")
def test_prometheus_scrapes_llamad(start_llamad, tmp_path):
    daemon = start_llamad()
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: llamad\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{daemon.api_port}']\n"
    )
    prometheus = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def total() -> float:
            try:
                result = query(port, 'sum(llamad_requests_total{route="/v1/completions"})')
            except OSError:
                return -1
            return float(result[0]["value"][1]) if result else -1

        daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})
        first = wait_for(lambda: (t := total()) >= 1 and t, 30, "the first scrape with traffic")
        for _ in range(3):
            daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})
        wait_for(lambda: total() >= first + 3, 30, "the counter to increase")
        ready = query(port, 'llamad_backend_state{state="ready"}')
        assert ready and float(ready[0]["value"][1]) == 1
        assert {r["metric"]["state"] for r in query(port, "llamad_backend_state")} >= {"ready", "failed", "stopped"}
    finally:
        prometheus.terminate()
        prometheus.wait(30)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian's prometheus package) is not installed")
def test_promtool_finds_nothing_wrong_with_llamads_metrics(start_llamad):
    daemon = start_llamad()
    daemon.request("POST", "/v1/completions", body={"prompt": "a", "max_tokens": 1})
    exposition = daemon.request("GET", "/metrics")[1]
    assert b"llamacpp:" in exposition  # the child's own metrics are appended
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, timeout=30)
    complaints = (result.stdout + result.stderr).decode().splitlines()
    # llama.cpp names its metrics `llamacpp:*`, which promtool's linter dislikes; llamad's own are clean.
    assert [c for c in complaints if not c.startswith("llamacpp:")] == []
