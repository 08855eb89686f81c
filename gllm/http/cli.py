"""`python -m gllm.http` (and the HTTP half of `gllm serve`): the engine behind the OpenAI-compatible API.

Prints one line ``gllm http listening on http://HOST:PORT`` on stdout once the socket listens (tools
and tests wait for it), serves until SIGINT/SIGTERM, then ends every request and exits 0. Exit status
2 for a refused configuration (a non-loopback address without an API key, a bad flag value), 1 for a
failed start (model not loadable, address in use).

`add_arguments` composes with the bridge's: a flag the parser already has (``--model``, ``--device``,
``--insecure``, the engine sizing flags, ``--log-level``) is left as it is and shared, so `gllm serve`
can offer ``--zmq`` and ``--http`` over one engine. For that, `front_end_from_args(args, engine,
metrics)` builds the `HttpFrontEnd` without loading anything.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

READY_PREFIX = "gllm http listening on "
API_KEY_ENV = "GLLM_API_KEY"


def _add(container: Any, *flags: str, **kwargs: Any) -> None:
    """Add an option unless the parser already has it (it is then shared with another front end)."""
    try:
        container.add_argument(*flags, **kwargs)
    except argparse.ArgumentError:
        pass


def _positive(kind: type, name: str):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{name} must be > 0, got {text}")
        return value
    return parse


def add_arguments(p: argparse.ArgumentParser, *, http_default: str | None = "127.0.0.1:8080") -> None:
    """The HTTP server's flags; ``http_default=None`` makes ``--http`` opt-in (for `gllm serve`, where the
    bridge is the default front end and `front_end_from_args` then returns None without ``--http``)."""
    _add(p, "--model", default=None,
         help="known name, HF-format folder, .gguf or HF cache id (default: the default model)")
    _add(p, "--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    http = p.add_argument_group("HTTP (OpenAI-compatible API, /metrics, dashboard at /)")
    _add(http, "--http", default=http_default, metavar="HOST:PORT",
         help=f"where to listen ({'default ' + http_default if http_default else 'off unless given'}; "
              f"port 0 picks a free one)")
    _add(http, "--api-key", default=None,
         help=f"bearer key every /v1 and /metrics request must carry (or env {API_KEY_ENV})")
    _add(http, "--api-key-file", default=None, help="read the API key from this file")
    _add(http, "--insecure", action="store_true",
         help="allow a non-loopback address without authentication")
    _add(http, "--served-model-name", default=None,
         help="the model id clients see and send (default: the model's name, a folder by its last part)")
    _add(http, "--allow-origin", action="append", default=None, metavar="ORIGIN",
         help="CORS: let browser pages from ORIGIN call the API (repeatable; '*' for any)")
    _add(http, "--allow-host", action="append", default=None, metavar="NAME",
         help="without an API key only loopback Host names are answered: also answer this one (repeatable; "
              "'*' for any)")
    _add(http, "--max-body-mb", type=_positive(float, "--max-body-mb"), default=2.0,
         help="largest request body accepted, MiB (default 2; larger gets 413)")
    _add(http, "--body-timeout-s", type=_positive(float, "--body-timeout-s"), default=30.0,
         help="a request body must arrive within this many seconds (default 30; slower gets 408)")
    _add(http, "--default-max-tokens", type=_positive(int, "--default-max-tokens"), default=None,
         help="max_tokens when a request gives none (default: up to max_seq_len)")
    _add(http, "--access-log", action="store_true", help="log every HTTP request")
    eng = p.add_argument_group("engine")
    for flag, kind, text in (("--max-batch-size", int, "sequences decoding at once"),
                             ("--max-seq-len", int, "prompt + output tokens of one request"),
                             ("--block-size", int, "tokens per KV block"),
                             ("--max-step-tokens", int, "tokens computed per engine step"),
                             ("--kv-cache-tokens", int, "KV cache capacity in tokens"),
                             ("--kv-cache-mb", float, "or a KV cache budget in MiB"),
                             ("--cpu-threads", int, "torch threads on CPU"),
                             ("--max-waiting-requests", int, "requests queued beyond which new ones get 503")):
        _add(eng, flag, type=_positive(kind, flag), default=None, help=text)
    _add(eng, "--dtype", default=None, help="auto, float32, bfloat16, float16")
    _add(eng, "--no-prefix-caching", action="store_true", help="turn prefix caching off")
    _add(eng, "--compute-nice", type=int, default=None, choices=range(0, 20), metavar="0-19",
         help="lower the engine's compute threads' OS priority by this, so the game comes first "
              "(default 10; 0 keeps the server's priority)")
    _add(eng, "--prompt-as-text", action="store_true",
         help="encode special-token strings in a raw prompt as text too (chat messages always are)")
    _add(p, "--log-level", default="WARNING", help="logging level (default WARNING)")


def engine_params(args: argparse.Namespace):
    from gllm.engine import GeneratorParams
    from gllm.engine.params import SERVER_COMPUTE_NICE
    names = ("max_batch_size", "max_seq_len", "block_size", "max_step_tokens", "kv_cache_tokens", "kv_cache_mb",
             "cpu_threads", "dtype", "max_waiting_requests")
    fields = {n: getattr(args, n, None) for n in names}
    fields = {k: v for k, v in fields.items() if v is not None}
    if getattr(args, "no_prefix_caching", False):
        fields["enable_prefix_caching"] = False
    if getattr(args, "prompt_as_text", False):
        fields["prompt_special_tokens"] = False
    nice = getattr(args, "compute_nice", None)
    fields["compute_nice"] = SERVER_COMPUTE_NICE if nice is None else nice
    return GeneratorParams(**fields)


def api_key_from_args(args: argparse.Namespace) -> str | None:
    key = getattr(args, "api_key", None) or os.environ.get(API_KEY_ENV) or None
    path = getattr(args, "api_key_file", None)
    if path:
        key = Path(path).read_text().strip()
        if not key:
            raise ValueError(f"the API key file {path} is empty")
    return key


def check_args(args: argparse.Namespace) -> tuple[str, int, str | None]:
    """Validate the HTTP flags before anything is loaded: (host, port, api_key); ValueError if refused."""
    from gllm.http.server import is_loopback_host, parse_address
    if not getattr(args, "http", None):
        raise ValueError("no --http address given")
    host, port = parse_address(args.http)
    key = api_key_from_args(args)
    if not key and not getattr(args, "insecure", False) and not is_loopback_host(host):
        raise ValueError(f"refusing to serve HTTP on {host}, which is not loopback, without an API key: give "
                         f"--api-key (or {API_KEY_ENV}), or --insecure to accept anyone who can reach it")
    return host, port, key


def front_end_from_args(args: argparse.Namespace, engine: Any, metrics: Any = None):
    """The `HttpFrontEnd` the flags describe (not started), or None when ``--http`` is off."""
    from gllm.http.server import HttpFrontEnd
    if not getattr(args, "http", None):
        return None
    host, port, key = check_args(args)
    return HttpFrontEnd(engine, host, port, api_key=key, insecure=getattr(args, "insecure", False), metrics=metrics,
                        served_model_name=args.served_model_name, max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                        cors_origins=args.allow_origin or (), default_max_tokens=args.default_max_tokens,
                        access_log=args.access_log, allowed_hosts=args.allow_host or (),
                        body_timeout_s=args.body_timeout_s)


def run(args: argparse.Namespace) -> int:
    """Serve HTTP alone (the same runner as `gllm serve`, without --zmq)."""
    from gllm.serve import run as serve
    return serve(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gllm.http", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
