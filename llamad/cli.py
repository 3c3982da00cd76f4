"""The ``llamad`` console script: tools around the daemon (``twistd llamad`` runs it)."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from llamad import config as config_module
from llamad.config import ConfigError


def check_config(args: argparse.Namespace) -> int:
    try:
        overrides = dict(_assignment(a) for a in args.set)
        loaded = config_module.load(args.config, os.environ, overrides, check_files=not args.no_file_checks)
    except ConfigError as e:
        print(f"llamad: config error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(config_module.render(loaded))
    return 0


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
    return config_module.load(args.config, os.environ, {}, check_files=False).config.auth.keys_file


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
    if args.action == "generate":
        if args.id in ids:
            print(f"key id {args.id!r} already exists in {path}", file=sys.stderr)
            return 1
        secret = auth.new_secret()
        fields = [args.id, secret]
        if args.rate or args.expires:
            fields.append(str(args.rate or ""))
        if args.expires:
            fields.append(args.expires)
        entry = ":".join(fields)
        try:
            auth.parse_line(entry)  # refuse a bad id, rate or date before writing
        except ValueError as e:
            print(f"llamad keys: {e}", file=sys.stderr)
            return 2
        if not _write(path, [line.text for line in lines] + [entry]):
            return 1
        print(secret)
        return 0
    # revoke
    if args.id not in ids:
        print(f"no key with id {args.id!r} in {path}", file=sys.stderr)
        return 1
    if not _write(path, [line.text for line in lines if line.key is None or line.key.key_id != args.id]):
        return 1
    print(f"revoked {args.id}; send SIGHUP or run `llamad keys reload` to apply it to a running daemon")
    return 0


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
    """SIGHUP to --pid, or POST /admin/reload on the API."""
    if args.pid:
        os.kill(args.pid, signal.SIGHUP)
        print(f"sent SIGHUP to {args.pid}")
        return 0
    import urllib.error
    import urllib.request

    key = args.key or os.environ.get("LLAMAD_API_KEY", "")
    request = urllib.request.Request(args.url.rstrip("/") + "/admin/reload", data=b"", method="POST",
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
    k.add_argument("--config", "-c", help="config whose auth.keys_file to use")
    k.add_argument("--file", "-f", help="the keys file (default: auth.keys_file from the config)")
    actions = k.add_subparsers(dest="action", required=True)
    g = actions.add_parser("generate", help="add a new key and print it")
    g.add_argument("id", help="key id: letters, digits, '_' and '-'")
    g.add_argument("--rate", type=int, default=0, help="requests per minute (default: unlimited)")
    g.add_argument("--expires", help="ISO 8601 expiry, e.g. 2027-01-01T00:00:00Z")
    actions.add_parser("list", help="list key ids, rate limits and expiries")
    r = actions.add_parser("revoke", help="remove a key")
    r.add_argument("id")
    rl = actions.add_parser("reload", help="make a running daemon re-read the keys file")
    rl.add_argument("--pid", type=int, help="send SIGHUP to this twistd PID")
    rl.add_argument("--url", default="http://127.0.0.1:8000", help="else POST /admin/reload here")
    rl.add_argument("--key", help="a valid API key for /admin/reload (default: $LLAMAD_API_KEY)")
    k.set_defaults(func=keys)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
