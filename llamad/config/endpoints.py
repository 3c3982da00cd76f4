"""Twisted endpoint strings: PORT and HOST put into them, and the checks that refuse here what would only
fail at bind time (an unknown kind, a bad port or interface, the API and health endpoints on one socket)."""

from __future__ import annotations

import ipaddress
import os
import re

from llamad.config.errors import ConfigError


def endpoint_args(rest: str) -> list[str]:
    """Split endpoint arguments on ':' but not on Twisted's escaped '\\:'."""
    return re.split(r"(?<!\\):", rest) if rest else []


def unescape(text: str) -> str:
    """Twisted's endpoint escaping: a backslash takes the next character as is."""
    return re.sub(r"\\(.)", r"\1", text)


def replace_port(endpoint: str, port_text: str, key: str, source: str) -> str:
    """Put PORT / PORT_HEALTH / GATEWAY_PORT into a ``tcp:`` endpoint string."""
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"port must be an integer, got {port_text!r}", source) from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} out of range 0-65535", source)
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6"):
        return endpoint
    args = endpoint_args(rest)
    positional = [a for a in args if "=" not in a]
    if positional:
        args[args.index(positional[0])] = str(port)
    else:
        args = [a for a in args if not a.startswith("port=")] + [f"port={port}"]
    return f"{kind}:{':'.join(args)}"


def replace_interface(endpoint: str, host: str) -> str:
    """Put HOST into a ``tcp:`` endpoint string as its interface (escaped: an IPv6 address has colons)."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6"):
        return endpoint
    args = [a for a in endpoint_args(rest) if not a.startswith("interface=")]
    escaped = host.strip().replace(":", "\\:")
    return f"{kind}:{':'.join([*args, f'interface={escaped}'])}"


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# What an endpoint binds, to find two that clash: ("unix", path, None), or (family,
# port, address) where address None is every address of the family.
Binding = tuple[str, int | str, IPAddress | None]


def check_endpoint(key: str, endpoint: str, source: str) -> Binding | None:
    """Refuse here what would only fail at bind time; returns what it binds (None: not known)."""
    kind, _, rest = endpoint.partition(":")
    if kind not in ("tcp", "tcp6", "unix", "systemd", "ssl"):
        raise ConfigError(key, f"unsupported endpoint {endpoint!r} (use tcp:PORT, unix:PATH or systemd:...)", source)
    args = endpoint_args(rest)
    positional = [unescape(a) for a in args if "=" not in a]
    named = {name: unescape(value) for name, value in (a.split("=", 1) for a in args if "=" in a)}
    if kind == "unix":
        path = positional[0] if positional else named.get("address", "")
        if not path:
            raise ConfigError(key, f"endpoint {endpoint!r} has no socket path (use unix:/path/to/socket)", source)
        return ("unix", os.path.abspath(path), None)
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    port_text = positional[0] if positional else named.get("port", "")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(key, f"endpoint {endpoint!r} has no valid port", source) from None
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port {port} out of range 0-65535", source)
    interface = named.get("interface", "")
    address: IPAddress | None = None
    if interface:
        try:
            address = ipaddress.ip_address(interface)
        except ValueError:
            raise ConfigError(key, f"interface {interface!r} is not an IP address", source) from None
        if kind == "tcp6" and address.version != 6:
            raise ConfigError(key, f"interface {interface!r} is not an IPv6 address (tcp6 needs one)", source)
    family = "ipv6" if kind == "tcp6" or (address is not None and address.version == 6) else "ipv4"
    return (family, port, None if address is None or address.is_unspecified else address)


def clash(a: Binding | None, b: Binding | None) -> bool:
    """Whether binding both would fail: the same socket path, or the same port on overlapping addresses."""
    if a is None or b is None or a[1] == 0 or a[1] != b[1]:
        return False  # port 0 is a fresh port each time
    if "unix" in (a[0], b[0]):
        return a == b
    if a[0] == b[0]:
        return a[2] is None or b[2] is None or a[2] == b[2]
    # An IPv6 wildcard also takes IPv4 on Linux (dual stack).
    return any(family == "ipv6" and address is None for family, _, address in (a, b))
