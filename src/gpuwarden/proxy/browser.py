"""The browser protections of a loopback server, kept by a proxy that forwards to one.

Ollama refuses a `Host` that is not a local name (so a page whose name was rebound to
127.0.0.1 gains nothing), and both Ollama and ComfyUI refuse a foreign `Origin` (so a
page on another site cannot post to them). A proxy that sends the upstream its own
`Host` would switch the first check off, and one that passes the browser's `Origin`
breaks ComfyUI's own page behind it. So the proxy makes both checks itself, against
its own address, before anything is forwarded, and then gives the upstream a
`Host`/`Origin` pair that is the upstream's own.

Accepted hosts: loopback names and addresses, `localhost` and `*.localhost`, this
machine's host name and addresses, the proxy's own listen address, and the proxy's
`allowed_hosts`. Accepted origins: `http(s)://<accepted host>:<the proxy's port>`,
and the proxy's `allowed_origins`. A request with no `Origin` (a server-side client:
Open WebUI's backend, AnythingLLM, curl) is judged by its `Host` alone.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import psutil

__all__ = ["BrowserPolicy", "normalize_origin", "split_host"]

# This machine's names and addresses are read again at most this often (DHCP, a VPN
# coming up); a miss is rare and cheap to recheck.
_LOCAL_REFRESH_S = 60.0


def split_host(value: str) -> tuple[str, int | None] | None:
    """`name[:port]` or `[v6][:port]` as (lower-case name without brackets, port);
    None when it is not a host."""
    value = value.strip().lower()
    if not value:
        return None
    try:
        parts = urlsplit("//" + value)
        name, port = parts.hostname, parts.port
    except ValueError:  # a port out of range or not a number
        return None
    if not name or parts.path or parts.query or parts.fragment or parts.username:
        return None
    return name.rstrip("."), port


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]` in lower case with the default port dropped; None when
    it is not an origin (a path, userinfo, or `null`). Besides http and https, an app's
    own scheme (`app://obsidian.md`, `vscode-webview://ID`) is an origin too."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if "://" not in value or not re.fullmatch(r"[a-z][a-z0-9+.-]*", parts.scheme):
        return None
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        return None
    if parts.scheme not in ("http", "https"):
        return f"{parts.scheme}://{parts.netloc}"
    if not parts.hostname:
        return None
    host = parts.hostname.rstrip(".")
    if ":" in host:
        host = f"[{host}]"
    default = 80 if parts.scheme == "http" else 443
    return f"{parts.scheme}://{host}" + ("" if port in (None, default) else f":{port}")


def _is_loopback(name: str) -> bool:
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str = ""


_ALLOWED = Verdict(True)
_REMEMBERED = 1024  # allowed Host/Origin pairs kept; past it, each is judged again


class BrowserPolicy:
    """Which `Host` and `Origin` a proxy listening on `listen` accepts."""

    def __init__(self, listen_host: str, listen_port: int, *,
                 allowed_hosts: list[str] | tuple[str, ...] = (),
                 allowed_origins: list[str] | tuple[str, ...] = ()) -> None:
        self.port = listen_port
        self._listen_host = listen_host.strip("[]").lower()
        self._exact: set[str] = set()
        self._suffixes: list[str] = []
        for entry in allowed_hosts:
            entry = entry.strip().lower().rstrip(".")
            if entry.startswith("*."):
                self._suffixes.append(entry[1:])  # ".example.lan"
            else:
                self._exact.add(entry.strip("[]"))
        self._origins = {o for o in (normalize_origin(v) for v in allowed_origins) if o}
        self._local: frozenset[str] = frozenset()
        self._allowed: set[tuple[str | None, str | None]] = set()
        self._local_read_at = -_LOCAL_REFRESH_S

    def _local_names(self, refresh: bool = False) -> frozenset[str]:
        now = time.monotonic()
        if (refresh and now - self._local_read_at >= _LOCAL_REFRESH_S) or not self._local:
            # No DNS here (getfqdn may wait on a resolver): the host name as the kernel
            # has it, and the interfaces' addresses, both read at once.
            self._local_read_at = now
            names = {socket.gethostname().lower(), self._listen_host}
            for addresses in psutil.net_if_addrs().values():
                for address in addresses:
                    if address.family in (socket.AF_INET, socket.AF_INET6):
                        names.add(address.address.split("%", 1)[0].lower())
            self._local = frozenset(n for n in names if n)
        return self._local

    def host_allowed(self, name: str) -> bool:
        """Whether a host name (no port) is one this proxy answers to."""
        name = name.strip("[]").rstrip(".").lower()
        if _is_loopback(name) or name in self._exact:
            return True
        if any(name.endswith(suffix) for suffix in self._suffixes):
            return True
        return name in self._local_names() or name in self._local_names(refresh=True)

    def check(self, host_header: str | None, origin_header: str | None) -> Verdict:
        """Judge a request by its `Host` and, when it has one, its `Origin`. Allowed
        pairs are remembered (a client sends the same ones on every request)."""
        key = (host_header, origin_header)
        if key in self._allowed:
            return _ALLOWED
        verdict = self._judge(host_header, origin_header)
        if verdict.allowed and len(self._allowed) < _REMEMBERED:
            self._allowed.add(key)
        return verdict

    def _judge(self, host_header: str | None, origin_header: str | None) -> Verdict:
        host = split_host(host_header or "")
        if host is None:
            return Verdict(False, "no valid Host header")
        if not self.host_allowed(host[0]):
            return Verdict(False, f"Host {host_header!r} is not a name of this machine; "
                                  "add it to allowed_hosts if it is")
        if origin_header is None:
            return Verdict(True)
        origin = normalize_origin(origin_header)
        if origin is not None and origin in self._origins:
            return Verdict(True)
        if origin is not None and origin.startswith(("http://", "https://")):
            parts = urlsplit(origin)
            port = parts.port or (80 if parts.scheme == "http" else 443)
            if port == self.port and parts.hostname and self.host_allowed(parts.hostname):
                return Verdict(True)
        return Verdict(False, f"Origin {origin_header!r} is not this proxy's address; "
                              "add it to allowed_origins to let that site in")
