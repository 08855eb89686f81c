"""The HTTP front end's command-line flags: where to listen, the API key, CORS and Host allowances, limits.

`gllm.serve` composes them with the engine's flags (`gllm.frontend.engine_flags`) into `python -m gllm.http`
(``--http`` on by default) and `gllm serve` (``--http`` opt-in, beside the bridge), and runs the server.
Once the socket listens, the server prints one line ``gllm http listening on http://HOST:PORT`` on stdout
(tools and tests wait for it). `check_args` refuses a bad configuration before anything is loaded;
`front_end_from_args(args, engine, metrics)` builds the `HttpFrontEnd` without starting it.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gllm.frontend.helpers import is_loopback_host, positive

if TYPE_CHECKING:
    from gllm.engine.interface import EngineAPI
    from gllm.frontend.metrics import Metrics
    from gllm.http.server import HttpFrontEnd

READY_PREFIX = "gllm http listening on "
API_KEY_ENV = "GLLM_API_KEY"


def add_arguments(p: argparse.ArgumentParser, *, http_default: str | None = "127.0.0.1:8080") -> None:
    """The HTTP server's flags (``--insecure`` is `gllm.serve`'s, shared with the bridge); ``http_default=None``
    makes ``--http`` opt-in (for `gllm serve`, where the bridge is the default front end and
    `front_end_from_args` then returns None without ``--http``)."""
    http = p.add_argument_group("HTTP (OpenAI-compatible API, /metrics, dashboard at /)")
    http.add_argument("--http", default=http_default, metavar="HOST:PORT",
                      help=f"where to listen ({'default ' + http_default if http_default else 'off unless given'}; "
                           f"port 0 picks a free one)")
    http.add_argument("--api-key", default=None,
                      help=f"bearer key every /v1 and /metrics request must carry (or env {API_KEY_ENV})")
    http.add_argument("--api-key-file", default=None, help="read the API key from this file")
    http.add_argument("--served-model-name", default=None,
                      help="the model id clients see and send (default: the model's name, a folder by its last part)")
    http.add_argument("--allow-origin", action="append", default=None, metavar="ORIGIN",
                      help="CORS: let browser pages from ORIGIN call the API (repeatable; '*' for any)")
    http.add_argument("--allow-host", action="append", default=None, metavar="NAME",
                      help="without an API key only loopback Host names are answered: also answer this one "
                           "(repeatable; '*' for any)")
    http.add_argument("--max-body-mb", type=positive(float, "--max-body-mb"), default=2.0,
                      help="largest request body accepted, MiB (default 2; larger gets 413)")
    http.add_argument("--body-timeout-s", type=positive(float, "--body-timeout-s"), default=30.0,
                      help="a request body must arrive within this many seconds (default 30; slower gets 408)")
    http.add_argument("--default-max-tokens", type=positive(int, "--default-max-tokens"), default=None,
                      help="max_tokens when a request gives none (default: up to max_seq_len)")
    http.add_argument("--access-log", action="store_true", help="log every HTTP request")


def api_key_from_args(args: argparse.Namespace) -> str | None:
    key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"the API key file {args.api_key_file} is empty")
    return key


def check_args(args: argparse.Namespace) -> tuple[str, int, str | None]:
    """Validate the HTTP flags before anything is loaded: (host, port, api_key); ValueError if refused."""
    from gllm.http.server import parse_address
    if not args.http:
        raise ValueError("no --http address given")
    host, port = parse_address(args.http)
    key = api_key_from_args(args)
    if not key and not args.insecure and not is_loopback_host(host):
        raise ValueError(f"refusing to serve HTTP on {host}, which is not loopback, without an API key: give "
                         f"--api-key (or {API_KEY_ENV}), or --insecure to accept anyone who can reach it")
    return host, port, key


def front_end_from_args(args: argparse.Namespace, engine: EngineAPI, metrics: Metrics | None = None
                        ) -> HttpFrontEnd | None:
    """The `HttpFrontEnd` the flags describe (not started), or None when ``--http`` is off."""
    from gllm.http.server import HttpFrontEnd
    if not args.http:
        return None
    host, port, key = check_args(args)
    return HttpFrontEnd(engine, host, port, api_key=key, insecure=args.insecure, metrics=metrics,
                        served_model_name=args.served_model_name, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                        cors_origins=args.allow_origin or (), default_max_tokens=args.default_max_tokens,
                        access_log=args.access_log, allowed_hosts=args.allow_host or (),
                        body_timeout_s=args.body_timeout_s)
