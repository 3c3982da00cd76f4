"""``llamad`` tools that need no model: ``check-config`` of a template, ``keys`` (rotate, relative
expiry), and ``keys reload`` finding the daemon of a data dir by the PID file it keeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tomllib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fakes import clean_config_env

from llamad import cli, runfiles
from llamad.keys import apikey, auth, keytool

ROOT = Path(__file__).resolve().parents[2]
NOTE = ("note: backend.model: no model configured (set backend.model, MODEL_PATH or MODEL_NAME); "
        "`twistd llamad` will refuse to start without one\n")


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shell with no MODEL_PATH: the data dir in DATA_DIR, llama-server found, a private runtime dir."""
    clean_config_env(tmp_path, monkeypatch)
    monkeypatch.delenv("MODEL_PATH")
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    (tmp_path / "run").mkdir()
    return tmp_path


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def key_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line and not line.startswith("#")]


# --- commands that need no model ------------------------------------------------------


def test_check_config_without_a_model_prints_the_config_and_a_note(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["check-config", "--config", str(ROOT / "etc" / "llamad.toml")], capsys)
    assert code == 0
    assert tomllib.loads(out)["backend"]["model"] == ""
    assert err.endswith(NOTE) and err.count("note:") == 1 and "Traceback" not in err


def test_check_config_without_a_model_still_refuses_any_other_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("PARALLEL", "four")
    code, out, err = run(["check-config"], capsys)
    assert (code, out) == (2, "")
    assert err == "llamad: config error: backend.parallel: expected an integer, got 'four' (from env PARALLEL)\n"


def test_check_config_of_an_external_backend_needs_no_model_and_says_nothing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out, err = run(["check-config", "--set", "backend.kind=external",
                          "--set", "backend.url=http://127.0.0.1:9"], capsys)
    assert (code, err) == (0, "")


def test_keys_generate_and_list_need_no_model(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["keys", "generate", "alice", "--rate", "60", "--expires", "2027-01-01T00:00:00Z"], capsys)
    assert code == 0 and err.startswith("`llamad keys reload` (or SIGHUP) makes a running llamad take the new key")
    secret = out.strip()
    assert key_lines(environment / "api_keys.txt") == [f"alice:{secret}:60:2027-01-01T00:00:00Z"]
    code, out, err = run(["keys", "list"], capsys)
    assert (code, err) == (0, "")
    assert out.startswith("alice\t") and "rate 60/min" in out


@pytest.mark.parametrize("env, name, says", [
    ({}, "api_keys.txt", "and turns auth on for one that started without keys: every request but /ping and /health "
                         "then needs a key (auth.enabled = false or AUTH_ENABLED=false serves without keys)\n"),
    ({}, "api_keys.toml", "and turns auth on for one that started without keys"),
    ({"AUTH_ENABLED": "true"}, "api_keys.txt", "makes a running llamad take the new key\n"),
    ({"AUTH_ENABLED": "false"}, "api_keys.txt",
     "auth.enabled is false (from env AUTH_ENABLED): llamad checks no key until it is true\n"),
])
def test_generate_says_what_makes_a_running_llamad_check_the_key(
    environment: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    env: dict[str, str], name: str, says: str,
) -> None:
    for variable, value in {**env, "AUTH_KEYS_FILE": str(environment / name)}.items():
        monkeypatch.setenv(variable, value)
    code, out, err = run(["keys", "generate", "alice"], capsys)
    assert code == 0 and len(out.split()) == 1  # stdout: the key alone, for KEY=$(llamad keys generate ...)
    assert says in err and err.count("\n") == 1


def test_keys_with_a_bad_config_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[backend]\nparallel = 'four'\n")
    for action in (["list"], ["reload"]):
        code, out, err = run(["keys", "--config", str(bad), *action], capsys)
        assert (code, out) == (2, "")
        assert err == f"llamad: config error: backend.parallel: expected an integer, got 'four' (from {bad})\n"


# --- relative expiry ------------------------------------------------------------------


NOW = datetime(2026, 11, 23, 12, 0, 30, 123456, tzinfo=timezone.utc)


@pytest.mark.parametrize("text, written", [
    ("30d", "2026-12-23T12:00:30Z"), ("24h", "2026-11-24T12:00:30Z"), ("60m", "2026-11-23T13:00:30Z"),
    ("2w", "2026-12-07T12:00:30Z"), (" 1d ", "2026-11-24T12:00:30Z"),
    ("2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z"), ("2027-01-01", "2027-01-01"),
])
def test_expiry_is_iso_8601_or_a_time_from_now(text: str, written: str) -> None:
    assert keytool.expiry(text, NOW) == written
    assert apikey.parse_expiry(written)  # what the keys file can hold


@pytest.mark.parametrize("text", ["0d", "30", "30y", "d30", "-1d", "tomorrow", "2027-13-01"])
def test_a_bad_expiry_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad expiry"):
        keytool.expiry(text, NOW)


@pytest.mark.parametrize("action", [["generate", "alice"], ["rotate", "alice"]])
def test_relative_expires_on_generate_and_rotate(
    environment: Path, action: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    if action[0] == "rotate":
        (environment / "api_keys.txt").write_text("alice:" + "a" * 24 + ":5\n")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    code, out, err = run(["keys", *action, "--expires", "30d"], capsys)
    assert code == 0
    (line,) = key_lines(environment / "api_keys.txt")
    parsed = apikey.parse_line(line)
    assert parsed is not None and parsed[1] == out.strip()
    expires = parsed[0].expires
    assert expires is not None and before + timedelta(days=30) <= expires <= datetime.now(timezone.utc) + \
        timedelta(days=30)
    assert parsed[0].rate_limit == (5 if action[0] == "rotate" else None)


def test_generate_with_a_bad_expiry_writes_nothing(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["keys", "generate", "alice", "--expires", "soon"], capsys)
    assert (code, out) == (2, "")
    assert err.startswith("llamad keys: bad expiry 'soon': use ISO 8601") and err.count("\n") == 1
    assert not (environment / "api_keys.txt").exists()


# --- rotate ---------------------------------------------------------------------------


OLD = "o" * 24


def test_rotate_gives_a_new_secret_and_keeps_rate_expiry_and_comment(
    environment: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = environment / "api_keys.txt"
    path.write_text(f"# team keys\nalice:{OLD}:60:2027-01-01T00:00:00Z  # laptop\nbob:{'b' * 24}\n")
    code, out, err = run(["keys", "rotate", "alice"], capsys)
    assert code == 0
    secret = out.strip()
    assert secret != OLD and apikey.API_KEY.match(secret)
    assert err == "rotated alice: the old key works until the daemon reloads (`llamad keys reload`)\n"
    assert path.read_text() == (f"# team keys\nalice:{secret}:60:2027-01-01T00:00:00Z  # laptop\n"
                                f"bob:{'b' * 24}\n")
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_rotate_with_expires_replaces_the_expiry_only(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = environment / "api_keys.txt"
    path.write_text(f"alice:{OLD}:60:2027-01-01T00:00:00Z\n")
    code, out, _ = run(["keys", "rotate", "alice", "--expires", "2028-06-01T00:00:00Z"], capsys)
    assert code == 0
    assert key_lines(path) == [f"alice:{out.strip()}:60:2028-06-01T00:00:00Z"]


def test_rotate_without_rate_or_expiry(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = environment / "api_keys.txt"
    path.write_text(f"alice:{OLD}\n")
    code, out, _ = run(["keys", "rotate", "alice"], capsys)
    assert code == 0 and key_lines(path) == [f"alice:{out.strip()}"]
    code, out, _ = run(["keys", "rotate", "alice", "--expires", "2w"], capsys)
    assert code == 0
    (line,) = key_lines(path)
    assert line.startswith(f"alice:{out.strip()}::") and apikey.parse_line(line) is not None


def test_rotate_retires_every_old_secret_of_the_id(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = environment / "api_keys.txt"
    path.write_text(f"alice:{OLD}:10\nalice:{'p' * 24}\n")
    code, out, _ = run(["keys", "rotate", "alice"], capsys)
    assert code == 0 and key_lines(path) == [f"alice:{out.strip()}:10"]


def test_rotate_of_an_unknown_id_is_exit_1_and_writes_nothing(
    environment: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = environment / "api_keys.txt"
    path.write_text(f"alice:{OLD}\n")
    code, out, err = run(["keys", "rotate", "carol"], capsys)
    assert (code, out) == (1, "")
    assert err == f"no key with id 'carol' in {path}\n"
    assert path.read_text() == f"alice:{OLD}\n"


def test_generate_of_an_existing_id_points_to_rotate(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (environment / "api_keys.txt").write_text(f"alice:{OLD}\n")
    code, out, err = run(["keys", "generate", "alice"], capsys)
    assert (code, out) == (1, "")
    assert "llamad keys rotate" in err


# --- reload: the daemon of a data dir -------------------------------------------------


@pytest.fixture
def sleeper() -> subprocess.Popen[bytes]:
    """A process that SIGHUP would end: the stand-in for a running llamad (SIGHUP at its default even when the
    suite runs under nohup, which would have it ignored)."""
    proc = subprocess.Popen(["sleep", "60"], preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    yield proc
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def test_reload_with_no_daemon_is_one_line_and_exit_1(environment: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["keys", "reload"], capsys)
    assert (code, out) == (1, "")
    assert err.startswith(f"llamad keys reload: no llamad is running for data dir {environment} ")
    assert err.count("\n") == 1


def test_reload_signals_the_daemon_recorded_for_the_data_dir(
    environment: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str],
) -> None:
    runfiles.record_daemon(str(environment), sleeper.pid)
    code, out, err = run(["keys", "reload"], capsys)
    assert (code, err) == (0, "")
    assert out == f"sent SIGHUP to llamad pid {sleeper.pid} (data dir {environment})\n"
    assert sleeper.wait(10) == -signal.SIGHUP


def test_reload_finds_the_data_dir_of_the_config(
    tmp_path: Path, sleeper: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    other = tmp_path / "other"
    config = tmp_path / "other.toml"
    config.write_text(f'data_dir = "{other}"\n')
    runfiles.record_daemon(str(other), sleeper.pid)
    assert run(["keys", "reload"], capsys)[0] == 1  # DATA_DIR's daemon: none
    assert sleeper.poll() is None
    monkeypatch.delenv("DATA_DIR")  # it would win over the file's data_dir
    code, out, _ = run(["keys", "--config", str(config), "reload"], capsys)
    assert code == 0 and sleeper.wait(10) == -signal.SIGHUP


def test_reload_never_signals_a_recycled_pid(
    environment: Path, sleeper: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str],
) -> None:
    record = runfiles.record_for(sleeper.pid)
    assert record is not None
    # The recorded process started at another time: this PID now belongs to someone else.
    runfiles.ensure_private_dir(runfiles.runtime_dir(str(environment)))
    runfiles.write_record(runfiles.daemon_record_path(str(environment)),
                          runfiles.ChildRecord(sleeper.pid, record.start_time - 1, record.boot_id))
    code, out, err = run(["keys", "reload"], capsys)
    assert (code, out) == (1, "")
    assert "no llamad is running" in err
    assert sleeper.poll() is None


def test_reload_pid_of_no_process_is_one_line_and_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait()
    code, out, err = run(["keys", "reload", "--pid", str(proc.pid)], capsys)
    assert (code, out) == (1, "")
    assert err == f"llamad keys reload: cannot signal pid {proc.pid}: No such process\n"


def test_forget_daemon_keeps_the_record_of_another_process(environment: Path) -> None:
    runfiles.record_daemon(str(environment), os.getppid())
    runfiles.forget_daemon(str(environment))  # not ours: a later llamad of the same data dir
    record = runfiles.read_record(runfiles.daemon_record_path(str(environment)))
    assert record is not None and record.pid == os.getppid()
    runfiles.record_daemon(str(environment))
    runfiles.forget_daemon(str(environment))
    assert not os.path.exists(runfiles.daemon_record_path(str(environment)))


# --- a TOML keys file, conversion, and usage from the access log ------------------------------------


def test_toml_keys_are_generated_with_a_policy_rotated_and_revoked(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from llamad.keys import keysfile

    path = tmp_path / "keys.toml"
    path.write_text("# team keys\n")
    code, out, err = run(["keys", "-f", str(path), "generate", "team-a", "--models", "qwen-*,llama",
                          "--tokens-per-minute", "1000", "--max-concurrent", "2", "--rate", "60"], capsys)
    assert code == 0 and err == (f"llamad reads {tmp_path / 'api_keys.txt'} (auth.keys_file, from derived from "
                                 f"data_dir), not {path}: set auth.keys_file or AUTH_KEYS_FILE to use this file\n")
    secret = out.strip()
    code, out, err = run(["keys", "-f", str(path), "generate", "ops", "--role", "admin", "--hash-only"], capsys)
    assert code == 0 and "shown" in err
    assert path.read_text().startswith("# team keys\n") and oct(path.stat().st_mode & 0o777) == "0o600"
    entries, warnings = keysfile.read_toml_keys(str(path))
    a, ops = (e.key for e in entries)
    assert warnings == [] and entries[0].secret == secret and entries[1].secret == ""
    assert (a.models, a.tokens_per_minute, a.max_concurrent, a.rate_limit) == (("qwen-*", "llama"), 1000, 2, 60)
    assert ops.roles == {"admin"} and ops.digest == apikey.digest_of(out.strip())
    code, out, _ = run(["keys", "-f", str(path), "rotate", "team-a", "--expires", "2030-01-01T00:00:00Z"], capsys)
    entries, _ = keysfile.read_toml_keys(str(path))
    assert code == 0 and entries[0].secret == out.strip() != secret
    assert entries[0].key.max_concurrent == 2 and entries[0].key.expires.year == 2030
    code, out, _ = run(["keys", "-f", str(path), "list"], capsys)
    assert code == 0 and "team-a" in out and "models qwen-*,llama" in out and "sha256" in out
    code, out, _ = run(["keys", "-f", str(path), "revoke", "team-a"], capsys)
    assert code == 0 and [e.key.key_id for e in keysfile.read_toml_keys(str(path))[0]] == ["ops"]
    assert path.read_text().startswith("# team keys\n")


def test_a_policy_option_on_a_line_file_names_the_way_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "api_keys.txt"
    code, out, err = run(["keys", "-f", str(path), "generate", "a", "--models", "qwen"], capsys)
    assert code == 2 and "--models need a .toml keys file" in err and "llamad keys convert" in err
    assert not path.exists()


def test_convert_writes_the_other_format_and_refuses_what_lines_cannot_hold(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    lines_path = tmp_path / "api_keys.txt"
    lines_path.write_text("alice:" + "a" * 20 + ":60\nbob:" + "b" * 20 + "\n")
    code, out, err = run(["keys", "-f", str(lines_path), "convert"], capsys)
    assert code == 0 and "api_keys.toml" in out
    toml_path = tmp_path / "api_keys.toml"
    store = auth.KeyStore()
    assert store.load(str(toml_path)) == [] and sorted(store.by_id) == ["alice", "bob"]
    assert store.by_id["alice"].rate_limit == 60
    code, out, err = run(["keys", "-f", str(lines_path), "convert"], capsys)
    assert code == 1 and "exists" in err
    back = tmp_path / "back.txt"
    code, out, err = run(["keys", "-f", str(toml_path), "convert", "--out", str(back)], capsys)
    assert code == 0 and back.read_text() == lines_path.read_text()
    code, out, err = run(["keys", "-f", str(toml_path), "generate", "carol", "--max-concurrent", "1"], capsys)
    code, out, err = run(["keys", "-f", str(toml_path), "convert", "--out", str(back), "--force"], capsys)
    assert code == 1 and "key carol has a policy" in err and back.read_text() == lines_path.read_text()


def test_usage_sums_the_access_log_per_key_and_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from llamad.keys.access import access_line

    logs = tmp_path / "logs" / "access"  # DATA_DIR is tmp_path
    logs.mkdir(parents=True)
    old = access_line(1795000000.0, "a", "qwen", "/v1/chat/completions", 200, 10, 5, 1.0, 0.1, 0.0, None)
    (logs / "20261118T110000Z_access_host.log").write_bytes(old)
    lines = [access_line(1795100000.0, "a", "qwen", "/v1/chat/completions", 200, 3, 4, 1.0, 0.1, 0.0, None),
             access_line(1795100001.0, "b", "llama", "/v1/completions", 429, 0, 0, 0.0, None, None, None),
             b"not json\n"]
    (logs / "latest.txt").write_bytes(b"".join(lines))
    code, out, err = run(["keys", "usage", "--json"], capsys)
    rows = {(r["key_id"], r["model"]): r for r in json.loads(out)["usage"]}
    assert code == 0 and "not a JSON line" in err
    assert (rows[("a", "qwen")]["requests"], rows[("a", "qwen")]["total_tokens"]) == (2, 22)
    assert (rows[("b", "llama")]["errors"], rows[("b", "llama")]["total_tokens"]) == (1, 0)
    code, out, err = run(["keys", "usage", "--since", "2026-11-19T00:00:00Z", "--json"], capsys)
    assert [r["prompt_tokens"] for r in json.loads(out)["usage"] if r["key_id"] == "a"] == [3]
    code, out, err = run(["keys", "usage"], capsys)
    assert code == 0 and out.splitlines()[0].split() == ["KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT",
                                                          "COMPLETION", "TOTAL"]
    code, out, err = run(["keys", "usage", "--since", "yesterday"], capsys)
    assert code == 2 and "bad --since" in err


def test_revoking_the_last_toml_key_empties_the_file_and_an_inline_table_is_left_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[keys.only]\nkey = "' + "o" * 20 + '"\n')
    code, out, err = run(["keys", "-f", str(path), "revoke", "only"], capsys)
    assert code == 0 and auth.KeyStore().load(str(path)) == [] and "only" not in path.read_text()
    path.write_text('keys = {inline = {key = "' + "i" * 20 + '"}}\n')
    code, out, err = run(["keys", "-f", str(path), "revoke", "inline"], capsys)
    assert code == 1 and "edit it by hand" in err and "inline" in path.read_text()


def test_a_key_starting_with_a_dash_is_given_as_key_equals() -> None:
    """Keys of other origins may start with '-'; ``--key=KEY`` passes them, as the option's help says."""
    from llamad.cli import parser

    args = parser().parse_args(["keys", "reload", "--url", "http://127.0.0.1:8000", "--key=-starts-with-a-dash"])
    assert args.key == "-starts-with-a-dash"
