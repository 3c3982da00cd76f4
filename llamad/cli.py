"""The ``llamad`` console script: tools around the daemon (``twistd llamad`` runs it)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

from llamad import config as config_module
from llamad import runfiles
from llamad.config import ConfigError

if TYPE_CHECKING:
    from llamad.keys.apikey import KeyLine

# --expires as a time from now: 30d, 24h, 60m, 2w.
EXPIRES_HELP = "ISO 8601 (e.g. 2027-01-01T00:00:00Z, a naive time is UTC) or from now: 30d, 24h, 60m, 2w"


def config_error(e: ConfigError) -> int:
    """One line on stderr (a control character in a path or value shown escaped) and exit status 2."""
    from llamad.logs import escape  # only now: the log module brings Twisted's logging

    print(f"llamad: config error: {escape(str(e))}", file=sys.stderr)
    return 2


def check_config(args: argparse.Namespace) -> int:
    """Print the effective config; one that names no model is printed too, with a note (it may be a template)."""
    try:
        overrides = dict(_assignment(a) for a in args.set)
        loaded = config_module.load(args.config, os.environ, overrides, check_files=not args.no_file_checks,
                                    require_model=False)
    except ConfigError as e:
        return config_error(e)
    for warning in loaded.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    sys.stdout.write(config_module.render(loaded))
    missing = config_module.missing_model(loaded)
    if missing is not None:
        print(f"note: {missing}; `twistd llamad` will refuse to start without one", file=sys.stderr)
    return 0


def tool_loaded(args: argparse.Namespace) -> config_module.Loaded:
    """The config as the ``keys`` commands need it: data dir and keys file, never a model or a binary."""
    return config_module.load(args.config, os.environ, {}, check_files=False, require_model=False)


def tool_config(args: argparse.Namespace) -> config_module.Config:
    return tool_loaded(args).config


def _say(note: str) -> None:
    if note:
        print(note, file=sys.stderr)


def after_generate(args: argparse.Namespace, path: str) -> str:
    """What makes a running llamad check the key just written to ``path``: a new user's next step."""
    try:
        loaded = tool_loaded(args)
    except ConfigError:
        return ""
    auth, source = loaded.config.auth, loaded.sources["auth.enabled"]
    if os.path.abspath(path) != os.path.abspath(auth.keys_file):
        return (f"llamad reads {auth.keys_file} (auth.keys_file, from {loaded.sources['auth.keys_file']}), not "
                f"{path}: set auth.keys_file or AUTH_KEYS_FILE to use this file")
    if not auth.enabled:
        return f"auth.enabled is false (from {source}): llamad checks no key until it is true"
    reload = "`llamad keys reload` (or SIGHUP) makes a running llamad take the new key"
    if source in ("default", config_module.AUTH_AUTO_SOURCE):  # set nowhere: the keys file turns auth on
        return (f"{reload}, and turns auth on for one that started without keys: every request but /ping and "
                "/health then needs a key (auth.enabled = false or AUTH_ENABLED=false serves without keys)")
    return reload


def demo_model(args: argparse.Namespace) -> int:
    from llamad.demo import write_demo_model

    if os.path.exists(args.path) and not args.force:
        print(f"{args.path} exists (use --force to overwrite)", file=sys.stderr)
        return 0
    print(write_demo_model(args.path, args.size))
    return 0


def _keys_file(args: argparse.Namespace) -> str:
    if args.file:
        return str(args.file)
    return tool_config(args).auth.keys_file


def keys(args: argparse.Namespace) -> int:
    """Manage the API keys file (atomic rewrites, mode 0600), or ask a daemon to reload it."""
    from llamad.keys import apikey, keytool

    if args.action == "reload":
        return _reload(args)
    try:
        if args.action == "usage":
            return keytool.usage(args, tool_config(args).logs.dir)
        path = _keys_file(args)
    except ConfigError as e:
        return config_error(e)
    if args.action == "convert":
        return keytool.convert(args, path)
    expires: str | None = None
    if getattr(args, "expires", None):
        try:
            expires = keytool.expiry(args.expires)
        except ValueError as e:
            print(f"llamad keys: {e}", file=sys.stderr)
            return 2
    if path.endswith(".toml"):
        code = keytool.toml_keys(args, path, expires)
        if code == 0 and args.action == "generate":
            _say(after_generate(args, path))
        return code
    policy = keytool.policy_options(args)
    if policy:
        print(f"llamad keys: {', '.join(policy)} need a .toml keys file, which holds a policy per key "
              f"(`llamad keys convert` writes one from {path})", file=sys.stderr)
        return 2
    try:
        lines, warnings = apikey.read_key_file(path)
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
        secret = apikey.new_secret()
        try:
            if args.action == "generate":
                entry = _entry(args.id, secret, args.rate or None, expires)
                new_lines = [line.text for line in lines] + [entry]
            else:
                entry, new_lines = _rotated(lines, args.id, secret, expires)
            apikey.parse_line(entry)  # refuse a bad id, rate or date before writing
        except ValueError as e:
            print(f"llamad keys: {e}", file=sys.stderr)
            return 2
        if not _write(path, new_lines):
            return 1
        print(secret)
        if args.action == "generate":
            _say(after_generate(args, path))
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
    from llamad.keys import apikey

    try:
        apikey.write_key_file(path, lines)
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
        return config_error(e)
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


# --- llamad models: the router API of a running daemon, as a table ------------------------

MODELS_TIMEOUT = 10.0  # seconds; a daemon that is up answers the models API at once


class ModelsError(Exception):
    """One line for stderr and the exit status that goes with it."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def api_url(listen: str) -> str:
    """The URL that reaches an ``api.listen`` endpoint from this host; ValueError when no URL can.

    A wildcard or absent interface is reached on loopback, the family kept.
    """
    kind, _, rest = listen.partition(":")
    if kind not in ("tcp", "tcp6", "ssl"):
        raise ValueError(f"api.listen is {listen!r}, which `llamad models` cannot reach (only tcp: endpoints); "
                         "give --url")
    args = config_module._endpoint_args(rest)
    positional = [config_module._unescape(a) for a in args if "=" not in a]
    named = {n: config_module._unescape(v) for n, v in (a.split("=", 1) for a in args if "=" in a)}
    port = positional[0] if positional else named.get("port", "")
    if not port.isdigit() or int(port) == 0:
        raise ValueError(f"api.listen is {listen!r}: no fixed port to reach; give --url")
    interface = named.get("interface", "")
    if interface in ("", "0.0.0.0", "::"):
        interface = "::1" if kind == "tcp6" or interface == "::" else "127.0.0.1"
    host = f"[{interface}]" if ":" in interface else interface
    return f"{'https' if kind == 'ssl' else 'http'}://{host}:{int(port)}"


def human_bytes(size: int | float | None) -> str:
    """Memory as people read it ("1.0 GiB"); "-" for none (a model that is not loaded holds none)."""
    if not size:
        return "-"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def ago(when: float | None, now: float) -> str:
    """``last_used`` (wall-clock seconds) as "12 s ago", "5 min ago", "3 h ago", "2 d ago", or "never"."""
    if when is None:
        return "never"
    seconds = max(0, int(now - when))
    for limit, size, unit in ((120, 1, "s"), (7200, 60, "min"), (172800, 3600, "h")):
        if seconds < limit:
            return f"{seconds // size} {unit} ago"
    return f"{seconds // 86400} d ago"


def models_table(answer: Any, now: float) -> list[str]:
    """The lines ``llamad models`` prints for a ``GET /models`` answer.

    A single-model llamad proxies ``/models`` to its llama-server, whose entries carry
    no ``llamad`` object: then only the ids can be shown, and the first line says why.
    """
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list):
        raise ModelsError("GET /models answered JSON without a \"data\" list (is this a llamad?)")
    entries = [e for e in data if isinstance(e, dict)]
    if not any(isinstance(e.get("llamad"), dict) for e in entries):
        ids = ", ".join(str(e.get("id", "?")) for e in entries) or "none listed"
        return [f"this llamad serves one model (no fleet to load or unload): {ids}"]
    header = ["ID", "STATE", "MEMORY", "IN FLIGHT", "QUEUED", "LAST USED"]
    rows = []
    for entry in entries:
        own = entry.get("llamad") if isinstance(entry.get("llamad"), dict) else {}
        rows.append([str(entry.get("id", "?")), str(own.get("state", "?")), human_bytes(own.get("memory")),
                     str(own.get("in_flight", 0)), str(own.get("queued", 0)), ago(own.get("last_used"), now),
                     str(own.get("reason") or "")])
    if any(row[-1] for row in rows):
        header.append("REASON")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in [header, *rows]]


def _models_request(url: str, key: str, method: str, path: str, body: dict[str, Any] | None,
                    timeout: float) -> tuple[str, Any]:
    """One call to the daemon's API: (raw text, parsed JSON); ModelsError for an error answer or no answer."""
    import http.client
    import urllib.error
    import urllib.request

    headers = {"accept": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["content-type"] = "application/json"
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            text = response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        raise ModelsError(f"{method} {path}: {e.code}: {_error_message(e.read().decode(errors='replace'))}") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # refused, timed out, not HTTP, a bad --url
        reason = getattr(e, "reason", None) or e
        raise ModelsError(f"no llamad answers at {url} ({reason}); is it running? (--url, --config)") from None
    try:
        return text, json.loads(text)
    except ValueError:
        raise ModelsError(f"{method} {path}: the answer is not JSON: {text[:200]!r}") from None


def _error_message(text: str) -> str:
    """The server's own words from an error body (router and OpenAI shapes alike), else the body itself."""
    try:
        parsed = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:200] or "(empty answer)"
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict) and error.get("message"):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return " ".join(text.split())[:200]


def models(args: argparse.Namespace) -> int:
    """List, load or unload a running llamad's models through its router API."""
    import time

    url = getattr(args, "url", None)
    try:
        if not url:
            try:
                url = api_url(tool_config(args).api.listen)
            except ValueError as e:
                raise ModelsError(str(e), 2) from None
        key = getattr(args, "key", None) or os.environ.get("LLAMAD_API_KEY", "")
        timeout = getattr(args, "timeout", MODELS_TIMEOUT)
        action = getattr(args, "action", None) or "list"
        if action == "list":
            text, answer = _models_request(url, key, "GET", "/models", None, timeout)
            if getattr(args, "json", False):
                print(text.rstrip("\n"))
            else:
                print("\n".join(models_table(answer, time.time())))
            return 0
        body: dict[str, Any] = {"model": args.id}
        if action == "unload":
            body["force"] = bool(args.force)
        _, answer = _models_request(url, key, "POST", f"/models/{action}", body, timeout)
    except ModelsError as e:
        print(f"llamad models: {e.message}", file=sys.stderr)
        return e.status
    if not (isinstance(answer, dict) and answer.get("success") is True):
        print(f"llamad models: {action} {args.id}: unexpected answer {json.dumps(answer)[:200]}", file=sys.stderr)
        return 1
    if action == "load":
        print(f"loading {args.id} (in the background; `llamad models` shows its state)")
    elif args.force:
        print(f"unloading {args.id} now (requests in flight are cut)")
    else:
        print(f"unloading {args.id} (after its requests in flight)")
    return 0


def _models_options(p: argparse.ArgumentParser, here: bool) -> None:
    """Where the daemon is, accepted before and after the action; an action's copy overrides only when given."""
    default = {} if here else {"default": argparse.SUPPRESS}
    p.add_argument("--config", "-c", help="config whose api.listen to reach (read as twistd llamad reads it, "
                                          "environment included; no model needed)", **default)
    p.add_argument("--url", help="the daemon's API instead, e.g. http://127.0.0.1:8000", **default)
    p.add_argument("--key", help="an API key (default: $LLAMAD_API_KEY; one starting with '-': --key=KEY)",
                   **default)
    p.add_argument("--timeout", type=float, help=f"seconds to wait for an answer (default: {MODELS_TIMEOUT:g})",
                   **(default or {"default": MODELS_TIMEOUT}))


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
    d.add_argument("--size", choices=("small", "large"), default="small",
                   help="small (default): loads in milliseconds; large: a 2,000-token prompt takes over a second on a "
                        "CPU, for benchmarks of prompt reuse")
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
    policy = g.add_argument_group("policy (a .toml keys file only)")
    policy.add_argument("--models", help="comma-separated model ids or globs the key may use (default: all)")
    policy.add_argument("--role", help="inference (the default), admin, or inference,admin")
    policy.add_argument("--tokens-per-minute", type=int, help="prompt + completion tokens per minute")
    policy.add_argument("--tokens-per-day", type=int, help="prompt + completion tokens per day")
    policy.add_argument("--max-concurrent", type=int, help="requests at once; more wait, then 429")
    policy.add_argument("--priority", help="a class of [auth.priorities] in llamad's config")
    policy.add_argument("--hash-only", action="store_true",
                        help="store only the key's SHA-256 (key_sha256): it is shown once, here")
    ro = actions.add_parser("rotate", help="give an existing key a new secret (rate and expiry kept) and print it")
    ro.add_argument("id")
    ro.add_argument("--expires", help=EXPIRES_HELP + " (default: keep the key's expiry)")
    actions.add_parser("list", help="list key ids, rate limits and expiries")
    r = actions.add_parser("revoke", help="remove a key")
    r.add_argument("id")
    cv = actions.add_parser("convert", help="write the keys file in the other format (lines <-> TOML)",
                            description="Write api_keys.txt as api_keys.toml (or back) next to it, or at --out; "
                                        "the original is kept. A key with a policy the line format cannot hold "
                                        "is refused, naming it.")
    cv.add_argument("--out", "-o", help="where to write (default: the same name with .toml or .txt)")
    cv.add_argument("--force", action="store_true", help="replace --out if it exists")
    us = actions.add_parser("usage", help="requests and tokens per key and model, from the access log",
                            description="Sum logs/access (latest.txt and its rotated archives) per key and model.")
    us.add_argument("--since", help="ISO 8601 (a naive time is UTC) or a time ago: 30m, 24h, 7d, 2w")
    us.add_argument("--json", action="store_true", help="print JSON")
    rl = actions.add_parser("reload", help="make a running daemon re-read the keys file",
                            description="Send SIGHUP to the llamad serving the config's data dir "
                                        "(--config, DATA_DIR), found by the PID file it keeps; or use --pid or --url.")
    rl.add_argument("--pid", type=int, help="send SIGHUP to this twistd PID instead")
    rl.add_argument("--url", help="POST /admin/reload here instead, e.g. http://127.0.0.1:8000")
    rl.add_argument("--key", help="a valid API key for --url (default: $LLAMAD_API_KEY; one starting with '-': "
                                  "--key=KEY)")
    k.set_defaults(func=keys)

    m = sub.add_parser("models", help="list a running llamad's models, or load or unload one",
                       description="Talk to a running llamad's models API (GET /models, POST /models/load, "
                                   "POST /models/unload). Without an action: list.")
    _models_options(m, here=True)
    m.add_argument("--json", action="store_true", help="print GET /models as the daemon answers it")
    model_actions = m.add_subparsers(dest="action")
    ml = model_actions.add_parser("list", help="one line per model: state, memory, requests, last use")
    _models_options(ml, here=False)
    ml.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                    help="print GET /models as the daemon answers it")
    mo = model_actions.add_parser("load", help="start a model now (the daemon loads it in the background)")
    mo.add_argument("id", help="a model id or alias")
    _models_options(mo, here=False)
    mu = model_actions.add_parser("unload", help="stop a model once its requests in flight are done")
    mu.add_argument("id", help="a model id or alias")
    mu.add_argument("--force", action="store_true", help="stop it now, cutting its requests in flight")
    _models_options(mu, here=False)
    m.set_defaults(func=models)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as e:  # a config problem is one line, never a traceback
        return config_error(e)


if __name__ == "__main__":
    sys.exit(main())
