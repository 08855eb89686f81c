"""`HttpFrontEnd`: the OpenAI-compatible server run by uvicorn on a background thread.

    front = HttpFrontEnd(engine, "127.0.0.1", 8080, api_key=None, metrics=metrics)
    url = front.start()          # returns once the socket listens (raises if it cannot bind)
    ...
    front.stop()                 # in-flight requests are cancelled, the thread joined

The socket is bound in `start()` on the caller's thread, so a port in use fails there and port 0 gives
an ephemeral port (`front.port`). uvicorn runs its own asyncio loop on the server thread and installs
no signal handlers there; the engine's events reach that loop through ``call_soon_threadsafe``. Several
front ends (HTTP, the ZeroMQ bridge) can share one engine and one `Metrics`.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

import uvicorn

from gllm.frontend.helpers import is_loopback_host
from gllm.frontend.metrics import Metrics
from gllm.http.app import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, OpenAIServer

if TYPE_CHECKING:
    from gllm.engine.interface import EngineAPI

log = logging.getLogger("gllm.http")


def parse_address(text: str, default_port: int = 8080) -> tuple[str, int]:
    """``HOST:PORT``, ``[IPv6]:PORT``, ``:PORT`` (loopback) or ``HOST`` -> (host, port)."""
    text = text.strip()
    if text.startswith("http://"):
        text = text[len("http://"):].rstrip("/")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"bad address {text!r}: unclosed '['")
        port_text = rest[1:] if rest.startswith(":") else (rest or str(default_port))
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:                           # a bare IPv6 address
        host, port_text = text, str(default_port)
    else:
        host, port_text = text, str(default_port)
    host = host or "127.0.0.1"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be in 0..65535, got {port}")
    return host, port


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, ready: threading.Event) -> None:
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self._ready.set()


class HttpFrontEnd:
    def __init__(self, engine: EngineAPI, host: str = "127.0.0.1", port: int = 8080, *, api_key: str | None = None,
                 insecure: bool = False, metrics: Metrics | None = None, served_model_name: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, cors_origins: Iterable[str] = (),
                 default_max_tokens: int | None = None, access_log: bool = False,
                 graceful_shutdown_s: float = 3.0, allowed_hosts: Iterable[str] = (),
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        if not api_key and not insecure and not is_loopback_host(host):
            raise ValueError(f"refusing to serve HTTP on {host}, which is not loopback, without an API key: "
                             f"give --api-key (or GLLM_API_KEY), or --insecure to accept anyone who can reach it")
        self.engine = engine
        self.host, self.port = host, port
        self._owns_metrics = metrics is None
        self.metrics = metrics if metrics is not None else Metrics(engine)
        bound = [host] if host not in ("", "0.0.0.0", "::") else []   # its own address is no foreign Host
        self.server = OpenAIServer(engine, self.metrics, api_key=api_key, served_model_name=served_model_name,
                                   max_body_bytes=max_body_bytes, cors_origins=cors_origins,
                                   default_max_tokens=default_max_tokens,
                                   allowed_hosts=[*allowed_hosts, *bound],
                                   body_timeout_s=body_timeout_s)
        self.app = self.server.app
        self.access_log = access_log
        self.graceful_shutdown_s = graceful_shutdown_s
        self._uvicorn: _Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def _bind(self) -> socket.socket:
        infos = socket.getaddrinfo(self.host or None, self.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                   socket.AI_PASSIVE)
        family, kind, proto, _, addr = infos[0]
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        sock.set_inheritable(False)
        return sock

    def start(self, timeout: float = 30.0) -> str:
        """Bind, start the server thread and wait until it accepts connections; returns the URL."""
        if self._thread is not None:
            raise RuntimeError("this HttpFrontEnd is already started")
        self._sock = self._bind()
        self.port = self._sock.getsockname()[1]
        config = uvicorn.Config(self.app, lifespan="off", log_level="warning", access_log=self.access_log,
                                timeout_graceful_shutdown=self.graceful_shutdown_s, loop="asyncio",
                                timeout_keep_alive=5)
        ready = threading.Event()
        self._uvicorn = _Server(config, ready)

        def serve() -> None:
            try:
                self._uvicorn.run(sockets=[self._sock])
            except BaseException as exc:  # reported to start() and logged; never silently lost
                self._error = exc
                log.exception("the HTTP server stopped with an error")
            finally:
                ready.set()

        self._thread = threading.Thread(target=serve, name="gllm-http", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or not self._uvicorn.started:
            self.stop()
            raise RuntimeError(f"the HTTP server did not start: {self._error!r}")
        return self.url

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server thread ends (after `stop()`); True if it has."""
        if self._thread is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, cancel in-flight streams (their engine requests with them), join the thread."""
        self.server.cancel_all()                # streams end with an error event and [DONE], promptly
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._owns_metrics:
            self.metrics.detach()

    def __enter__(self) -> "HttpFrontEnd":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
