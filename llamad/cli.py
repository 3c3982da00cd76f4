"""The ``llamad`` console script: tools around the daemon (``twistd llamad`` runs it)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING

from llamad import config as config_module
from llamad import runfiles
from llamad.config import ConfigError

if TYPE_CHECKING:
    from llamad.auth import KeyLine

# --expires as a time from now: 30d, 24h, 60m, 2w.
RELATIVE_EXPIRY = re.compile(r"^(\d+)([mhdw])$")
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
EXPIRES_HELP = "ISO 8601 (e.g. 2027-01-01T00:00:00Z, a naive time is UTC) or from now: 30d, 24h, 60m, 2w"


def check_config(args: argparse.Namespace) -> int:
    """Print the effective config; one that names no model is printed too, with a note (it may be a template)."""
    try:
        overrides = dict(_assignment(a) for a in args.set)
        loaded = config_module.load(args.config, os.environ, overrides, check_files=not args.no_file_checks,
                                    require_model=False)
    except ConfigError as e:
        print(f"llamad: config error: {e}", file=sys.stderr)
        return 2
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(config_module.render(loaded))
    missing = config_module.missing_model(loaded)
    if missing is not None:
        print(f"note: {missing}; `twistd llamad` will refuse to start without one", file=sys.stderr)
    return 0


def tool_config(args: argparse.Namespace) -> config_module.Config:
    """The config as the ``keys`` commands need it: data dir and keys file, never a model or a binary."""
    return config_module.load(args.config, os.environ, {}, check_files=False, require_model=False).config


def expiry(text: str, now: datetime | None = None) -> str:
    """An ``--expires`` value as the keys file holds it: ISO 8601 as given, or now + 30d / 24h / 60m / 2w in UTC."""
    relative = RELATIVE_EXPIRY.match(text.strip())
    if relative is None:
        from llamad import auth

        try:
            auth.parse_expiry(text)
        except ValueError:
            raise ValueError(f"bad expiry {text!r}: use ISO 8601 (e.g. 2027-01-01T00:00:00Z) or a time from now "
                             "(30d, 24h, 60m, 2w)") from None
        return text.strip()
    amount = int(relative.group(1))
    if amount <= 0:
        raise ValueError(f"bad expiry {text!r}: a time from now must be > 0")
    when = (now or datetime.now(timezone.utc)) + timedelta(**{_UNITS[relative.group(2)]: amount})
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def demo_model(args: argparse.Namespace) -> int:
    from llamad.demo import write_demo_model

    if os.path.exists(args.path) and not args.force:
        print(f"{args.path} exists (use --force to overwrite)", file=sys.stderr)
        return 0
    print(write_demo_model(args.path))
    return 0


def _keys_file(args: argparse.Namespace) -> str:
    if args.file:
        return str(args.file)
    return tool_config(args).auth.keys_file


def keys(args: argparse.Namespace) -> int:
    """Manage the API keys file (atomic rewrites, mode 0600), or ask a daemon to reload it."""
    from llamad import auth

    if args.action == "reload":
        return _reload(args)
    try:
        path = _keys_file(args)
    except ConfigError as e:
        print(f"llamad: config error: {e}", file=sys.stderr)
        return 2
    try:
        lines, warnings = auth.read_key_file(path)
    except FileNotFoundError:
        lines, warnings = [], []
    except (OSError, ValueError) as e:
        print(f"llamad keys: cannot read {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    ids = {line.key.key_id for line in lines if line.key is not None}
    if args.action == "list":
        for line in lines:
            if line.key is None:
                continue
            key = line.key
            rate = f"{key.rate_limit}/min" if key.rate_limit else "unlimited"
            expires = key.expires.isoformat() if key.expires else "never"
            print(f"{key.key_id}\t{line.secret[:4]}...{line.secret[-2:]}\trate {rate}\texpires {expires}")
        return 0
    if args.action in ("generate", "rotate"):
        if args.action == "generate" and args.id in ids:
            print(f"key id {args.id!r} already exists in {path} (use `llamad keys rotate` for a new secret)",
                  file=sys.stderr)
            return 1
        if args.action == "rotate" and args.id not in ids:
            print(f"no key with id {args.id!r} in {path}", file=sys.stderr)
            return 1
        secret = auth.new_secret()
        try:
            expires = expiry(args.expires) if args.expires else None
            if args.action == "generate":
                entry = _entry(args.id, secret, args.rate or None, expires)
                new_lines = [line.text for line in lines] + [entry]
            else:
                entry, new_lines = _rotated(lines, args.id, secret, expires)
            auth.parse_line(entry)  # refuse a bad id, rate or date before writing
        except ValueError as e:
            print(f"llamad keys: {e}", file=sys.stderr)
            return 2
        if not _write(path, new_lines):
            return 1
        print(secret)
        if args.action == "rotate":
            print(f"rotated {args.id}: the old key works until the daemon reloads (`llamad keys reload`)",
                  file=sys.stderr)
        return 0
    # revoke
    if args.id not in ids:
        print(f"no key with id {args.id!r} in {path}", file=sys.stderr)
        return 1
    if not _write(path, [line.text for line in lines if line.key is None or line.key.key_id != args.id]):
        return 1
    print(f"revoked {args.id}; send SIGHUP or run `llamad keys reload` to apply it to a running daemon")
    return 0


def _entry(key_id: str, secret: str, rate: int | None, expires: str | None) -> str:
    """One keys-file line: ``key_id:api_key[:rate_limit_per_min][:expiry_iso]``."""
    fields = [key_id, secret]
    if rate or expires:
        fields.append(str(rate or ""))
    if expires:
        fields.append(expires)
    return ":".join(fields)


def _rotated(lines: list[KeyLine], key_id: str, secret: str, expires: str | None) -> tuple[str, list[str]]:
    """The file with ``key_id``'s secret replaced: its rate, expiry (unless ``expires``) and comment kept.

    Other lines with the same id (a hand-edited file) go: each holds an old
    secret that rotating means to retire.
    """
    out: list[str] = []
    entry = ""
    for line in lines:
        if line.key is None or line.key.key_id != key_id:
            out.append(line.text)
        elif not entry:
            body, hash_, comment = line.text.partition("#")
            rest = body.strip().split(":", 2)[2:]  # "rate[:expiry]" as written, or nothing
            if expires is None:
                entry = ":".join([key_id, secret, *rest])
            else:
                entry = _entry(key_id, secret, line.key.rate_limit, expires)
            out.append(entry + (f"  #{comment}" if hash_ else ""))
    return entry, out


def _write(path: str, lines: list[str]) -> bool:
    """Rewrite the keys file; False (and one line on stderr) if the file system refuses."""
    from llamad import auth

    try:
        auth.write_key_file(path, lines)
    except OSError as e:
        print(f"llamad keys: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def _reload(args: argparse.Namespace) -> int:
    """SIGHUP to the llamad of the config's data dir (or to --pid), or POST /admin/reload at --url."""
    if args.pid:
        return _sighup(args.pid, f"{args.pid}")
    if args.url:
        return _reload_url(args.url, args.key or os.environ.get("LLAMAD_API_KEY", ""))
    try:
        data_dir = os.path.abspath(tool_config(args).data_dir)
    except ConfigError as e:
        print(f"llamad: config error: {e}", file=sys.stderr)
        return 2
    # The record holds the daemon's start time: a PID that was recycled is never signalled.
    record = runfiles.running_daemon(data_dir)
    if record is None:
        print(f"llamad keys reload: no llamad is running for data dir {data_dir} "
              "(give --config or DATA_DIR as the daemon has them, or use --pid or --url)", file=sys.stderr)
        return 1
    return _sighup(record.pid, f"llamad pid {record.pid} (data dir {data_dir})")


def _sighup(pid: int, what: str) -> int:
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        print(f"llamad keys reload: cannot signal pid {pid}: {e.strerror or e}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to {what}")
    return 0


def _reload_url(url: str, key: str) -> int:
    """POST /admin/reload on a daemon's API."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + "/admin/reload", data=b"", method="POST",
                                     headers={"authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            print(response.read().decode())
        return 0
    except urllib.error.HTTPError as e:
        print(f"reload refused: {e.code} {e.read().decode(errors='replace')}", file=sys.stderr)
    except OSError as e:
        print(f"reload failed: {e}", file=sys.stderr)
    return 1


def _assignment(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(key.strip() or "--set", f"--set needs KEY=VALUE, got {text!r}")
    return key.strip(), value


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamad", description="llamad tools. Run the daemon with: twistd -n llamad")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("check-config", help="print the effective config and where each value came from")
    c.add_argument("--config", "-c", help="TOML file (default: /etc/llamad/llamad.toml if it exists)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key, as twistd's --set")
    c.add_argument("--no-file-checks", action="store_true", help="don't require the model file and command to exist")
    c.set_defaults(func=check_config)

    d = sub.add_parser("demo-model", help="write the tiny demo GGUF model")
    d.add_argument("path")
    d.add_argument("--force", action="store_true", help="overwrite an existing file")
    d.set_defaults(func=demo_model)

    k = sub.add_parser("keys", help="manage the API keys file, or make a running daemon reload it")
    k.add_argument("--config", "-c", help="config whose auth.keys_file and data_dir to use (read as twistd llamad "
                                          "reads it, environment included; no model needed)")
    k.add_argument("--file", "-f", help="the keys file (default: auth.keys_file from the config)")
    actions = k.add_subparsers(dest="action", required=True)
    g = actions.add_parser("generate", help="add a new key and print it")
    g.add_argument("id", help="key id: letters, digits, '_' and '-'")
    g.add_argument("--rate", type=int, default=0, help="requests per minute (default: unlimited)")
    g.add_argument("--expires", help=EXPIRES_HELP)
    ro = actions.add_parser("rotate", help="give an existing key a new secret (rate and expiry kept) and print it")
    ro.add_argument("id")
    ro.add_argument("--expires", help=EXPIRES_HELP + " (default: keep the key's expiry)")
    actions.add_parser("list", help="list key ids, rate limits and expiries")
    r = actions.add_parser("revoke", help="remove a key")
    r.add_argument("id")
    rl = actions.add_parser("reload", help="make a running daemon re-read the keys file",
                            description="Send SIGHUP to the llamad serving the config's data dir "
                                        "(--config, DATA_DIR), found by the PID file it keeps; or use --pid or --url.")
    rl.add_argument("--pid", type=int, help="send SIGHUP to this twistd PID instead")
    rl.add_argument("--url", help="POST /admin/reload here instead, e.g. http://127.0.0.1:8000")
    rl.add_argument("--key", help="a valid API key for --url (default: $LLAMAD_API_KEY)")
    k.set_defaults(func=keys)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:  # a config problem is one line, never a traceback
        print(f"llamad: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
