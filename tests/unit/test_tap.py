"""``twistd llamad`` options: every bad setting is one config-error line and exit 2, before any port is bound."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import clean_config_env
from twisted.internet.task import Clock

from llamad import config
from llamad.root import LlamadService
from llamad.tap import Options


@pytest.fixture(autouse=True)
def environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return clean_config_env(tmp_path, monkeypatch)


def parse(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int | str | None, str]:
    with pytest.raises(SystemExit) as info:
        Options().parseOptions(argv)
    return info.value.code, capsys.readouterr().err


def test_good_options_load_the_config(tmp_path: Path) -> None:
    options = Options()
    options.parseOptions(["--set", "backend.parallel=2", "--listen", "tcp:9000"])
    assert options.loaded is not None
    assert (options.loaded.config.backend.parallel, options.loaded.config.api.listen) == (2, "tcp:9000")


@pytest.mark.parametrize("assignment, key", [("foo", "foo"), ("backend.parallel", "backend.parallel"), ("", "--set")])
def test_set_without_equals_is_one_config_error_line(
    assignment: str, key: str, capsys: pytest.CaptureFixture[str],
) -> None:
    assert parse(["--set", assignment], capsys) == (
        2, f"llamad: config error: {key}: --set needs KEY=VALUE, got {assignment!r}\n",
    )


@pytest.mark.parametrize(
    "argv, start",
    [
        (["--set", "auth.enabled=true", "--set", "auth.keys_file={tmp}"], "auth.keys_file: {tmp} is a directory"),
        (["--listen", "unix:"], "api.listen: endpoint 'unix:' has no socket path"),
        (["--health-listen", "tcp:8000"], "health.listen: 'tcp:8000' binds the same port as api.listen"),
        (["--listen", "tcp:8001"], "api.listen: 'tcp:8001' binds the same port as health.listen"),
        (["--listen", "tcp:8000:interface=300.1.1.1"], "api.listen: interface '300.1.1.1' is not an IP address"),
    ],
)
def test_errors_found_only_at_bind_or_reload_time_are_config_errors_now(
    argv: list[str], start: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    code, err = parse([arg.replace("{tmp}", str(tmp_path)) for arg in argv], capsys)
    assert code == 2
    assert err.startswith("llamad: config error: " + start.replace("{tmp}", str(tmp_path)))
    assert err.endswith("(from option)\n") and err.count("\n") == 1


def test_a_failing_reloader_does_not_skip_the_others() -> None:
    done: list[str] = []

    def broken() -> None:
        raise OSError("no")

    root = LlamadService(config.Config(), None, None, Clock())  # type: ignore[arg-type]
    root.reloaders.extend([broken, lambda: done.append("retry")])
    root.reload()
    assert done == ["retry"]

