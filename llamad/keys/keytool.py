"""``llamad keys`` for a TOML keys file, ``llamad keys convert`` between the two formats, and
``llamad keys usage`` (the access log summed per key and model).

The line format's commands stay in :mod:`llamad.cli`; a TOML file is edited
with :mod:`llamad.keys.keysfile` (tomlkit: comments and layout kept), and every
rewrite goes through :func:`llamad.keys.apikey.write_key_file` (atomic, mode 0600).
"""

from __future__ import annotations

import argparse
import json
import re
import os
import sys
from datetime import datetime, timedelta, timezone
from typing import Any

from llamad.keys import access, apikey, keysfile

POLICY_OPTIONS = ("models", "role", "tokens_per_minute", "tokens_per_day", "max_concurrent", "priority", "hash_only")

RELATIVE_EXPIRY = re.compile(r"^(\d+)([mhdw])$")  # 30d, 24h, 60m, 2w: a time from now (or ago)
_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def policy_options(args: argparse.Namespace) -> list[str]:
    """The policy options given on the command line, as ``--flags``."""
    return [f"--{name.replace('_', '-')}" for name in POLICY_OPTIONS if getattr(args, name, None)]


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return ""


def _write_text(path: str, text: str, toml: bool = True) -> bool:
    """Replace the keys file with ``text`` (a TOML one only if it reads back as TOML)."""
    try:
        if toml:
            keysfile.check_text(text)
        apikey.write_key_file(path, text.rstrip("\n").split("\n") if text.strip() else [])
    except ValueError as e:
        print(f"llamad keys: {e}", file=sys.stderr)
        return False
    except OSError as e:
        print(f"llamad keys: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return False
    return True


def toml_keys(args: argparse.Namespace, path: str, expires: str | None) -> int:
    """generate, rotate, list and revoke on a TOML keys file; ``expires``: --expires, already checked."""
    try:
        text = _read_text(path)
        entries, warnings = keysfile.parse_toml_keys(text, path) if text.strip() else ([], [])
    except (OSError, ValueError, UnicodeDecodeError) as e:
        print(f"llamad keys: cannot read {path}: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    ids = {entry.key.key_id for entry in entries}
    if args.action == "list":
        for entry in entries:
            print(describe(entry))
        return 0
    if args.action in ("rotate", "revoke") and args.id not in ids:
        print(f"no key with id {args.id!r} in {path}", file=sys.stderr)
        return 1
    if args.action == "revoke":
        try:
            remaining = keysfile.remove_table(text, args.id)
        except ValueError as e:
            return _cannot_edit(e)
        if remaining is None:
            return _not_a_table(path, args.id)
        if not _write_text(path, remaining):
            return 1
        print(f"revoked {args.id}; send SIGHUP or run `llamad keys reload` to apply it to a running daemon")
        return 0
    secret = apikey.new_secret()
    if args.action == "generate":
        if args.id in ids:
            print(f"key id {args.id!r} already exists in {path} (use `llamad keys rotate` for a new secret)",
                  file=sys.stderr)
            return 1
        try:
            entry = keysfile.new_entry(
                args.id, secret, rate=args.rate or None, expires=expires,
                models=[m for m in (args.models or "").split(",") if m.strip()] or None,
                role=(args.role.split(",") if args.role and "," in args.role else args.role),
                tokens_per_minute=args.tokens_per_minute, tokens_per_day=args.tokens_per_day,
                max_concurrent=args.max_concurrent, priority=args.priority)
        except ValueError as e:
            print(f"llamad keys: {e}", file=sys.stderr)
            return 2
        try:
            new_text = keysfile.append_table(text, keysfile.toml_table(entry, hash_only=args.hash_only))
        except ValueError as e:
            return _cannot_edit(e)
    else:
        hashed = not next(e for e in entries if e.key.key_id == args.id).secret
        try:
            rotated = keysfile.replace_secret(text, args.id, secret, hashed, expires)
        except ValueError as e:
            return _cannot_edit(e)
        if rotated is None:
            return _not_a_table(path, args.id)
        new_text = rotated
    if not _write_text(path, new_text):
        return 1
    print(secret)
    if args.action == "generate" and args.hash_only:
        print(f"{args.id}: the file holds only its SHA-256; this is the one time the key is shown", file=sys.stderr)
    if args.action == "rotate":
        print(f"rotated {args.id}: the old key works until the daemon reloads (`llamad keys reload`)",
              file=sys.stderr)
    return 0


def _cannot_edit(error: ValueError) -> int:
    """An edit refused before anything was written (the file keeps its old text)."""
    print(f"llamad keys: {error}", file=sys.stderr)
    return 1


def _not_a_table(path: str, key_id: str) -> int:
    print(f"llamad keys: {path} holds {key_id} but not as its own [keys.{key_id}] table (an inline table?); "
          "edit it by hand", file=sys.stderr)
    return 1


def describe(entry: keysfile.KeyEntry) -> str:
    key = entry.key
    secret = f"{entry.secret[:4]}...{entry.secret[-2:]}" if entry.secret else "sha256"
    parts = [key.key_id, secret, "role " + "+".join(r for r in apikey.ROLES if r in key.roles),
             "models " + (",".join(key.models) if key.models else "all"),
             f"rate {key.rate_limit}/min" if key.rate_limit else "rate unlimited"]
    if key.tokens_per_minute:
        parts.append(f"{key.tokens_per_minute} tokens/min")
    if key.tokens_per_day:
        parts.append(f"{key.tokens_per_day} tokens/day")
    if key.max_concurrent:
        parts.append(f"max_concurrent {key.max_concurrent}")
    if key.priority:
        parts.append(f"priority {key.priority}")
    parts.append("expires " + (key.expires.isoformat() if key.expires else "never"))
    return "\t".join(parts)


def convert(args: argparse.Namespace, path: str) -> int:
    """Write the keys file in the other format, next to it (or at --out); the original stays."""
    to_toml = not path.endswith(".toml")
    out = args.out or (os.path.splitext(path)[0] + (".toml" if to_toml else ".txt"))
    if os.path.exists(out) and not args.force:
        print(f"llamad keys convert: {out} exists (use --force to replace it)", file=sys.stderr)
        return 1
    try:
        if to_toml:
            lines, warnings = apikey.read_key_file(path)
            text = keysfile.lines_to_toml(lines)
        else:
            entries, warnings = keysfile.read_toml_keys(path)
            text = "\n".join(keysfile.toml_to_lines(entries)) + "\n"
    except FileNotFoundError:
        print(f"llamad keys convert: {path} not found", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"llamad keys convert: {getattr(e, 'strerror', None) or e}", file=sys.stderr)
        return 1
    for warning in warnings:
        print(f"warning: {warning} (not converted)", file=sys.stderr)
    if not _write_text(out, text, toml=to_toml):
        return 1
    print(f"wrote {out}; set auth.keys_file (AUTH_KEYS_FILE) to it and reload (`llamad keys reload`)")
    return 0


def expiry(text: str, now: datetime | None = None) -> str:
    """An ``--expires`` value as the keys file holds it: ISO 8601 as given, or now + 30d / 24h / 60m / 2w in UTC."""
    relative = RELATIVE_EXPIRY.match(text.strip())
    if relative is None:
        try:
            apikey.parse_expiry(text)
        except ValueError:
            raise ValueError(f"bad expiry {text!r}: use ISO 8601 (e.g. 2027-01-01T00:00:00Z) or a time from now "
                             "(30d, 24h, 60m, 2w)") from None
        return text.strip()
    amount = int(relative.group(1))
    if amount <= 0:
        raise ValueError(f"bad expiry {text!r}: a time from now must be > 0")
    when = (now or datetime.now(timezone.utc)) + timedelta(**{_UNITS[relative.group(2)]: amount})
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def since_time(text: str, now: datetime | None = None) -> str:
    """``--since``: ISO 8601 (a naive time is UTC) or a time ago (30m, 24h, 7d, 2w), as the access log writes times."""
    relative = RELATIVE_EXPIRY.match(text.strip())
    if relative is not None:
        when = (now or datetime.now(timezone.utc)) - timedelta(**{_UNITS[relative.group(2)]: int(relative.group(1))})
    else:
        try:
            when = apikey.parse_expiry(text)
        except ValueError:
            raise ValueError(f"bad --since {text!r}: use ISO 8601 (e.g. 2026-11-01T00:00:00Z) or a time ago "
                             "(30m, 24h, 7d, 2w)") from None
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def usage(args: argparse.Namespace, logs_dir: str) -> int:
    """Requests and tokens per key and model, from the access log (rotated archives included)."""
    try:
        since = since_time(args.since) if args.since else ""
    except ValueError as e:
        print(f"llamad keys usage: {e}", file=sys.stderr)
        return 2
    directory = os.path.join(logs_dir, "access")
    warnings: list[str] = []
    sums = access.usage(directory, since, warnings)
    for warning in warnings[:5]:
        print(f"warning: {warning}", file=sys.stderr)
    if len(warnings) > 5:
        print(f"warning: {len(warnings) - 5} more lines skipped", file=sys.stderr)
    rows: list[dict[str, Any]] = [
        {"key_id": key_id, "model": model, "requests": u.requests, "errors": u.errors,
         "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
         "total_tokens": u.prompt_tokens + u.completion_tokens}
        for (key_id, model), u in sorted(sums.items())]
    if args.json:
        print(json.dumps({"since": since or None, "log": directory, "usage": rows}, indent=2))
        return 0
    if not access.log_files(directory):
        print(f"llamad keys usage: no access log in {directory} (logs.access = false, or no request yet)",
              file=sys.stderr)
        return 1
    header = ("KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL")
    table = [header] + [tuple(str(row[k]) for k in ("key_id", "model", "requests", "errors", "prompt_tokens",
                                                      "completion_tokens", "total_tokens")) for row in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for r in table:
        print("  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))))
    return 0
