"""The ``llamad`` console script: tools around the daemon (``twistd llamad`` runs it)."""

from __future__ import annotations

import argparse
import os
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
