"""``llamad models``: the router API of a running llamad as a table, against a real HTTP server on loopback."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import pytest
from fakes import clean_config_env

from llamad import cli
from llamad.gateway import models_api
from llamad.fleet.fleet import BackendState, ModelSnapshot

GIB = 1024 ** 3


def entry(model_id: str, state: BackendState, **facts: Any) -> dict[str, Any]:
    """One ``data`` element exactly as llamad's fleet answers it."""
    return models_api.model_entry(ModelSnapshot(id=model_id, state=state, path=f"/m/{model_id}.gguf",
                                                           created=1, **facts))


class Api:
    """Canned answers by (method, path), and every request seen (headers and JSON body)."""

    def __init__(self) -> None:
        self.answers: dict[tuple[str, str], tuple[int, Any]] = {}
        self.seen: list[dict[str, Any]] = []


def handler_for(api: Api) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            raw = self.rfile.read(length) if length else b""
            api.seen.append({"method": self.command, "path": self.path,
                             "authorization": self.headers.get("authorization"),
                             "body": json.loads(raw) if raw else None})
            status, body = api.answers.get((self.command, self.path), (404, {"error": {
                "code": 404, "message": "File Not Found", "type": "not_found_error"}}))
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = answer

        def log_message(self, format: str, *args: Any) -> None:  # keep pytest's output clean
            pass

    return Handler


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No MODEL_PATH (the command needs none), no stray key in the environment."""
    clean_config_env(tmp_path, monkeypatch)
    monkeypatch.delenv("MODEL_PATH")
    monkeypatch.delenv("LLAMAD_API_KEY", raising=False)
    return tmp_path


@pytest.fixture()
def server() -> Iterator[tuple[Api, str]]:
    api = Api()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(api))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield api, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(["models", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def fleet_answer() -> dict[str, Any]:
    now = time.time()
    return {"object": "list", "data": [
        entry("qwen", "ready", memory_need=GIB, last_used=now - 12, in_flight=2, queued=1, pid=4242),
        entry("embed", "stopped"),
        entry("big", "failed", reason="exited with status 1", exit_code=1),
    ]}


# --- list -------------------------------------------------------------------------------


def test_list_prints_one_line_per_model(server: tuple[Api, str], capsys: pytest.CaptureFixture[str]) -> None:
    api, url = server
    api.answers[("GET", "/models")] = (200, fleet_answer())
    code, out, err = run(["--url", url], capsys)
    assert (code, err) == (0, "")
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "MEMORY", "IN", "FLIGHT", "QUEUED", "LAST", "USED", "REASON"]
    assert rows[0].split() == ["qwen", "ready", "1.0", "GiB", "2", "1", "12", "s", "ago"]
    assert rows[1].split() == ["embed", "stopped", "-", "0", "0", "never"]
    assert rows[2].split()[:6] == ["big", "failed", "-", "0", "0", "never"]
    assert rows[2].endswith("  exited with status 1")
    assert header.index("STATE") == rows[0].index("ready") == rows[2].index("failed")  # columns line up
    assert api.seen == [{"method": "GET", "path": "/models", "authorization": None, "body": None}]


def test_list_action_and_no_reason_column_when_none_has_one(
    server: tuple[Api, str], capsys: pytest.CaptureFixture[str],
) -> None:
    api, url = server
    api.answers[("GET", "/models")] = (200, {"object": "list", "data": [entry("qwen", "stopped")]})
    code, out, err = run(["list", "--url", url], capsys)
    assert (code, err) == (0, "")
    assert out.splitlines()[0].split()[-2:] == ["LAST", "USED"]


def test_json_prints_the_answer_as_is(server: tuple[Api, str], capsys: pytest.CaptureFixture[str]) -> None:
    api, url = server
    api.answers[("GET", "/models")] = (200, fleet_answer())
    code, out, err = run(["--url", url, "--json"], capsys)
    assert (code, err) == (0, "")
    assert json.loads(out)["data"][0]["llamad"]["pid"] == 4242


def test_a_single_model_llamad_says_so_with_the_ids(
    server: tuple[Api, str], capsys: pytest.CaptureFixture[str],
) -> None:
    """One model: /models is the child llama-server's own answer, with no llamad object."""
    api, url = server
    api.answers[("GET", "/models")] = (200, {
        "models": [{"name": "m.gguf", "model": "m.gguf"}], "object": "list",
        "data": [{"id": "m.gguf", "object": "model", "owned_by": "llamacpp", "meta": {"n_ctx_train": 2048}}]})
    code, out, err = run(["--url", url], capsys)
    assert (code, err) == (0, "")
    assert out == "this llamad serves one model (no fleet to load or unload): m.gguf\n"


def test_key_is_sent_as_bearer_from_the_option_or_the_environment(
    server: tuple[Api, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    api, url = server
    api.answers[("GET", "/models")] = (200, fleet_answer())
    assert run(["--url", url, "--key", "sk-option"], capsys)[0] == 0
    monkeypatch.setenv("LLAMAD_API_KEY", "sk-env")
    assert run(["list", "--url", url], capsys)[0] == 0
    assert [seen["authorization"] for seen in api.seen] == ["Bearer sk-option", "Bearer sk-env"]


def test_a_refused_key_is_the_servers_message_and_exit_1(
    server: tuple[Api, str], capsys: pytest.CaptureFixture[str],
) -> None:
    api, url = server
    api.answers[("GET", "/models")] = (401, {"error": {"message": "invalid API key", "type": "authentication_error",
                                                       "code": "invalid_api_key", "param": None}})
    code, out, err = run(["--url", url], capsys)
    assert (code, out) == (1, "")
    assert err == "llamad models: GET /models: 401: invalid API key\n"


# --- load and unload --------------------------------------------------------------------


def test_load_success(server: tuple[Api, str], capsys: pytest.CaptureFixture[str]) -> None:
    api, url = server
    api.answers[("POST", "/models/load")] = (200, {"success": True})
    code, out, err = run(["load", "qwen", "--url", url], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("loading qwen ") and out.count("\n") == 1
    assert api.seen[0]["body"] == {"model": "qwen"}


def test_load_error_is_the_servers_message(server: tuple[Api, str], capsys: pytest.CaptureFixture[str]) -> None:
    api, url = server
    api.answers[("POST", "/models/load")] = (400, {"error": {
        "code": 400, "message": "model is already running", "type": "invalid_request_error"}})
    code, out, err = run(["--url", url, "load", "qwen"], capsys)
    assert (code, out) == (1, "")
    assert err == "llamad models: POST /models/load: 400: model is already running\n"
    api.answers[("POST", "/models/load")] = (404, {"error": {
        "code": 404, "message": "model is not found", "type": "not_found_error"}})
    code, out, err = run(["--url", url, "load", "nope"], capsys)
    assert (code, err) == (1, "llamad models: POST /models/load: 404: model is not found\n")


def test_unload_sends_force_only_when_asked(server: tuple[Api, str], capsys: pytest.CaptureFixture[str]) -> None:
    api, url = server
    api.answers[("POST", "/models/unload")] = (200, {"success": True})
    code, out, err = run(["unload", "qwen", "--url", url], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("unloading qwen ") and "cut" not in out
    code, out, err = run(["unload", "qwen", "--force", "--url", url, "--key", "sk-1"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("unloading qwen now") and out.count("\n") == 1
    assert [seen["body"] for seen in api.seen] == [{"model": "qwen", "force": False}, {"model": "qwen", "force": True}]
    assert api.seen[1]["authorization"] == "Bearer sk-1"


def test_unload_error_is_the_servers_message(server: tuple[Api, str], capsys: pytest.CaptureFixture[str]) -> None:
    api, url = server
    api.answers[("POST", "/models/unload")] = (400, {"error": {
        "code": 400, "message": "model is not running", "type": "invalid_request_error"}})
    code, out, err = run(["unload", "embed", "--url", url], capsys)
    assert (code, out) == (1, "")
    assert err == "llamad models: POST /models/unload: 400: model is not running\n"


def test_an_error_that_is_not_json_is_shown_in_one_line(
    server: tuple[Api, str], capsys: pytest.CaptureFixture[str],
) -> None:
    api, url = server
    api.answers[("POST", "/models/unload")] = (502, b"<html>\n<body>Bad Gateway</body>\n</html>\n")
    code, out, err = run(["unload", "embed", "--url", url], capsys)
    assert (code, out) == (1, "")
    assert err == "llamad models: POST /models/unload: 502: <html> <body>Bad Gateway</body> </html>\n"


# --- where the daemon is ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_no_daemon_answering_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for argv in (["--url", url], ["load", "qwen", "--url", url], ["unload", "qwen", "--url", url]):
        code, out, err = run(argv, capsys)
        assert (code, out) == (1, "")
        assert err.startswith(f"llamad models: no llamad answers at {url} (") and err.count("\n") == 1


def test_the_url_comes_from_the_configs_api_listen(
    server: tuple[Api, str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    api, url = server
    api.answers[("GET", "/models")] = (200, fleet_answer())
    port = url.rsplit(":", 1)[1]
    config = tmp_path / "llamad.toml"
    config.write_text(f'[api]\nlisten = "tcp:{port}:interface=127.0.0.1"\n[health]\nlisten = "tcp:{free_port()}"\n')
    code, out, err = run(["--config", str(config)], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("ID ")
    api.answers[("POST", "/models/load")] = (200, {"success": True})
    assert run(["load", "qwen", "--config", str(config)], capsys)[0] == 0
    assert [seen["path"] for seen in api.seen] == ["/models", "/models/load"]


def test_a_unix_socket_api_needs_url_and_a_bad_config_is_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    config = tmp_path / "llamad.toml"
    config.write_text(f'[api]\nlisten = "unix:{tmp_path}/api.sock"\n')
    code, out, err = run(["--config", str(config)], capsys)
    assert (code, out) == (2, "")
    assert "cannot reach" in err and "--url" in err and err.count("\n") == 1
    config.write_text('[api]\nlisten = "carrier-pigeon:8000"\n')
    code, out, err = run(["--config", str(config)], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("llamad: config error: api.listen") and err.count("\n") == 1


@pytest.mark.parametrize(("listen", "url"), [
    ("tcp:8000", "http://127.0.0.1:8000"),
    ("tcp:8000:interface=0.0.0.0", "http://127.0.0.1:8000"),
    ("tcp:port=9000:interface=10.1.2.3", "http://10.1.2.3:9000"),
    (r"tcp6:8000:interface=\:\:1", "http://[::1]:8000"),
    (r"tcp:8000:interface=\:\:", "http://[::1]:8000"),
    ("ssl:8443:privateKey=k.pem", "https://127.0.0.1:8443"),
])
def test_api_url_of_an_endpoint(listen: str, url: str) -> None:
    assert cli.api_url(listen) == url


@pytest.mark.parametrize("listen", ["unix:/run/llamad.sock", "systemd:domain=INET:index=0", "tcp:0"])
def test_api_url_refuses_what_it_cannot_reach(listen: str) -> None:
    with pytest.raises(ValueError, match="--url"):
        cli.api_url(listen)


def test_human_units() -> None:
    assert [cli.human_bytes(n) for n in (0, None, 512, 1536, GIB, 3 * GIB // 2, 2 * 1024 ** 4)] == [
        "-", "-", "512 B", "1.5 KiB", "1.0 GiB", "1.5 GiB", "2.0 TiB"]
    assert [cli.ago(t, 1000.0) for t in (None, 988.0, 1001.0, 1000 - 300, 1000 - 3 * 3600, 1000 - 3 * 86400)] == [
        "never", "12 s ago", "0 s ago", "5 min ago", "3 h ago", "3 d ago"]
