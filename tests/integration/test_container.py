"""The images: both Dockerfiles in step, the entrypoint's command line in this venv, and, where podman runs, the CPU
image built from a local base (scripts/image.sh, as `make image` builds it) and run as a deployment runs it.

The base and the image are cached between runs (the Debian tarball, podman's layers): only the first run builds
them. Podman's settings for this machine come from `scripts/image.sh conf`, the same as `make image` uses.
"""

from __future__ import annotations

import configparser
import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from helpers import TWISTD, Stream, alive, wait_for
from llamad.supervisor import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "image.sh"
TAG = "localhost/llamad-test:cpu"
# Seconds: a cold build downloads Debian, Python's packages and the llama-server base on a shared machine.
BUILD_TIMEOUT = 1500
TIMINGS: dict[str, float] = {}
# The first test that needs the image builds it.
slow = pytest.mark.timeout(BUILD_TIMEOUT + 900)


def directive(dockerfile: Path, name: str) -> str:
    return next(line.split(None, 1)[1] for line in dockerfile.read_text().splitlines() if line.startswith(name + " "))


def instructions(dockerfile: Path) -> list[str]:
    """The instructions, continuation lines joined, comments and spacing left out."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in dockerfile.read_text().splitlines()
                                             if not line.lstrip().startswith("#")))
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip()]


def test_both_images_share_the_entrypoint_and_the_health_check():
    gpu, cpu = ROOT / "Dockerfile", ROOT / "Dockerfile.cpu"
    assert json.loads(directive(gpu, "ENTRYPOINT")) == ["twistd", "-n", "--pidfile=", "llamad"]
    assert directive(gpu, "ENTRYPOINT") == directive(cpu, "ENTRYPOINT")
    for dockerfile in (gpu, cpu):
        text = dockerfile.read_text()
        assert "EXPOSE 8000 8001" in text and ":8001/ping" in text and "USER llamad" in text
        assert "LLAMA_SERVER_BIN=/app/llama-server" in text


def test_both_dockerfiles_are_the_same_stages_on_another_base():
    """Every instruction alike but the base's default and the CPU image's NGL=0."""
    gpu, cpu = instructions(ROOT / "Dockerfile"), instructions(ROOT / "Dockerfile.cpu")
    assert "ARG BASE=ghcr.io/ggml-org/llama.cpp:server-cuda" in gpu
    assert "ARG BASE=ghcr.io/ggml-org/llama.cpp:server" in cpu
    assert "FROM ${PYTHON} AS wheel" in gpu and "FROM ${BASE}" in gpu
    same = [line for line in gpu if not line.startswith("ARG BASE=")]
    assert same == [line.replace(" NGL=0", "") for line in cpu if not line.startswith("ARG BASE=")]


def test_pip_gets_its_settings_and_ca_bundle_as_build_secrets_only():
    """Each step that runs pip mounts both secrets; nothing copies a pip config or a CA bundle into a layer."""
    for name in ("Dockerfile", "Dockerfile.cpu"):
        steps = [line for line in instructions(ROOT / name) if line.startswith("RUN ")]
        pip_steps = [step for step in steps if "pip " in step]
        assert len(pip_steps) == 3, name
        for step in pip_steps:
            assert "--mount=type=secret,id=pipconf" in step and "--mount=type=secret,id=cacert" in step
            assert "PIP_CONFIG_FILE=/run/secrets/pipconf" in step and "PIP_CERT=/run/secrets/cacert" in step
        copies = " ".join(line for line in instructions(ROOT / name) if line.startswith(("COPY", "ADD", "ENV")))
        assert "pip.conf" not in copies and "cert" not in copies.lower()


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


# --- the images, built and run with podman ----------------------------------------------------------


@dataclass
class Podman:
    """podman with this machine's settings (scripts/image.sh conf), and the image script with the same."""

    env: dict[str, str]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}")
        return done

    def script(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env={**self.env, **(env or {})},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=BUILD_TIMEOUT)
        assert done.returncode == 0, f"scripts/image.sh {' '.join(args)}: exit {done.returncode}\n{done.stdout[-6000:]}"
        return done.stdout


@pytest.fixture(scope="module")
def podman() -> Podman:
    if not shutil.which("podman"):
        pytest.skip("podman is not installed (`make setup` installs it, as root with apt)")
    if os.geteuid() != 0:
        pytest.skip("the local base is made with debootstrap and run by podman as root")
    conf = subprocess.run(["bash", str(SCRIPT), "conf"], capture_output=True, text=True, check=True).stdout.strip()
    env = {**os.environ, "CONTAINERS_CONF": conf} if conf else dict(os.environ)
    info = subprocess.run(["podman", "info"], env=env, capture_output=True, text=True, timeout=120)
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {(info.stderr.strip().splitlines() or ['?'])[-1]}")
    return Podman(env)


@pytest.fixture(scope="module")
def build_env(tmp_path_factory: pytest.TempPathFactory, llama_server_bin: str) -> dict[str, str]:
    """The script's environment: this checkout's llama-server, and one copy of the checkout as the context of
    every build, so that the images compared were built from the same sources."""
    context = tmp_path_factory.mktemp("context") / "llamad"
    shutil.copytree(ROOT, context, ignore=shutil.ignore_patterns(
        ".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis", "dropin.cache"))
    return {"LLAMA_SERVER_BIN": llama_server_bin, "CONTEXT": str(context)}


@pytest.fixture(scope="module")
def cpu_image(podman: Podman, build_env: dict[str, str]) -> Iterator[str]:
    """Dockerfile.cpu built as `make image` builds it, on the local base of this checkout's llama-server."""
    env = build_env
    started = time.monotonic()
    podman.script("base", env=env)
    TIMINGS["base (s)"] = time.monotonic() - started
    started = time.monotonic()
    podman.script("build", f"{env['CONTEXT']}/Dockerfile.cpu", TAG, env=env)
    TIMINGS["build (s)"] = time.monotonic() - started
    yield TAG
    print("\ncontainer timings:", ", ".join(f"{name} {value:.1f}" for name, value in TIMINGS.items()))


def inspect(podman: Podman, image: str, field: str) -> object:
    return json.loads(podman("image", "inspect", "--format", "{{json ." + field + "}}", image).stdout)


@slow
def test_the_cpu_image_runs_as_its_own_user_with_the_health_check(podman, cpu_image):
    assert inspect(podman, cpu_image, "Config.User") == "llamad"
    health = inspect(podman, cpu_image, "Config.Healthcheck")
    assert health["Test"][0] == "CMD-SHELL" and "http://127.0.0.1:8001/ping" in health["Test"][1]
    assert health["Interval"] == 10 * 10**9 and health["Timeout"] == 3 * 10**9
    assert inspect(podman, cpu_image, "Config.Entrypoint") == ["twistd", "-n", "--pidfile=", "llamad"]
    size = int(podman("image", "inspect", "--format", "{{.Size}}", cpu_image).stdout)
    TIMINGS["image size (MB)"] = size / 1e6
    assert size < 1e9
    inside = podman("run", "--rm", "--entrypoint", "sh", cpu_image, "-c",
                    "id -u; id -un; command -v setsid; command -v setpriv; /app/llama-server --version 2>&1 | head -1;"
                    " ls -A /run/secrets 2>/dev/null; pip config list; ls /tmp").stdout.splitlines()
    assert inside[:4] == ["1000", "llamad", "/usr/bin/setsid", "/usr/bin/setpriv"]
    assert inside[4].startswith("version:")
    assert inside[5:] == [], "a build secret, a pip config or the wheel stayed in the image"


@slow
def test_the_cuda_dockerfile_builds_the_same_stages_up_to_its_base(podman, cpu_image, build_env):
    """`Dockerfile` needs llama.cpp's CUDA image only from its runtime stage on: its wheel stage is the CPU
    image's, layer for layer, and on the local base the rest gives the CPU image's layers too."""
    env, context = build_env, build_env["CONTEXT"]
    podman.script("build", f"{context}/Dockerfile", "localhost/llamad-test:wheel", "--target", "wheel", env=env)
    podman.script("build", f"{context}/Dockerfile.cpu", "localhost/llamad-test:wheel-cpu", "--target", "wheel",
                  env=env)
    ids = [podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
           for tag in ("localhost/llamad-test:wheel", "localhost/llamad-test:wheel-cpu")]
    assert ids[0] == ids[1]
    listing = podman("run", "--rm", "--entrypoint", "sh", "localhost/llamad-test:wheel", "-c",
                     "ls /wheels; cat /wheels/requirements.txt; python3 -m zipfile -l /wheels/llamad-*.whl").stdout
    assert "llamad-0.1.0-py3-none-any.whl" in listing
    packaged = [str(path.relative_to(context)) for path in Path(context, "llamad").rglob("*")
                if path.is_file() and "__pycache__" not in path.parts]
    assert [name for name in [*packaged, "twisted/plugins/llamad_plugin.py"] if name not in listing] == []
    setup = configparser.ConfigParser()
    setup.read(Path(context, "setup.cfg"))
    required = [line.split("[")[0].split(">")[0].split("<")[0].lower()
                for line in setup["options"]["install_requires"].splitlines() if line and not line.startswith("#")]
    listed = [line.split("[")[0].split(">")[0].split("<")[0].lower() for line in listing.splitlines()
              if re.match(r"^[A-Za-z][\w.-]*(\[[\w,]+\])?[<>=]", line)]
    assert sorted(listed) == sorted(required)

    podman.script("build", f"{context}/Dockerfile", "localhost/llamad-test:cuda-recipe", env=env)
    layers = [inspect(podman, tag, "RootFS.Layers") for tag in ("localhost/llamad-test:cuda-recipe", cpu_image)]
    assert layers[0] == layers[1]
    envs = [inspect(podman, tag, "Config.Env") for tag in ("localhost/llamad-test:cuda-recipe", cpu_image)]
    assert envs[0] == [e for e in envs[1] if e != "NGL=0"]


# --- the CPU image, run as the README's container guide says --------------------------------------------

GATE = """#!/bin/sh
# llama-server, once the test opens the gate: the ports are checked while the model loads.
while [ ! -e /workspace/gate-open ]; do sleep 0.1; done
exec /app/llama-server "$@"
"""


def get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    except (OSError, http.client.HTTPException):
        return 0, b""
    finally:
        conn.close()


def chat_stream(port: int) -> list[dict]:
    """A streamed chat completion's chunks, checked to end with [DONE]."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16, "stream": True}
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200 and response.getheader("content-type", "").startswith("text/event-stream")
    events = [line.strip()[6:] for line in response if line.startswith(b"data: ")]
    conn.close()
    assert events[-1] == b"[DONE]"
    return [json.loads(e) for e in events[:-1]]


def llama_server_pid(podman: Podman, name: str) -> int:
    """The container's llama-server, as the host sees it."""
    top = podman("top", name, "hpid", "args").stdout.splitlines()
    return next(int(line.split()[0]) for line in top if "/app/llama-server" in line)


def archive_order(path: Path) -> tuple[str, int]:
    """Archives in the order they were made: ``<ts>_access_<instance>.log``, then ``.1.log``, ... in one second."""
    suffix = re.search(r"\.(\d+)\.log$", path.name)
    return path.name.split("_", 1)[0], int(suffix.group(1)) if suffix else 0


@slow
def test_the_cpu_image_serves_the_demo_model_from_a_volume(podman, cpu_image, demo_model, tmp_path):
    uid, gid = (podman("run", "--rm", "--entrypoint", "id", cpu_image, flag).stdout.strip() for flag in ("-u", "-g"))
    volume = tmp_path / "volume"
    access = volume / "logs" / "access"
    access.mkdir(parents=True)
    (volume / "models").mkdir()
    shutil.copy(demo_model, volume / "models" / "demo.gguf")
    (volume / "gated-llama-server").write_text(GATE)
    (volume / "gated-llama-server").chmod(0o755)
    (access / "latest.txt").touch()
    for path in (volume, *volume.rglob("*")):
        os.chown(path, int(uid), int(gid))

    name = f"llamad-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    api, health = free_port(), free_port()
    seen = tmp_path / "tail.out"  # a file, not a pipe: a full pipe would stall tail itself
    with open(seen, "wb") as out:
        tail = subprocess.Popen(["tail", "-n", "+1", "-F", "-s", "0.05", str(access / "latest.txt")],
                                stdout=out, stderr=subprocess.DEVNULL)
    try:
        started = time.monotonic()
        podman("run", "-d", "--name", name, "-p", f"127.0.0.1:{api}:8000", "-p", f"127.0.0.1:{health}:8001",
               "-v", f"{volume}:/workspace", "-e", "MODEL_NAME=demo.gguf", "-e", f"CTX={4 * 4096}",
               "-e", "LLAMA_SERVER_BIN=/workspace/gated-llama-server", cpu_image,
               "--set", "logs.max_bytes=2048", "--set", "logs.keep=100", "--set", "api.drain_timeout=300")

        def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
            """Wait for an outcome; fail at once, with the container's log, if the container ends meanwhile."""
            tries = [0]

            def check() -> bool:
                if predicate():
                    return True
                tries[0] += 1
                if tries[0] % 10 == 0:
                    running = podman("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
                    if running != "true":
                        raise AssertionError(f"the container ended while waiting for {what}")
                return False

            try:
                wait_for(check, timeout, what, interval=0.05)
            except AssertionError as e:
                log = podman("logs", name, check=False)
                raise AssertionError(f"{e}; the container's log:\n{(log.stdout + log.stderr)[-4000:]}") from None

        # While the model loads: /ping answers, readiness does not, and the health check passes.
        until(lambda: get(health, "/ping")[0] == 200, 120, "the first /ping")
        TIMINGS["first /ping (s)"] = time.monotonic() - started
        assert get(health, "/readyz")[0] == 503
        status, body = get(api, "/health")
        assert status == 503 and json.loads(body)["state"] == "starting"
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        (volume / "gate-open").touch()
        until(lambda: get(health, "/readyz")[0] == 200, 120, "readiness")
        TIMINGS["ready (s)"] = time.monotonic() - started
        assert get(health, "/ping")[0] == 200
        assert podman("healthcheck", "run", name, check=False).returncode == 0
        state = podman("inspect", "--format", "{{.State.Health.Status}}", name).stdout.strip()
        assert state == "healthy"

        chunks = chat_stream(api)
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)

        # The access log rotates on the volume, and `tail -F` on the host follows it, losing no line. Its lines
        # are written in batches, and a file rotates before a batch that would pass max_bytes: one batch of
        # ten requests' lines (more than 2 KB) at a time.
        def everything() -> bytes:
            archives = sorted(access.glob("*.log"), key=archive_order)
            return b"".join(p.read_bytes() for p in [*archives, access / "latest.txt"])

        for batch in range(1, 7):
            for _ in range(10):
                assert get(api, "/v1/models")[0] == 200
            wait_for(lambda: everything().count(b'"route": "/v1/models"') == 10 * batch, 30, f"batch {batch}")
        assert len(list(access.glob("*.log"))) >= 5
        wait_for(lambda: seen.read_bytes() == everything(), 30, "tail -F to show every line of the access log")
        assert seen.read_bytes().count(b'"route": "/v1/models"') == 60

        # podman stop: SIGTERM while a stream runs. llama-server is held (SIGSTOP) as soon as the first event is
        # in (the stream is long: a slot holds 4096 tokens), so the stream is in flight when the signal lands,
        # however fast the machine; let go once llamad drains (readiness 503), it runs to its end, and only then
        # does the container exit, with 0.
        child = llama_server_pid(podman, name)
        stream = Stream(api, {"prompt": "Tell a long story.", "max_tokens": 3000, "stream": True,
                              "ignore_eos": True}).start()
        assert stream.first_event.wait(120) and stream.events, stream.describe()
        os.kill(child, signal.SIGSTOP)
        try:
            assert not stream.done.is_set(), stream.describe()
            started = time.monotonic()
            stop = subprocess.Popen(["podman", "stop", "-t", "600", name], env=podman.env,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            until(lambda: get(health, "/readyz")[0] == 503, 120, "readiness 503 while draining")
            assert stop.poll() is None and not stream.done.is_set(), stream.describe()
        finally:
            os.kill(child, signal.SIGCONT)
        assert stop.wait(660) == 0, stop.stderr.read() if stop.stderr else ""
        TIMINGS["stop (s)"] = time.monotonic() - started
        assert stream.done.is_set() and stream.completed and not stream.interrupted, stream.describe()
        assert len(stream.events) > 3000
        assert podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
        logs = podman("logs", name).stdout
        assert "draining 1 in-flight request(s)" in logs, logs[-3000:]
        assert "llamad stopped" in logs and "Unable to write" not in logs, logs[-3000:]

        # podman kill: no llama-server is left, in the container or on the host.
        podman("start", name)
        until(lambda: get(health, "/readyz")[0] == 200, 120, "readiness after the restart")
        child = llama_server_pid(podman, name)
        assert alive(child)
        assert "/usr/bin/setpriv --pdeathsig KILL -- /workspace/gated-llama-server" in podman("logs", name).stdout
        podman("kill", name)
        assert podman("wait", name, timeout=60).stdout.strip() == "137"
        wait_for(lambda: not alive(child), 30, "llama-server to be gone")
    finally:
        tail.send_signal(signal.SIGTERM)
        tail.wait(10)
        podman("rm", "-f", "-t", "0", name, check=False)
