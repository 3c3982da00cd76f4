"""The images cannot be built here: check what can be, the entrypoint's command line in this venv."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from helpers import TWISTD, wait_for
from llamad.supervisor import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def directive(dockerfile: Path, name: str) -> str:
    return next(line.split(None, 1)[1] for line in dockerfile.read_text().splitlines() if line.startswith(name + " "))


def test_both_images_share_the_entrypoint_and_the_health_check():
    gpu, cpu = ROOT / "Dockerfile", ROOT / "Dockerfile.cpu"
    assert json.loads(directive(gpu, "ENTRYPOINT")) == ["twistd", "-n", "--pidfile=", "llamad"]
    assert directive(gpu, "ENTRYPOINT") == directive(cpu, "ENTRYPOINT")
    for dockerfile in (gpu, cpu):
        text = dockerfile.read_text()
        assert "EXPOSE 8000 8001" in text and ":8001/ping" in text and "USER llamad" in text
        assert "LLAMA_SERVER_BIN=/app/llama-server" in text


def test_entrypoint_runs_runpod_style_with_model_name(tmp_path, demo_model, llama_server_bin):
    """As the container starts it: the entrypoint, MODEL_NAME under {DATA_DIR}/models, no config file."""
    data = tmp_path / "volume"
    (data / "models").mkdir(parents=True)
    shutil.copy(demo_model, data / "models" / "tiny.gguf")
    entry = json.loads(directive(ROOT / "Dockerfile", "ENTRYPOINT"))
    api, health = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("MODEL_PATH",)},
           "MODEL_NAME": "tiny.gguf", "DATA_DIR": str(data), "PORT": str(api), "PORT_HEALTH": str(health),
           "LLAMA_SERVER_BIN": llama_server_bin}
    proc = subprocess.Popen([TWISTD, *entry[1:]], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import http.client

        def ready() -> bool:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", health, timeout=1)
                conn.request("GET", "/readyz")
                return conn.getresponse().status == 200
            except OSError:
                return False

        wait_for(ready, 30, "readiness")
        conn = http.client.HTTPConnection("127.0.0.1", api, timeout=10)
        conn.request("GET", "/v1/models")
        assert b'"tiny"' in conn.getresponse().read()
        assert (data / "logs" / "_boot" / "latest.txt").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
