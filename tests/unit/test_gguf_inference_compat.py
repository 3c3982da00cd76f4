"""A llama-gguf-inference deployment moved to llamad: its variables, headers, metrics and error codes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from fakes import clean_config_env
from twisted.internet.endpoints import serverFromString
from twisted.internet.task import Clock
from wire import GATEWAY_FIELDS, build, connect, make_gateway, refused, send, server

from llamad import cli, config
from llamad.keys import apikey, auth
from llamad.config import ConfigError
from llamad.gateway.app import api_factory
from llamad.gateway.guard import Auth, Cors
from llamad.logs import instance_name

BASE_ENV = {"DATA_DIR": "/nonexistent-data", "MODEL_PATH": "/models/m.gguf"}
KEY = "k" * 24

# Every variable llama-gguf-inference's start.sh, gateway.py and auth.py read, with what llamad does with it.
THEIR_VARIABLES = {
    "DATA_DIR", "MODEL_PATH", "MODEL_NAME", "MODELS_DIR", "NGL", "CTX", "THREADS", "EXTRA_ARGS", "PORT", "PORT_HEALTH",
    "AUTH_ENABLED", "AUTH_KEYS_FILE", "LOG_DIR", "CORS_ORIGINS", "MAX_REQUEST_BODY_SIZE", "MAX_CONCURRENT_REQUESTS",
    "MAX_QUEUE_SIZE", "REQUEST_TIMEOUT", "CLIENT_HEADER_TIMEOUT", "HEALTH_TIMEOUT", "METRICS_AUTH_ENABLED",
    "MAX_REQUESTS_PER_MINUTE", "MAX_HEADERS", "MAX_HEADER_LINE_SIZE", "MAX_REQUEST_LINE_SIZE", "HOST",
    "GATEWAY_PORT", "LOG_FORMAT", "WORKER_TYPE", "LOG_NAME", "PORT_BACKEND", "BACKEND_PORT", "BACKEND_HOST",
    "BACKEND_API_KEY", "BACKEND_CONNECT_TIMEOUT", "DEBUG_SHELL", "MOCK_BACKEND",
}
# Read elsewhere than config: INSTANCE_ID names the log files; HOSTNAME is the host name llamad reads itself.
NOT_CONFIG = {"INSTANCE_ID", "HOSTNAME"}


def load(env: dict[str, str] | None = None, options: dict[str, Any] | None = None, toml: str = "") -> config.Loaded:
    return config.load(toml, {**BASE_ENV, **(env or {})}, options, check_files=False)


def error(**kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load(**kwargs)
    return str(info.value)


# --- environment variables ----------------------------------------------------------------


def test_every_variable_of_theirs_is_read_or_warned_about() -> None:
    read = set(config.ENV_NAMES)
    ignored = set(config.IGNORED_ENV)
    assert read.isdisjoint(ignored)
    assert THEIR_VARIABLES - NOT_CONFIG <= read | ignored


@pytest.mark.parametrize("name, text, key, value", [
    ("CORS_ORIGINS", "https://a.example,https://b.example", "api.cors_origins",
     ("https://a.example", "https://b.example")),
    ("CORS_ORIGINS", "*", "api.cors_origins", ("*",)),
    ("MAX_REQUEST_BODY_SIZE", "52428800", "api.max_body_bytes", 52428800),
    ("MAX_CONCURRENT_REQUESTS", "2", "admission.max_concurrent", 2),
    ("MAX_QUEUE_SIZE", "20", "admission.max_queue", 20),
    ("REQUEST_TIMEOUT", "300", "api.request_timeout", 300.0),
    ("HEALTH_TIMEOUT", "2", "supervisor.health_timeout", 2.0),
    ("METRICS_AUTH_ENABLED", "true", "auth.protect_metrics", True),
    ("MAX_REQUESTS_PER_MINUTE", "100", "auth.default_rate", 100),
    ("MAX_HEADERS", "32", "api.max_headers", 32),
    ("MAX_HEADER_LINE_SIZE", "4096", "api.max_header_line", 4096),
    ("MAX_REQUEST_LINE_SIZE", "2048", "api.max_request_line", 2048),
    ("LOG_FORMAT", "json", "logs.format", "json"),
    ("LOG_FORMAT", " JSON ", "logs.format", "json"),
    ("LOG_FORMAT", "Text", "logs.format", "text"),
])
def test_their_variables_set_our_keys_in_their_units(name: str, text: str, key: str, value: Any) -> None:
    loaded = load({name: text})
    assert loaded.values[key] == value
    assert loaded.sources[key] == f"env {name}"
    assert loaded.warnings == ()


def test_a_log_format_other_than_text_or_json_is_a_config_error() -> None:
    assert error(env={"LOG_FORMAT": "logfmt"}) == (
        "logs.format: unknown value 'logfmt' (expected one of: text, json) (from env LOG_FORMAT)")


def test_client_header_timeout_bounds_headers_and_body() -> None:
    loaded = load({"CLIENT_HEADER_TIMEOUT": "15"})
    assert (loaded.config.api.header_timeout, loaded.config.api.body_timeout) == (15.0, 15.0)
    assert loaded.sources["api.header_timeout"] == loaded.sources["api.body_timeout"] == "env CLIENT_HEADER_TIMEOUT"


def test_their_unlimited_queue_becomes_a_very_large_bound_and_says_so() -> None:
    loaded = load({"MAX_QUEUE_SIZE": "0"})
    assert loaded.config.admission.max_queue == config.UNLIMITED_QUEUE >= 1_000_000
    assert loaded.sources["admission.max_queue"] == "env MAX_QUEUE_SIZE (0: unlimited, taken as 1000000)"
    line = next(line for line in config.render(loaded).splitlines() if line.startswith("max_queue = "))
    assert line.startswith("max_queue = 1000000 ")
    assert line.endswith("# env MAX_QUEUE_SIZE (0: unlimited, taken as 1000000)")


def test_check_config_shows_each_migrated_value_with_its_variable() -> None:
    env = {"MAX_REQUESTS_PER_MINUTE": "100", "HOST": "127.0.0.1", "MAX_HEADERS": "32", "CORS_ORIGINS": "*"}
    text = config.render(load(env))
    for start, source in [("default_rate = 100", "env MAX_REQUESTS_PER_MINUTE"),
                          ("max_headers = 32", "env MAX_HEADERS"),
                          ('cors_origins = ["*"]', "env CORS_ORIGINS"),
                          ('listen = "tcp:8000:interface=127.0.0.1"', "env HOST")]:
        assert any(line.startswith(start) and line.endswith(f"# {source}") for line in text.splitlines()), start


def test_host_is_the_interface_of_both_tcp_endpoints() -> None:
    loaded = load({"HOST": "127.0.0.1", "PORT": "9000"})
    assert loaded.config.api.listen == "tcp:9000:interface=127.0.0.1"
    assert loaded.config.health.listen == "tcp:8001:interface=127.0.0.1"
    assert loaded.sources["api.listen"] == "env PORT, env HOST"
    assert loaded.sources["health.listen"] == "env HOST"


def test_host_replaces_an_interface_and_an_ipv6_one_is_escaped() -> None:
    loaded = load({"HOST": "::1"}, toml="")
    assert loaded.config.api.listen == "tcp:8000:interface=\\:\\:1"
    assert serverFromString(Clock(), loaded.config.api.listen)._interface == "::1"  # type: ignore[attr-defined]
    loaded = load({"HOST": "0.0.0.0"}, options={"api.listen": "tcp:8000:interface=127.0.0.1"})
    assert loaded.config.api.listen == "tcp:8000:interface=127.0.0.1"  # an option beats the environment
    loaded = load({"HOST": "10.0.0.1"}, options={"health.listen": "unix:/run/h.sock"})
    assert loaded.config.health.listen == "unix:/run/h.sock"  # not a tcp: endpoint, as with PORT


def test_a_host_that_is_not_an_ip_address_is_a_config_error() -> None:
    assert error(env={"HOST": "localhost"}) == (
        "api.listen: interface 'localhost' is not an IP address (from env HOST)")


def test_gateway_port_is_an_alias_of_port_and_port_wins() -> None:
    loaded = load({"GATEWAY_PORT": "9100"})
    assert (loaded.config.api.listen, loaded.sources["api.listen"]) == ("tcp:9100", "env GATEWAY_PORT")
    assert loaded.warnings == ()
    loaded = load({"GATEWAY_PORT": "9100", "PORT": "9200"})
    assert (loaded.config.api.listen, loaded.sources["api.listen"]) == ("tcp:9200", "env PORT")
    assert loaded.warnings == ("GATEWAY_PORT=9100 is ignored: PORT=9200 is set and wins",)


def test_each_variable_without_a_meaning_here_is_one_warning_naming_it() -> None:
    loaded = load({name: "x" for name in config.IGNORED_ENV})
    assert len(loaded.warnings) == len(config.IGNORED_ENV)
    for name, warning in zip(config.IGNORED_ENV, loaded.warnings):
        assert warning == f"{name} is ignored: {config.IGNORED_ENV[name]}"
    assert "BACKEND_PORT is ignored: llamad picks a free loopback port for the child" in loaded.warnings
    assert load({name: "" for name in config.IGNORED_ENV}).warnings == ()  # empty counts as unset


def test_check_config_prints_the_warnings_on_stderr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    clean_config_env(tmp_path, monkeypatch)
    monkeypatch.setenv("BACKEND_PORT", "8080")
    monkeypatch.setenv("MAX_QUEUE_SIZE", "0")
    assert cli.main(["check-config"]) == 0
    out, err = capsys.readouterr()
    assert err == "warning: BACKEND_PORT is ignored: llamad picks a free loopback port for the child\n"
    assert "# env MAX_QUEUE_SIZE (0: unlimited, taken as 1000000)" in out


# --- auth on when a keys file is there --------------------------------------------------------


def test_a_keys_file_turns_auth_on_when_nothing_sets_it(tmp_path: Path) -> None:
    (tmp_path / "api_keys.txt").write_text(f"alice:{KEY}\n")
    loaded = load({"DATA_DIR": str(tmp_path)})
    assert loaded.config.auth.enabled is True
    assert loaded.sources["auth.enabled"] == config.AUTH_AUTO_SOURCE == "default (keys file present)"


@pytest.mark.parametrize("setting", [{"env": {"AUTH_ENABLED": "false"}}, {"toml": "[auth]\nenabled = false\n"},
                                     {"options": {"auth.enabled": "false"}}])
def test_auth_set_off_anywhere_stays_off_with_a_keys_file(tmp_path: Path, setting: dict[str, Any]) -> None:
    (tmp_path / "api_keys.txt").write_text(f"alice:{KEY}\n")
    if "toml" in setting:
        (tmp_path / "llamad.toml").write_text(setting["toml"])
        setting = {"toml": str(tmp_path / "llamad.toml")}
    env = {"DATA_DIR": str(tmp_path), **setting.pop("env", {})}
    loaded = load(env, **setting)
    assert loaded.config.auth.enabled is False and loaded.sources["auth.enabled"] != config.AUTH_AUTO_SOURCE


def test_no_keys_file_leaves_auth_off(tmp_path: Path) -> None:
    loaded = load({"DATA_DIR": str(tmp_path)})
    assert (loaded.config.auth.enabled, loaded.sources["auth.enabled"]) == (False, "default")


def test_a_keys_file_elsewhere_counts_too(tmp_path: Path) -> None:
    keys = tmp_path / "secrets" / "keys.txt"
    keys.parent.mkdir()
    keys.write_text("")
    assert load({"AUTH_KEYS_FILE": str(keys)}).config.auth.enabled is True


def test_a_keys_path_that_is_a_directory_stops_the_boot(tmp_path: Path) -> None:
    """A bind mount of a missing host file makes a directory: the operator meant keys, so no silent auth-off."""
    (tmp_path / "api_keys.txt").mkdir()
    with pytest.raises(ConfigError) as info:
        config.load("", {**BASE_ENV, "DATA_DIR": str(tmp_path)}, None, check_files=True)
    assert str(info.value).startswith(f"auth.keys_file: {tmp_path / 'api_keys.txt'} is a directory")


# --- TOML values in --set and the environment ---------------------------------------------------


@pytest.mark.parametrize("key, text, value", [
    ("api.cors_origins", '["*"]', ("*",)),
    ("api.cors_origins", ' ["https://a.example", "https://b.example"] ', ("https://a.example", "https://b.example")),
    ("api.cors_origins", "[]", ()),
    ("backend.extra_args", '["--jinja", "--chat-template", "a b"]', ("--jinja", "--chat-template", "a b")),
    ("backend.env", '{A = "1", CUDA_VISIBLE_DEVICES = "0,1"}', {"A": "1", "CUDA_VISIBLE_DEVICES": "0,1"}),
    ("backend.env", "{}", {}),
    ("api.cors_origins", "https://a.example, https://b.example", ("https://a.example", "https://b.example")),
    ("backend.extra_args", "--jinja --chat-template 'a b'", ("--jinja", "--chat-template", "a b")),
])
def test_list_and_table_keys_take_toml_from_set_and_env(key: str, text: str, value: Any) -> None:
    assert load(options={key: text}).values[key] == value
    env_name = {"api.cors_origins": "CORS_ORIGINS", "backend.extra_args": "EXTRA_ARGS"}.get(key)
    if env_name:
        assert load({env_name: text}).values[key] == value


@pytest.mark.parametrize("key, text, problem", [
    ("api.cors_origins", '["*"', "api.cors_origins: not a valid TOML value: '[\"*\"'"),
    ("api.cors_origins", "[1, 2]", "api.cors_origins: expected a list of strings, got [1, 2]"),
    ("backend.env", "A=1", "backend.env: expected a TOML inline table, e.g. {A = \"1\"}, got 'A=1'"),
    ("backend.env", "{A = 1}", "backend.env: expected a table of strings, got {'A': 1}"),
    ("backend.env", "{A = ", "backend.env: not a valid TOML value: '{A = '"),
])
def test_what_toml_cannot_parse_is_a_config_error_naming_the_key(key: str, text: str, problem: str) -> None:
    message = error(options={key: text})
    assert message.startswith(problem) and message.endswith("(from option)")


def test_a_bad_toml_list_in_the_environment_names_the_variable() -> None:
    assert error(env={"CORS_ORIGINS": "[https://a.example]"}).startswith(
        "api.cors_origins: not a valid TOML value: '[https://a.example]'")
    assert error(env={"CORS_ORIGINS": "[https://a.example]"}).endswith("(from env CORS_ORIGINS)")


# --- API keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("authorization, x_api_key, key", [
    (b"Bearer " + KEY.encode(), None, KEY),
    (b"bearer  " + KEY.encode() + b" ", None, KEY),
    (KEY.encode(), None, KEY),  # llama-gguf-inference's clients may send the bare key
    (b"  " + KEY.encode() + b"  ", None, KEY),
    (None, KEY.encode(), KEY),
    (b"Bearer", None, None),
    (b"Basic dXNlcjpwYXNz", None, None),
    (b"Basic dXNlcjpwYXNz", KEY.encode(), KEY),
])
def test_presented_key_takes_bearer_bare_and_x_api_key(authorization: bytes | None, x_api_key: bytes | None,
                                                       key: str | None) -> None:
    assert auth.presented_key(authorization, x_api_key) == key


def test_a_bare_authorization_key_is_let_in(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY}\n")
    clock = Clock()
    guard = Auth(True, str(path), False, clock)

    class Request:
        def getHeader(self, name: bytes) -> bytes | None:
            return KEY.encode() if name == b"authorization" else None

    assert guard.check(Request()).key_id == "alice"  # type: ignore[arg-type]


def test_the_default_rate_limits_keys_without_their_own(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"plain:{'p' * 20}\nown:{'o' * 20}:5\n")
    store = auth.KeyStore(default_rate=2)
    store.load(str(path))
    wall = apikey.parse_expiry("2026-01-01T00:00:00")
    assert [type(store.check("p" * 20, 0.0, wall)).__name__ for _ in range(3)] == ["ApiKey", "ApiKey", "Denied"]
    denied = store.check("p" * 20, 1.0, wall)
    assert isinstance(denied, auth.Denied)
    assert (denied.status, denied.message, denied.retry_after) == (
        429, "Rate limit of 2 requests per minute exceeded", 59)
    assert isinstance(store.check("p" * 20, 60.5, wall), apikey.ApiKey)  # the window slid
    assert all(isinstance(store.check("o" * 20, 0.0, wall), apikey.ApiKey) for _ in range(5))  # its own rate wins
    assert isinstance(store.check("o" * 20, 0.0, wall), auth.Denied)


def test_no_default_rate_is_no_limit(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"plain:{'p' * 20}\n")
    store = auth.KeyStore()
    store.load(str(path))
    wall = apikey.parse_expiry("2026-01-01T00:00:00")
    assert all(isinstance(store.check("p" * 20, 0.0, wall), apikey.ApiKey) for _ in range(500))


def test_cors_origins_with_a_trailing_slash_still_match() -> None:
    assert Cors(("https://app.example/",)).allowed(b"https://app.example") == b"https://app.example"


# --- header limits from the config ----------------------------------------------------------------


def test_configured_header_limits_are_enforced() -> None:
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n"
    transport, proxy = send(head + b"".join(b"X-%d: v\r\n" % i for i in range(3)) + b"\r\n", max_headers=3)
    error_ = refused(transport, 431, "header_fields_too_large")
    assert error_["message"] == "more than 3 headers" and proxy.targets == []
    transport, proxy = send(head + b"X-Long: " + b"a" * 200 + b"\r\n\r\n", max_header_line=128)
    assert refused(transport, 431, "header_fields_too_large")["message"] == "a header line over 128 bytes"
    transport, proxy = send(b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: x\r\n\r\n", max_request_line=128)
    assert refused(transport, 414, "uri_too_long")["message"] == "request line over 128 bytes"
    assert proxy.targets == []


def test_each_line_limit_is_its_own() -> None:
    """A long request line under its limit passes a lower header-line limit, and the other way round."""
    transport, proxy = send(b"GET /" + b"a" * 500 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                            max_request_line=1024, max_header_line=128)
    assert transport.value().startswith(b"HTTP/1.1 200 ") and len(proxy.targets) == 1
    transport, proxy = send(b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"a" * 500 + b"\r\n\r\n",
                            max_request_line=128, max_header_line=1024)
    assert transport.value().startswith(b"HTTP/1.1 200 ") and len(proxy.targets) == 1


def test_raised_limits_let_bigger_heads_through() -> None:
    """Over today's 8 KiB lines and 64 headers: the total of 16 KiB grows with the line limits."""
    many = b"".join(b"X-%d: v\r\n" % i for i in range(100))
    transport, proxy = send(b"GET /v1/models HTTP/1.1\r\n" + many + b"X-Long: " + b"a" * 12000 + b"\r\n\r\n",
                            max_headers=128, max_header_line=16384)
    assert transport.value().startswith(b"HTTP/1.1 200 ") and len(proxy.targets) == 1


def test_todays_defaults_hold() -> None:
    factory = api_factory(make_gateway())
    assert (factory.max_headers, factory.max_header_line, factory.max_request_line) == (64, 8192, 8192)
    assert factory.max_head == 16384
    assert config.Config().api.max_headers == 64
    transport, _ = send(b"GET /v1/models HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(65)) + b"\r\n")
    refused(transport, 431, "header_fields_too_large")


def test_the_api_factory_takes_the_limits_from_its_caller() -> None:
    factory = api_factory(make_gateway(), max_headers=5, max_header_line=300, max_request_line=200)
    assert (factory.max_headers, factory.max_header_line, factory.max_request_line) == (5, 300, 200)
    assert factory.max_head == 16384  # the total: at least the two line limits' sum
    factory = api_factory(make_gateway(), max_header_line=16384, max_request_line=8192)
    assert factory.max_head == 16384 + 8192


# --- the JSON view of /metrics ------------------------------------------------------------------------


@pytest.mark.parametrize("accept, is_json", [
    ("application/json", True),
    ("application/json, text/javascript, */*; q=0.01", True),
    (None, False),
    ("*/*", False),
    ("text/plain", False),
    ("text/plain;version=0.0.4;q=0.5,application/json", False),
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", False),
])
@pytest_twisted.ensureDeferred
async def test_metrics_answers_json_only_to_who_asks_for_it(accept: str | None, is_json: bool) -> None:
    http, *_ = build()
    response = await http.get("http://x/metrics", headers={"accept": accept} if accept else {})
    body = await response.content()
    assert response.code == 200
    assert b"accept" in [v.lower() for v in response.headers.getRawHeaders(b"vary")]
    if is_json:
        assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
        assert set(json.loads(body)) == {"gateway"} and set(json.loads(body)["gateway"]) == GATEWAY_FIELDS
    else:
        assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
        assert b"llamad_requests_total" in body


@pytest_twisted.ensureDeferred
async def test_the_json_fields_come_from_llamads_own_counts(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY}\n")
    http, clock, backend, status, metrics, proxy = build(auth=Auth(True, str(path), False, Clock()))
    ok = {"authorization": f"Bearer {KEY}"}
    answers = [
        await http.post("http://x/v1/chat/completions", data=b"{}", headers=ok),
        await http.get("http://x/v1/models", headers={"authorization": KEY}),
        await http.get("http://x/v1/models", headers={"authorization": "Bearer wrong-key-0123456789"}),
        await http.get("http://x/v1/models"),
    ]
    assert [answer.code for answer in answers] == [200, 200, 401, 401]
    sent = sum([len(await answer.content()) for answer in answers])
    metrics.queue_wait.observe(1.25)
    metrics.queue_rejections.labels("queue_full").inc()
    clock.advance(42.9)
    response = await http.get("http://x/metrics", headers={"accept": "application/json"})
    view = json.loads(await response.content())["gateway"]
    assert view == {
        "requests_total": 5,  # two proxied, two refused, and this scrape (counted as it starts)
        "requests_success": 3,
        "requests_error": 2,
        "requests_active": 0,
        "requests_authenticated": 2,
        "requests_unauthorized": 2,
        "bytes_sent": sent,  # the bodies of the four answers before this scrape
        "queue_depth": 0,
        "queue_rejections": 1,
        "queue_wait_seconds_total": 1.25,
        "uptime_seconds": 42,
    }


def test_bytes_sent_adds_each_finished_response_body_once() -> None:
    gateway = make_gateway()
    protocol, transport = connect(server(gateway))
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert gateway.bytes_sent == len(b'{"proxied": true}')
    protocol.dataReceived(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert gateway.bytes_sent == 2 * len(b'{"proxied": true}')


@pytest_twisted.ensureDeferred
async def test_protect_metrics_guards_the_json_view_too(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"alice:{KEY}\n")
    http, *_ = build(auth=Auth(True, str(path), True, Clock()))
    assert (await http.get("http://x/metrics", headers={"accept": "application/json"})).code == 401
    response = await http.get("http://x/metrics", headers={"accept": "application/json", "authorization": KEY})
    assert response.code == 200 and "gateway" in json.loads(await response.content())


# --- log file names --------------------------------------------------------------------------------


@pytest.mark.parametrize("env, name", [
    ({"INSTANCE_ID": "worker-1", "RUNPOD_POD_ID": "pod9"}, "worker-1"),
    ({"RUNPOD_POD_ID": "pod9"}, "pod9"),
    ({"INSTANCE_ID": "a/b c"}, "a_b_c"),  # made safe for a file name, as their start.sh did
])
def test_instance_id_names_the_log_files(monkeypatch: pytest.MonkeyPatch, env: dict[str, str], name: str) -> None:
    for variable in ("INSTANCE_ID", "RUNPOD_POD_ID"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in env.items():
        monkeypatch.setenv(variable, value)
    assert instance_name() == name


def test_without_either_the_host_name_names_them(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    monkeypatch.delenv("INSTANCE_ID", raising=False)
    monkeypatch.delenv("RUNPOD_POD_ID", raising=False)
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu-host.local")
    assert instance_name() == "gpu-host.local"
