"""What a new user meets first: llama-server beside llamad but not on PATH, a typo in a key, keys made on a
running llamad, the boot log's model line, and `make setup` that installs only what changed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import pytest_twisted
from fakes import clean_config_env
from wire import build
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from llamad import config
from llamad.config import ConfigError
from llamad.gateway.guard import Auth
from llamad.tap import served_models

ROOT = Path(__file__).resolve().parents[2]
KEY = "k" * 24
CHAT = "http://x/v1/chat/completions"


@pytest.fixture
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """DATA_DIR and MODEL_PATH (m.gguf) in tmp_path, nothing else set."""
    clean_config_env(tmp_path, monkeypatch)
    return tmp_path


# --- backend.command beside llamad's own executable ------------------------------------------------


@pytest.fixture
def venv_bin(environment: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A venv's bin with llama-server linked in, as llamad's own; PATH without it."""
    bin_dir = environment / "venv" / "bin"
    bin_dir.mkdir(parents=True)
    server = bin_dir / "llama-server"
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    monkeypatch.delenv("LLAMA_SERVER_BIN")
    monkeypatch.setenv("PATH", str(environment / "empty"))
    monkeypatch.setattr(config, "own_bin_dirs", lambda: [str(bin_dir)])
    return bin_dir


def test_a_bare_command_not_on_path_is_found_beside_llamad(venv_bin: Path) -> None:
    loaded = config.load(None, os.environ, check_files=True)
    assert loaded.config.backend.command == str(venv_bin / "llama-server")
    assert loaded.sources["backend.command"] == f"default, not on PATH: found beside llamad in {venv_bin}"
    line = next(line for line in config.render(loaded).splitlines() if line.startswith("command ="))
    assert str(venv_bin / "llama-server") in line and "found beside llamad" in line


def test_a_fleet_model_finds_its_command_beside_llamad(venv_bin: Path, environment: Path) -> None:
    path = environment / "fleet.toml"
    path.write_text(f'[models.a]\nmodel = "{environment / "m.gguf"}"\n[models.b]\nmodel = "{environment / "m.gguf"}"\n'
                    'kind = "llama-cpp-python"\n')
    loaded = config.load(str(path), os.environ, check_files=True)
    assert loaded.config.models["a"].backend.command == str(venv_bin / "llama-server")
    assert loaded.sources["models.a.command"].endswith(f"not on PATH: found beside llamad in {venv_bin}")
    assert loaded.config.models["b"].backend.command == "llama-server"  # llama-cpp-python runs our Python


def test_on_path_or_unchecked_the_command_stays_as_written(venv_bin: Path, environment: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert config.load(None, os.environ, check_files=False).config.backend.command == "llama-server"
    other = environment / "on-path"
    other.mkdir()
    (other / "llama-server").write_text("#!/bin/sh\n")
    (other / "llama-server").chmod(0o755)
    monkeypatch.setenv("PATH", str(other))
    loaded = config.load(None, os.environ, check_files=True)
    assert (loaded.config.backend.command, loaded.sources["backend.command"]) == ("llama-server", "default")


def test_a_command_found_nowhere_says_where_it_was_looked_for(venv_bin: Path) -> None:
    (venv_bin / "llama-server").unlink()
    with pytest.raises(ConfigError) as info:
        config.load(None, os.environ, check_files=True)
    assert str(info.value) == (f"backend.command: 'llama-server' not found or not executable: not on PATH, nor "
                               f"beside llamad in {venv_bin} (set LLAMA_SERVER_BIN)")


def test_llamads_own_directories_are_the_interpreters_and_the_scripts(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    script = tmp_path / "bin" / "twistd"
    script.parent.mkdir()
    script.write_text("")
    monkeypatch.setattr(sys, "argv", [str(script)])
    assert config.own_bin_dirs() == [os.path.dirname(sys.executable), str(tmp_path / "bin")]


# --- an unknown key names the nearest known one --------------------------------------------------


@pytest.mark.parametrize("text, message", [
    ("[fleet]\nmax_loded = 2\n", "fleet.max_loded: unknown key (did you mean fleet.max_loaded?)"),
    ("max_loaded = 2\n", "max_loaded: unknown key (did you mean fleet.max_loaded?)"),
    ("[backend]\ncontxt = 2\n", "backend.contxt: unknown key (did you mean backend.context?)"),
    ("[fleets]\nmax_loaded = 2\n", "fleets: unknown key (did you mean fleet?)"),
    ("[models.a]\nmodel = 'a.gguf'\nalias = ['x']\n", "models.a.alias: unknown key (did you mean models.a.aliases?)"),
    ("[api]\nzzz = 1\n", "api.zzz: unknown key"),
])
def test_an_unknown_key_in_the_file_suggests_the_nearest(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "llamad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        config.load(str(path), {"MODEL_PATH": "/m.gguf"}, check_files=False)
    assert str(info.value) == f"{message} (from {path})"


@pytest.mark.parametrize("key, message", [
    ("backend.paralel", "backend.paralel: unknown key (did you mean backend.parallel?)"),
    ("CTX", "CTX: unknown key (CTX is an environment variable; the key is backend.context)"),
    ("CLIENT_HEADER_TIMEOUT", "CLIENT_HEADER_TIMEOUT: unknown key (CLIENT_HEADER_TIMEOUT is an environment "
                              "variable; the key is api.header_timeout and api.body_timeout)"),
    ("bogus", "bogus: unknown key"),
])
def test_an_unknown_set_key_suggests_the_nearest(key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config.load(None, {"MODEL_PATH": "/m.gguf"}, {key: "1"}, check_files=False)
    assert str(info.value) == f"{message} (from option)"


# --- keys made on a running llamad turn auth on when auth.enabled is set nowhere ------------------


@pytest.fixture
def logged() -> Iterator[list[str]]:
    """The text of every event logged during the test."""
    lines: list[str] = []

    def observer(event: dict[str, Any]) -> None:
        lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observer)
    yield lines
    globalLogPublisher.removeObserver(observer)


@pytest_twisted.ensureDeferred
async def test_a_reload_that_finds_keys_turns_auth_on_when_it_is_set_nowhere(tmp_path: Path,
                                                                            logged: list[str]) -> None:
    keys = tmp_path / "api_keys.txt"
    auth = Auth(False, str(keys), False, Clock(), enable_on_keys=True)
    http, *_ = build(auth=auth)
    assert (await http.post(CHAT, data=b"{}")).code == 200
    assert auth.reload() == 0 and not auth.enabled  # no file yet: still off
    keys.write_text(f"alice:{KEY}\n")
    assert auth.reload() == 1 and auth.enabled
    assert any(line.startswith(f"auth enabled: {keys} now holds keys") for line in logged)
    assert (await http.post(CHAT, data=b"{}")).code == 401
    assert (await http.post(CHAT, data=b"{}", headers={"authorization": f"Bearer {KEY}"})).code == 200
    keys.unlink()  # a vanished file refuses every key; auth stays on
    assert auth.reload() == 0 and auth.enabled
    assert (await http.post(CHAT, data=b"{}", headers={"authorization": f"Bearer {KEY}"})).code == 401


def test_auth_set_off_stays_off_whatever_a_reload_finds(tmp_path: Path) -> None:
    keys = tmp_path / "api_keys.txt"
    keys.write_text(f"alice:{KEY}\n")
    auth = Auth(False, str(keys), False, Clock())
    assert auth.reload() == 1 and not auth.enabled


# --- the boot log's model line ----------------------------------------------------------------


def test_the_boot_line_names_a_fleets_models(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text('[models.qwen]\nmodel = "/m/q.gguf"\n[models.llama]\nmodel = "/m/l.gguf"\n')
    fleet = config.load(str(path), {}, check_files=False).config
    assert served_models(fleet) == "2 models: qwen, llama via llama-server"
    path.write_text(path.read_text() + '[models.remote]\nkind = "external"\nurl = "http://10.0.0.1:8080"\n')
    mixed = config.load(str(path), {}, check_files=False).config
    assert served_models(mixed) == "3 models: qwen, llama, remote via llama-server, external"
    single = config.load(None, {"MODEL_PATH": "/m/q.gguf"}, check_files=False).config
    assert served_models(single) == "model /m/q.gguf via llama-server"
    none = config.load(None, {}, {"backend.kind": "none", "scale_from_zero.enabled": "true"},
                       check_files=False).config
    assert served_models(none) == "no model via none"


# --- make setup: pip only when what it installs changed ----------------------------------------


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A checkout's files as the install script hashes them, and a venv whose pip only counts its runs."""
    for name in ("setup.cfg", "pyproject.toml", "llamad/__init__.py", "llamad/tap.py", "twisted/plugins/p.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(f"# {name}\n")
    pip = tmp_path / ".venv" / "bin" / "pip"
    pip.parent.mkdir(parents=True)
    pip.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/../pip-runs"\ntouch "$(dirname "$0")/llamad"\n'
                   'chmod +x "$(dirname "$0")/llamad"\n[ ! -e "$(dirname "$0")/../fail" ]\n')
    pip.chmod(0o755)
    return tmp_path


def install(checkout: Path, spec: str = ".[client]") -> int:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install-llamad.sh"), ".venv", spec], cwd=checkout,
                          capture_output=True, text=True, timeout=30)
    runs = checkout / ".venv" / "pip-runs"
    return len(runs.read_text().splitlines()) if runs.exists() else 0


def test_pip_runs_only_when_the_sources_or_pins_change(checkout: Path) -> None:
    assert install(checkout) == 1
    assert install(checkout) == 1  # nothing changed: no pip
    (checkout / "llamad" / "__pycache__").mkdir()
    (checkout / "llamad" / "__pycache__" / "tap.cpython-311.pyc").write_bytes(b"\0")
    (checkout / "twisted" / "plugins" / "dropin.cache").write_bytes(b"\0")
    assert install(checkout) == 1  # what running llamad writes is not a source
    (checkout / "llamad" / "tap.py").write_text("# changed\n")
    assert install(checkout) == 2
    (checkout / "setup.cfg").write_text("# a new pin\n")
    assert install(checkout) == 3
    (checkout / "llamad" / "new.py").write_text("")
    assert install(checkout) == 4
    (checkout / "llamad" / "new.py").unlink()
    assert install(checkout) == 5
    assert install(checkout, ".[client,test]") == 6
    (checkout / ".venv" / "bin" / "llamad").unlink()  # llamad uninstalled: installed again
    assert install(checkout, ".[client,test]") == 7
    assert install(checkout, ".[client,test]") == 7


def test_a_failed_install_is_tried_again(checkout: Path) -> None:
    (checkout / ".venv" / "fail").touch()
    assert install(checkout) == 1
    (checkout / ".venv" / "fail").unlink()
    assert install(checkout) == 2
    assert install(checkout) == 2


def test_make_setup_installs_through_the_stamp_and_a_new_venv_forgets_it() -> None:
    dry = subprocess.run(["make", "-n", "setup", "VENV=/nonexistent-venv"], cwd=ROOT, capture_output=True,
                         text=True, timeout=30)
    assert dry.returncode == 0
    assert "rm -f /nonexistent-venv/.llamad-install; python3 -m venv /nonexistent-venv" in dry.stdout
    assert "bash scripts/install-llamad.sh /nonexistent-venv '.[client]'" in dry.stdout
    assert "pip --disable-pip-version-check -q install '.[client]'" not in dry.stdout
