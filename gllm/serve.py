"""`gllm serve`: one engine behind the ZeroMQ bridge (`--zmq`), the HTTP server (`--http`), or both.

With neither flag the bridge listens on its default endpoint; `--http` alone serves HTTP only. This module
owns the composition: the engine's flags (`gllm.frontend.engine_flags`), the flags every front end shares
(``--insecure``, ``--log-level``) and each front end's own (`gllm.bridge.cli`, `gllm.http.cli`), for
`gllm serve` and for `python -m gllm.bridge` (the bridge alone) and `python -m gllm.http` (HTTP alone).
With HTTP on, one `Metrics` counts both front ends' requests and feeds /metrics and the dashboard.

Each front end prints its ready line (``gllm bridge listening on ...``, ``gllm http listening on ...``) on
stdout once it listens; the process serves until SIGINT/SIGTERM, then ends every request and exits 0. Exit
status 2 for a refused configuration (a public address without authentication, a bad flag value), 1 for a
failed start (model not loadable, address in use).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from gllm.bridge import cli as bridge_cli
from gllm.frontend.engine_flags import add_engine_arguments, generator_params

DEFAULT_ZMQ = "tcp://127.0.0.1:5555"


def _add_shared_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback --zmq or --http address without authentication (no token or CURVE "
                        "client list; no API key)")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`gllm serve`'s flags: the engine's, the bridge's (``--zmq`` opt-in), HTTP's (``--http`` opt-in, when
    the http extra is installed)."""
    _add_shared_arguments(p)
    bridge_cli.add_arguments(p)
    p.set_defaults(zmq=None)                 # tell "not given" from the default
    try:
        from gllm.http import cli as http_cli
    except ImportError:                       # the http extra is not installed
        p.set_defaults(http=None)
        return
    http_cli.add_arguments(p, http_default=None)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    use_http = args.http is not None
    if args.zmq is None and not use_http:
        args.zmq = DEFAULT_ZMQ
    http_cli = None
    try:  # refuse a bad configuration before loading anything
        bridge_config = bridge_cli.config_from_args(args) if args.zmq else None
        if use_http:
            from gllm.http import cli as http_cli
            http_cli.check_args(args)
        params = generator_params(args)
    except (ValueError, OSError) as exc:
        print(f"gllm serve: error: {exc}", file=sys.stderr)
        return 2

    from gllm.engine import LLMEngine
    try:
        engine = LLMEngine(args.model, params, device=args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"gllm serve: error: {exc}", file=sys.stderr)
        return 1
    # Before listening: built later, on the first constrained request, it would hold up every client.
    grammar_s = engine.prepare_structured_output()
    print(f"gllm serve: {engine.model_name} on {engine.device} (loaded in {engine.load_seconds:.1f} s, "
          f"structured output ready in {grammar_s:.1f} s)", file=sys.stderr, flush=True)
    front = bridge = None
    try:
        metrics = None
        if use_http:                          # /metrics and the dashboard count every front end's requests
            from gllm.frontend.metrics import Metrics
            metrics = Metrics(engine)
            front = http_cli.front_end_from_args(args, engine, metrics)
            print(f"{http_cli.READY_PREFIX}{front.start()}", flush=True)
        if bridge_config is not None:
            from gllm.bridge.server import BridgeServer
            bridge = BridgeServer(engine, bridge_config, metrics=metrics)
            bridge.start()                    # binds, then serves on its own thread
            print(f"{bridge_cli.READY_PREFIX}{bridge.endpoint}", flush=True)
        stop = threading.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, lambda *_: stop.set())
        stop.wait()
    except Exception as exc:  # a bind failure: address in use, bad endpoint
        print(f"gllm serve: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bridge is not None:
            bridge.stop()
        if front is not None:
            front.stop()
        engine.close()
    return 0


def _serve_one(prog: str, description: str, add_front_end: Callable[[argparse.ArgumentParser], None],
               other_off: str, argv: Sequence[str] | None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    _add_shared_arguments(parser)
    add_front_end(parser)
    parser.set_defaults(**{other_off: None})   # the other front end stays off
    return run(parser.parse_args(argv))


def main_bridge(argv: Sequence[str] | None = None) -> int:
    """`python -m gllm.bridge`: the bridge alone (``--zmq`` defaults to tcp://127.0.0.1:5555)."""
    return _serve_one("python -m gllm.bridge", "Serve the engine behind a ZeroMQ ROUTER socket.",
                      bridge_cli.add_arguments, "http", argv)


def main_http(argv: Sequence[str] | None = None) -> int:
    """`python -m gllm.http`: the OpenAI-compatible HTTP server alone (``--http`` defaults to 127.0.0.1:8080)."""
    from gllm.http import cli as http_cli
    return _serve_one("python -m gllm.http", "Serve the engine behind the OpenAI-compatible HTTP API.",
                      http_cli.add_arguments, "zmq", argv)
