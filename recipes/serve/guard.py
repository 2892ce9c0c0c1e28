"""Network-facing guards of `samadapt serve`: the Host allowlist, the cross-origin write check and
the request-head timeout.

- `HostGuard` (ASGI middleware): a request whose `Host` is not one of the served names gets 421 and
  reaches no route (DNS rebinding: a hostile page whose name resolves to 127.0.0.1 sends its own
  name as Host). A write (any method but GET/HEAD/OPTIONS) from a browser page of another origin
  gets 403: `Sec-Fetch-Site: cross-site`, or an `Origin` that is neither this server's own origin
  nor an allowed host (a form on any site could otherwise upload images and evict the stored ones).
- `header_timeout_protocol`: uvicorn's h11 protocol, plus a deadline for the request head (h11 has
  none: a client dribbling header bytes would hold its connection forever).
"""
import json
from typing import Iterable, Optional, Set
from urllib.parse import urlsplit

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
WILDCARD_BINDS = ("", "0.0.0.0", "::")


def host_name(value: str) -> Optional[str]:
    """The host part of a `Host` header or netloc, lower-cased, IPv6 without brackets; None if malformed.

    Example:
        >>> host_name("LocalHost:8000"), host_name("[::1]:80"), host_name("127.0.0.1"), host_name("a b")
        ('localhost', '::1', '127.0.0.1', None)
    """
    value = value.strip().lower()
    if not value or any(c in value for c in " /\\@?#,\t\r\n"):
        return None
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1:] if end > 1 else None
        if rest is None or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return value[1:end]
    if value.count(":") > 1:  # a bare IPv6 address (no port possible)
        return value
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


def _bare_host(text: str) -> Optional[str]:
    """`text` lower-cased if it is a bare host name, IPv4 or IPv6 address (no scheme, port or path)."""
    import ipaddress
    import re

    text = text.strip().lower()
    try:
        return str(ipaddress.ip_address(text.strip("[]") if text.startswith("[") else text))
    except ValueError:
        pass
    return text if re.fullmatch(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?", text) else None


def allowed_hosts_for(bind_host: Optional[str], extra: Iterable[str] = ()) -> Set[str]:
    """The names a server bound to `bind_host` answers to: the loopback names, the bound host
    itself (unless it is a wildcard such as 0.0.0.0) and `extra` (`--allowed-host`).

    Args:
        bind_host: the address the server binds (`--host`).
        extra: more names clients use (`--allowed-host`, repeatable).

    Raises:
        ValueError: an `extra` entry that is not a bare host name or address.

    Example:
        >>> sorted(allowed_hosts_for("0.0.0.0", ["Seg.Example.com"]))
        ['127.0.0.1', '::1', 'localhost', 'seg.example.com']
    """
    hosts = set(LOOPBACK_NAMES)
    if bind_host and bind_host.strip() not in WILDCARD_BINDS and _bare_host(bind_host):
        hosts.add(_bare_host(bind_host))
    for item in extra:
        name = _bare_host(str(item))
        if name is None:
            raise ValueError(f"--allowed-host {item!r} is not a host name or address; give the bare name clients "
                             f"use, such as seg.example.com or 192.168.1.20 (no scheme, port or path)")
        hosts.add(name)
    return hosts


class HostGuard:
    """ASGI middleware: the Host allowlist for every request and the origin check for writes.

    Args:
        app: the ASGI app to wrap.
        allowed_hosts: host names (lower case, IPv6 without brackets) this server answers to.

    Example:
        >>> from fastapi import FastAPI
        >>> app = FastAPI(); app.add_middleware(HostGuard, allowed_hosts={"localhost", "127.0.0.1", "::1"})
    """

    def __init__(self, app, allowed_hosts: Iterable[str]) -> None:
        self.app = app
        self.allowed_hosts = {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers") or []:
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = headers.get("host", "")
        name = host_name(host)
        if name not in self.allowed_hosts:
            shown = host if len(host) <= 80 else host[:80] + "..."
            return await _refuse(send, 421, f"this server does not answer to Host {shown!r}; it serves "
                                            f"{', '.join(sorted(self.allowed_hosts))} (start it with --allowed-host "
                                            f"NAME to add a name clients use)")
        if scope.get("method", "GET").upper() not in SAFE_METHODS:
            problem = self._cross_origin(headers, host)
            if problem:
                return await _refuse(send, 403, f"cross-origin write refused: {problem}; use the page this server "
                                                f"serves, or a client that is not a web page")
        return await self.app(scope, receive, send)

    def _cross_origin(self, headers, host: str) -> Optional[str]:
        """Why a write is cross-origin, or None for a same-origin or non-browser request."""
        if headers.get("sec-fetch-site", "").strip().lower() == "cross-site":
            return "Sec-Fetch-Site is cross-site"
        origin = headers.get("origin")
        if origin is None:
            return None  # not sent by a browser page (curl, scripts): nothing to protect against
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or not parts.netloc:
            return f"Origin {origin[:80]!r} is not a web origin"
        if parts.netloc.lower() == host.strip().lower():
            return None  # the page this server served
        name = host_name(parts.netloc)
        # a reverse proxy may rewrite Host: an Origin naming an allowed public name is that proxy's page
        if name is not None and name in self.allowed_hosts and name not in LOOPBACK_NAMES:
            return None
        return f"Origin {origin[:80]!r} is not this server's ({host[:80]!r})"


async def _refuse(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(header_timeout: float):
    """Uvicorn's h11 protocol class with a deadline for each request head.

    A connection gets `header_timeout` seconds from its opening (or from the first byte after a
    finished keep-alive request) to complete the request line and headers; then it is answered
    408 and closed. uvicorn's own `timeout_keep_alive` covers only idle time between requests.

    Args:
        header_timeout: seconds allowed for the request line and headers.

    Returns:
        an `asyncio.Protocol` class to pass as `uvicorn.Config(http=...)`.

    Example:
        >>> header_timeout_protocol(10).__name__
        'HeaderTimeoutH11Protocol'
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"detail": f"the request head did not arrive within {header_timeout:g} s (--header-timeout)"})
    answer = (f"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
              f"connection: close\r\n\r\n{body}").encode()

    class HeaderTimeoutH11Protocol(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and self.conn.their_state is h11.IDLE:
                self._arm()  # a new request head starts (after a keep-alive request)
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # the head is complete: the body has its own limit (BodyLimit)

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(header_timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(answer)
                self.transport.close()

    return HeaderTimeoutH11Protocol
