"""Addresses on the command line and in logs: ``HOST:PORT``, ``[IPV6]:PORT``, and where a client binds.

One parser for ``--listen``, ``--bootstrap`` and ``--bind``. An IPv6 literal with a port is written
in brackets (``[::1]:8468``): unbracketed, ``::1:8468`` is itself a valid IPv6 address, so it is
refused rather than guessed. Hostnames are resolved once, to IPv4 (the package keeps nodes by IP).
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from qis_fhir.errors import ExitCode, QisError

ANY_IPV4 = "0.0.0.0"
ANY_IPV6 = "::"


def _bad(text: str, why: str) -> QisError:
    return QisError(f"bad address {text!r}: {why}", exit_code=ExitCode.USAGE)


def is_ipv6(host: str) -> bool:
    """For an IP address as parsed here: only IPv6 ones contain a colon."""
    return ":" in host


def parse_address(text: str, *, allow_port_zero: bool = False, default_port: int | None = None) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (IP address, port).

    With ``default_port`` the port may be left out (``HOST``, ``[IPV6]`` or a bare IPv6 literal)."""
    text = text.strip()
    expected = "expected HOST:PORT or [IPV6]:PORT" if default_port is None else "expected HOST[:PORT] or [IPV6][:PORT]"
    port_text: str | None
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise _bad(text, expected)
        port_text = rest[1:] if rest else None
        if not is_ipv6(host):
            raise _bad(text, "brackets hold an IPv6 address")
    elif text.count(":") > 1:
        host, port_text = text, None
        if default_port is None:
            raise _bad(text, "write an IPv6 address with its port as [ADDRESS]:PORT")
    else:
        host, _, port_text = text.partition(":") if ":" in text else (text, "", None)
    if port_text is None:
        if default_port is None:
            raise _bad(text, expected)
        port = default_port
    else:
        low = 0 if allow_port_zero else 1
        if not port_text.isdigit() or not low <= int(port_text) < 65536:
            raise _bad(text, expected)
        port = int(port_text)
    if not host:
        raise _bad(text, expected)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if is_ipv6(host):
            raise _bad(text, "not an IPv6 address") from None
        try:
            host = socket.gethostbyname(host)
        except OSError:
            raise QisError(f"cannot resolve host {host!r}", exit_code=ExitCode.USAGE) from None
    return host, port


def parse_addresses(text: str | None) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` -> list of addresses (empty for None or "")."""
    if not text:
        return []
    return [parse_address(part) for part in text.split(",") if part.strip()]


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`: ``HOST:PORT``, ``[IPV6]:PORT``."""
    return f"[{host}]:{port}" if is_ipv6(host) else f"{host}:{port}"


def format_addresses(addresses: list[tuple[str, int]]) -> str:
    return ",".join(format_address(h, p) for h, p in addresses)


def client_bind(bind: Any, bootstrap: list[tuple[str, int]]) -> tuple[str, int]:
    """Where a client's socket binds: ``bind`` (``"HOST[:PORT]"`` or (host, port)), by default every
    local address of the bootstrap peers' family on a free port.

    Never 127.0.0.1 by default: a socket bound to loopback cannot send to another machine. One UDP
    socket speaks one address family, so the peers must share the bind's family (an IPv6 socket
    bound to ``::`` would reach IPv4 peers only as ``::ffff:`` mapped addresses, which nodes would
    then hand out to each other)."""
    if bind is None:
        host, port = (ANY_IPV6 if bootstrap and all(is_ipv6(h) for h, _ in bootstrap) else ANY_IPV4), 0
    elif isinstance(bind, str):
        host, port = parse_address(bind, allow_port_zero=True, default_port=0)
    else:
        host, port = str(bind[0]), int(bind[1])
    other = [a for a in bootstrap if is_ipv6(a[0]) != is_ipv6(host)]
    if other:
        family = "IPv6" if is_ipv6(host) else "IPv4"
        raise QisError(
            f"the client binds {format_address(host, port)} ({family}) and cannot reach {format_addresses(other)}: "
            f"list bootstrap peers of one address family, or --bind an address of theirs",
            exit_code=ExitCode.USAGE,
        )
    return host, port
