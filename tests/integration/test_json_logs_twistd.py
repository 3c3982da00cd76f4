"""``LOG_FORMAT=json`` on a real ``twistd -n llamad``: every line on stdout (stderr with it) and in every
log file is one JSON object with time, level, source and message; a child's lines carry its model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from helpers import wait_for

pytestmark = pytest.mark.integration

REQUIRED = ("time", "level", "source", "message")
STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LEVELS = {"debug", "info", "warn", "error", "critical"}


def json_lines(path: Path, empty: bool = False) -> list[dict]:
    """Every line of ``path``, each checked to be one JSON object with the keys every line has; ``empty``:
    a file with no line passes (a fleet's unused one-model log)."""
    text = path.read_text(encoding="utf-8")
    assert text or empty, f"{path} is empty"
    objects = []
    for number, line in enumerate(text.splitlines(), start=1):
        try:
            obj = json.loads(line)
        except ValueError:
            raise AssertionError(f"{path}:{number}: not JSON: {line!r}") from None
        assert isinstance(obj, dict), f"{path}:{number}: {line!r}"
        missing = [key for key in REQUIRED if key not in obj]
        assert not missing, f"{path}:{number}: no {missing}: {line!r}"
        assert STAMP.match(obj["time"]) and obj["level"] in LEVELS, f"{path}:{number}: {line!r}"
        objects.append(obj)
    return objects


def every_log_file(logs: Path) -> list[Path]:
    """Every file under ``logs.dir`` but ``_boot/latest.txt``, which holds a path."""
    return sorted(p for p in logs.rglob("*") if p.is_file() and p != logs / "_boot" / "latest.txt")


def test_one_model_logs_json_everywhere(start_llamad):
    daemon = start_llamad(env={"LOG_FORMAT": "json"})
    status, _, _ = daemon.request("POST", "/v1/completions", body={"model": "demo", "prompt": "a", "max_tokens": 2})
    assert status == 200
    assert daemon.request("GET", "/metrics")[0] == 200
    logs = daemon.data_dir / "logs"
    wait_for(lambda: (logs / "access" / "latest.txt").stat().st_size > 0, 10, "the access log's lines")
    assert daemon.stop() == 0

    stdout = json_lines(daemon.log_path)
    sources = {line["source"] for line in stdout}
    assert "llamad" in sources and "child" in sources, sources
    child = [line for line in stdout if line["source"] == "child"]
    assert all(line["model"] == "demo" and line["level"] == "info" for line in child)
    assert any("effective config" in line["message"] for line in stdout)

    boot = (logs / "_boot" / "latest.txt").read_text().strip()
    boot_lines = json_lines(Path(boot))
    assert any(line["message"].startswith("backend ready") for line in boot_lines)
    assert all(line["source"] != "child" for line in boot_lines)  # the child's lines have their own file

    llama = json_lines(logs / "llama" / "latest.txt")
    assert all(line["source"] == "child" and line["model"] == "demo" for line in llama)
    assert {line["message"] for line in child} <= {line["message"] for line in llama}

    access = json_lines(logs / "access" / "latest.txt")
    completion = [line for line in access if line["route"] == "/v1/completions"]
    assert completion and completion[0]["source"] == "access" and completion[0]["status"] == 200
    assert completion[0]["message"] == "/v1/completions 200" and completion[0]["model"] == "demo"
    assert completion[0]["completion_tokens"] == 2

    for path in every_log_file(logs):
        json_lines(path, empty=True)


def test_a_fleet_logs_each_models_lines_with_its_id(start_llamad, demo_model):
    tables = "".join(f'[models.{m}]\nmodel = "{demo_model}"\nmemory = "1GiB"\n' for m in ("m1", "m2"))
    daemon = start_llamad(toml=f'[fleet]\nmemory_budget = "2500MiB"\nmin_resident = 0\n{tables}',
                          env={"LOG_FORMAT": "json"}, wait="listening")
    for model in ("m1", "m2"):
        status, _, _ = daemon.request("POST", "/v1/completions", body={"model": model, "prompt": "a", "max_tokens": 2})
        assert status == 200
    assert daemon.request("POST", "/v1/completions", body={"model": "nope", "prompt": "a"})[0] == 404
    logs = daemon.data_dir / "logs"
    wait_for(lambda: (logs / "access" / "latest.txt").stat().st_size > 0, 10, "the access log's lines")
    assert daemon.stop() == 0

    stdout = json_lines(daemon.log_path)
    assert {line["model"] for line in stdout if line["source"] == "child"} == {"m1", "m2"}
    for model in ("m1", "m2"):
        lines = json_lines(logs / "llama" / model / "latest.txt")
        assert lines and all(line["model"] == model and line["source"] == "child" for line in lines)
    access = json_lines(logs / "access" / "latest.txt")
    assert [line["message"] for line in access if line["route"] == "/v1/completions"] == [
        "/v1/completions 200", "/v1/completions 200", "/v1/completions 404"]
    for path in every_log_file(logs):
        json_lines(path, empty=True)
