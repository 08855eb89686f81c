"""`LocalOnly`: what a keyless HTTP server accepts, so that web pages the player visits cannot use it.

Without an API key the server trusts whoever can reach it, and on a player's machine a browser tab can:
a page may POST `text/plain` (a "simple" request, sent with no CORS preflight), and through DNS rebinding
(its own name resolving to 127.0.0.1) even read the answers. So a keyless server answers only requests
- whose ``Host`` is a loopback name (``localhost``, ``*.localhost``, 127.0.0.0/8, ``::1``) or one allowed
  with ``--allow-host`` (a rebinding page's requests carry its own name),
- whose ``Origin``, when there is one, is this server itself or one allowed with ``--allow-origin``,
- and whose POST body is declared JSON (``application/json``): no simple cross-site form or text POST.
A server with an API key needs none of this (a page cannot send the key), and skips it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.responses import JSONResponse

from gllm.frontend.helpers import is_loopback_host
from gllm.http.errors import error_body

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def host_name(host_header: str) -> str:
    """The name part of a Host header: ``[::1]:8080`` -> ``::1``, ``Localhost:80`` -> ``localhost``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        return host.partition(":")[0]
    return host


class LocalOnly:
    """ASGI middleware refusing (403/415, OpenAI-shaped errors) what the module docstring lists."""

    def __init__(self, app: Any, *, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed_hosts = frozenset(h.lower() for h in allowed_hosts)
        self.allowed_origins = frozenset(o.rstrip("/").lower() for o in allowed_origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            refusal = self.refusal(scope["method"], {k.decode("latin-1").lower(): v.decode("latin-1")
                                                     for k, v in scope["headers"]})
            if refusal is not None:
                status, message, code = refusal
                await JSONResponse(error_body(message, "invalid_request_error", None, code),
                                   status_code=status)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        """(status, message, code) when the request must be refused, else None."""
        host = headers.get("host", "")
        name = host_name(host)
        allowed = name in self.allowed_hosts or "*" in self.allowed_hosts
        if not (is_loopback_host(name, localhost_subdomains=True) or allowed):
            return (403, f"Host {host!r} is not a loopback name: this server has no API key, so it only answers "
                         f"requests addressed to localhost (allow more names with --allow-host)", "host_not_allowed")
        origin = headers.get("origin")
        if origin is not None:
            origin_l = origin.rstrip("/").lower()
            same = origin_l in (f"http://{host.lower()}", f"https://{host.lower()}")
            if not (same or origin_l in self.allowed_origins or "*" in self.allowed_origins):
                return (403, f"cross-origin requests from {origin!r} are not allowed (allow an origin with "
                             f"--allow-origin)", "origin_not_allowed")
        if method not in SAFE_METHODS:
            kind = headers.get("content-type", "").partition(";")[0].strip().lower()
            if kind != "application/json":
                return (415, f"the request body must be sent as Content-Type: application/json, got "
                             f"{kind or 'none'!r}", "unsupported_media_type")
        return None
