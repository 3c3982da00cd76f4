"""Operating llamad from a shell: `llamad keys reload` with two daemons, a port that is taken,
`make run` and Ctrl-C, and embeddings served through llamad to the official `openai` client."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import openai
import pytest

from helpers import TWISTD, children_of, wait_for
from llamad import runfiles
from llamad.demo import N_EMBD
from llamad.supervisor import free_port

pytestmark = pytest.mark.integration

LLAMAD = str(Path(sys.executable).parent / "llamad")
ROOT = Path(__file__).resolve().parents[2]


def keys_reload(config: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATA_DIR"}
    return subprocess.run([LLAMAD, "keys", "--config", str(config), "reload"], capture_output=True, text=True,
                          env=env, timeout=30)


def test_keys_reload_finds_each_daemon_by_its_data_dir(start_llamad, tmp_path):
    # Lazy: no model is loaded, the two daemons only have to listen.
    first = start_llamad(backend={"start": "lazy"}, wait="listening")
    second = start_llamad(backend={"start": "lazy"}, wait="listening")
    configs = [tmp_path / "llamad0.toml", tmp_path / "llamad1.toml"]  # as start_llamad writes them

    done = keys_reload(configs[1])
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == f"sent SIGHUP to llamad pid {second.proc.pid} (data dir {second.data_dir})\n"
    wait_for(lambda: "SIGHUP: reloading" in second.log(), 10, "the second daemon's reload")
    assert "SIGHUP: reloading" not in first.log()

    done = keys_reload(configs[0])
    assert done.returncode == 0 and f"pid {first.proc.pid} " in done.stdout
    wait_for(lambda: "SIGHUP: reloading" in first.log(), 10, "the first daemon's reload")
    assert second.log().count("SIGHUP: reloading") == 1

    # With auth off, POST /reload (the alias) answers loopback.
    status, body, _ = first.request("POST", "/reload")
    assert status == 200 and json.loads(body) == {"reloaded": True, "keys": 0, "status": "ok",
                                                  "keys_loaded": 0}

    # A clean stop removes the PID file: then no llamad runs for that data dir.
    assert first.stop() == 0
    assert not os.path.exists(runfiles.daemon_record_path(str(first.data_dir)))
    done = keys_reload(configs[0])
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.startswith(f"llamad keys reload: no llamad is running for data dir {first.data_dir} ")
    assert done.stderr.count("\n") == 1
    assert second.proc.poll() is None and runfiles.running_daemon(str(second.data_dir)).pid == second.proc.pid


@pytest.mark.parametrize("taken", ["api.listen", "health.listen"])
def test_a_port_that_is_taken_is_one_line_and_exit_2(tmp_path, demo_model, llama_server_bin, taken):
    holder = socket.socket()
    holder.bind(("0.0.0.0", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    free = free_port()
    api, health = (busy, free) if taken == "api.listen" else (free, busy)
    data_dir = tmp_path / "data"
    env = {**{k: v for k, v in os.environ.items() if k not in ("DATA_DIR", "MODEL_NAME", "LLAMA_SERVER_BIN")},
           "PORT": str(api), "PORT_HEALTH": str(health), "MODEL_PATH": demo_model, "DATA_DIR": str(data_dir),
           "RUNTIME_DIRECTORY": str(tmp_path)}
    try:
        # No --pidfile: twistd would write twistd.pid in its working directory, if it got that far.
        done = subprocess.run([TWISTD, "-n", "llamad", "--set", f"backend.command={llama_server_bin}"],
                              capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    finally:
        holder.close()
    key_source = "env PORT" if taken == "api.listen" else "env PORT_HEALTH"
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (f"llamad: config error: {taken}: cannot listen on tcp:{busy}: address already in use "
                           f"(from {key_source})\n")
    assert not (tmp_path / "twistd.pid").exists()
    run_dir = Path(runfiles.runtime_dir(str(data_dir)))
    assert not (run_dir / "llama.pid").exists() and not (run_dir / "llamad.pid").exists()  # no child, no record
    boot = (data_dir / "logs" / "_boot" / "latest.txt").read_text().strip()
    text = Path(boot).read_text()
    assert f"config error: {taken}: cannot listen on tcp:{busy}" in text
    assert "backend start:" not in text


def test_make_run_then_ctrl_c(tmp_path):
    """The real `make run` recipe (set-up skipped: .venv is there), a terminal's Ctrl-C to its process group."""
    api, health = free_port(), free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "MODEL_NAME", "LLAMA_SERVER_BIN")},
           "PORT": str(api), "PORT_HEALTH": str(health), "DATA_DIR": str(tmp_path / "var"),
           "RUNTIME_DIRECTORY": str(tmp_path), "ARGS": "--set backend.parallel=1"}
    out_path, err_path = tmp_path / "make.out", tmp_path / "make.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        make = subprocess.Popen(["make", "--no-print-directory", "-C", str(ROOT), "-o", "setup", "run"], env=env,
                                stdout=out, stderr=err, start_new_session=True)
    try:
        def ready() -> bool:
            if make.poll() is not None:
                raise AssertionError(f"make exited {make.returncode}: {err_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", api), timeout=1) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return b'"state": "ready"' in sock.recv(65536)
            except OSError:
                return False

        wait_for(ready, 60, "make run to serve the demo model", interval=0.2)
        twistd = children_of(make.pid)
        assert len(twistd) == 1  # the recipe's shell exec'd twistd
        backend = children_of(twistd[0])
        assert len(backend) == 1
        os.killpg(make.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        make.wait(90)
    finally:
        if make.poll() is None:
            os.killpg(make.pid, signal.SIGKILL)
            make.wait()
    assert "llamad stopped" in out_path.read_text()
    # twistd exited 0: make prints "*** [...] Error N" or "Interrupt" for anything else. It got the
    # SIGINT too, and ends by it: the shell's 130.
    err = err_path.read_text()
    assert "make: ***" not in err, err
    assert make.returncode == -signal.SIGINT
    assert runfiles.start_time(twistd[0]) is None and runfiles.start_time(backend[0]) is None


@pytest.mark.parametrize("generator", ["Unix Makefiles", "Ninja"])
def test_a_real_cmake_build_shows_its_progress_and_its_time(tmp_path, generator):
    """scripts/progress.sh on real cmake output, as build-llama-server.sh (Makefiles) and pip's
    scikit-build-core (Ninja) print it: a small project stands in for the 5-minute llama.cpp build."""
    if generator == "Ninja" and not shutil.which("ninja"):
        pytest.skip("no ninja")
    src = tmp_path / "src"
    src.mkdir()
    names = [f"part{i}" for i in range(12)]
    for name in names:
        (src / f"{name}.c").write_text(f"int {name}(void) {{ return 1; }}\n")
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.13)\nproject(demo C)\n"
        f"add_executable(demo main.c {' '.join(n + '.c' for n in names)})\n")
    subprocess.run(["cmake", "-S", str(src), "-B", str(tmp_path / "build"), "-G", generator], check=True,
                   capture_output=True, timeout=120)
    done = subprocess.run(["bash", str(ROOT / "scripts" / "progress.sh"), str(tmp_path / "build.log"),
                           "llamad: compiling demo", "cmake", "--build", str(tmp_path / "build"), "-j2"],
                          capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stderr) == (0, "")
    shown = done.stdout.splitlines()
    assert 3 <= len(shown) <= 12 and all(line.startswith("llamad: compiling demo: ") for line in shown)
    percents = [int(line.split(": ")[2].split("%")[0]) for line in shown[:-1]]
    assert percents == sorted(set(percents)) and percents[-1] == 100 and all(p % 10 == 0 for p in percents)
    assert re.fullmatch(r"llamad: compiling demo: done in \d+m\d\ds", shown[-1])
    assert "demo" in (tmp_path / "build.log").read_text()  # the whole output is kept


def test_embeddings_through_llamad_with_the_openai_client(start_llamad):
    daemon = start_llamad(backend={"embeddings": True})
    client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", max_retries=0)
    result = client.embeddings.create(model="demo", input=["Hello", "a longer sentence to embed"])
    assert [item.index for item in result.data] == [0, 1]
    for item in result.data:
        assert len(item.embedding) == N_EMBD and all(isinstance(x, float) for x in item.embedding)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0
    # Generation still works next to embeddings.
    chat = client.chat.completions.create(model="demo", max_tokens=2, messages=[{"role": "user", "content": "hi"}])
    assert chat.usage.completion_tokens == 2
