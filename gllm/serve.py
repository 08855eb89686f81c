"""`gllm serve`: one engine behind the ZeroMQ bridge (`--zmq`), the HTTP server (`--http`), or both.

With neither flag the bridge listens on its default endpoint; `--http` alone serves HTTP only.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from gllm.bridge import cli as bridge_cli

DEFAULT_ZMQ = "tcp://127.0.0.1:5555"


def add_arguments(p: argparse.ArgumentParser) -> None:
    bridge_cli.add_arguments(p)
    p.set_defaults(zmq=None)                 # tell "not given" from the default
    try:
        from gllm.http import cli as http_cli
    except ImportError:                       # the http extra is not installed
        return
    http_cli.add_arguments(p, http_default=None)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", stream=sys.stderr)
    use_http = getattr(args, "http", None) is not None
    zmq = getattr(args, "zmq", None)
    if zmq is None and not use_http:
        zmq = DEFAULT_ZMQ
    args.zmq = zmq
    http_cli = None
    try:  # refuse a bad configuration before loading anything
        bridge_config = bridge_cli.config_from_args(args) if args.zmq else None
        if use_http:
            from gllm.http import cli as http_cli
            http_cli.check_args(args)
        params = (http_cli or bridge_cli).engine_params(args)
    except (ValueError, OSError) as exc:
        print(f"gllm serve: error: {exc}", file=sys.stderr)
        return 2

    from gllm.engine import LLMEngine
    try:
        engine = LLMEngine(args.model, params, device=args.device)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"gllm serve: error: {exc}", file=sys.stderr)
        return 1
    print(f"gllm serve: {engine.model_name} on {engine.device} (loaded in {engine.load_seconds:.1f} s)",
          file=sys.stderr, flush=True)
    front = bridge = None
    try:
        metrics = None
        if use_http:
            from gllm.http import Metrics
            metrics = Metrics(engine)
            front = http_cli.front_end_from_args(args, engine, metrics)
            print(f"{http_cli.READY_PREFIX}{front.start()}", flush=True)
        if bridge_config is not None:
            from gllm.bridge.server import BridgeServer
            bridge = BridgeServer(engine, bridge_config,
                                  on_clients_changed=metrics.set_bridge_clients if metrics else None)
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
