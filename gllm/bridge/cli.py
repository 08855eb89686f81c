"""`gllm serve` (also `python -m gllm.bridge`): the engine behind a ZeroMQ ROUTER socket.

Prints one line ``gllm bridge listening on <endpoint>`` on stdout once bound (tools and tests wait
for it), serves until SIGINT/SIGTERM, then ends every request and exits 0. Exit status 2 for a
refused configuration (such as a public address without authentication), 1 for a failed start.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from gllm.bridge import protocol as P

READY_PREFIX = "gllm bridge listening on "


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="known name, HF-format folder, .gguf or HF cache id (default: the default model)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--zmq", default="tcp://127.0.0.1:5555", metavar="ENDPOINT",
                   help="where to bind the ROUTER socket (default tcp://127.0.0.1:5555; "
                        "tcp://127.0.0.1:* picks a free port)")
    auth = p.add_argument_group("authentication (required for a non-loopback --zmq)")
    auth.add_argument("--token", default=None, help="shared secret every hello must carry (or env GLLM_BRIDGE_TOKEN)")
    auth.add_argument("--token-file", default=None, help="read the shared secret from this file")
    auth.add_argument("--curve-secret-key", default=None,
                      help="CURVE: the server's z85 secret key, or a file holding it (encrypts the connection)")
    auth.add_argument("--curve-clients", default=None,
                      help="CURVE: file of z85 client public keys allowed, one per line (authenticates clients)")
    auth.add_argument("--insecure", action="store_true",
                      help="allow a non-loopback --zmq with no token and no CURVE client list")
    lim = p.add_argument_group("limits")
    lim.add_argument("--lease-s", type=float, default=5.0,
                     help="drop a client silent this long and cancel its requests (default 5)")
    lim.add_argument("--max-inflight", type=int, default=16, help="generate requests in flight per client (default 16)")
    lim.add_argument("--max-message-bytes", type=int, default=P.DEFAULT_MAX_MESSAGE_BYTES,
                     help=f"largest message accepted (default {P.DEFAULT_MAX_MESSAGE_BYTES})")
    lim.add_argument("--max-clients", type=int, default=256, help="sessions at once (default 256)")
    lim.add_argument("--max-send-queue", type=int, default=1024,
                     help="messages queued for a client that is not reading before it is dropped (default 1024)")
    lim.add_argument("--heartbeat-ms", type=int, default=1000, help="ZMTP PING interval, 0 for none (default 1000)")
    lim.add_argument("--sndhwm", type=int, default=1000, help=argparse.SUPPRESS)
    lim.add_argument("--sndbuf", type=int, default=0, help=argparse.SUPPRESS)
    eng = p.add_argument_group("engine")
    eng.add_argument("--max-batch-size", type=int, default=None, help="sequences decoding at once")
    eng.add_argument("--max-seq-len", type=int, default=None, help="prompt + output tokens of one request")
    eng.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    eng.add_argument("--max-step-tokens", type=int, default=None, help="tokens computed per engine step")
    eng.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache capacity in tokens")
    eng.add_argument("--kv-cache-mb", type=float, default=None, help="or a KV cache budget in MiB")
    eng.add_argument("--cpu-threads", type=int, default=None, help="torch threads on CPU")
    eng.add_argument("--dtype", default=None, help="auto, float32, bfloat16, float16")
    eng.add_argument("--no-prefix-caching", action="store_true", help="turn prefix caching off")
    eng.add_argument("--compute-nice", type=int, default=None, choices=range(0, 20), metavar="0-19",
                     help="lower the engine's compute threads' OS priority by this, so the game comes first "
                          "(default 10; 0 keeps the server's priority)")
    eng.add_argument("--prompt-as-text", action="store_true",
                     help="encode special-token strings in a raw prompt as text too (chat messages always are)")
    p.add_argument("--log-level", default="WARNING", help="logging level (default WARNING)")


def config_from_args(args: argparse.Namespace):
    from gllm.bridge.server import ServerConfig
    token = args.token or os.environ.get("GLLM_BRIDGE_TOKEN") or None
    if args.token_file:
        token = Path(args.token_file).read_text().strip()
    secret = None
    if args.curve_secret_key:
        secret = _z85_arg(args.curve_secret_key)
    clients = None
    if args.curve_clients:
        clients = frozenset(line.strip().encode() for line in Path(args.curve_clients).read_text().splitlines()
                            if line.strip() and not line.startswith("#"))
    cfg = ServerConfig(address=args.zmq, token=token, insecure=args.insecure, lease_s=args.lease_s,
                       max_inflight=args.max_inflight, max_message_bytes=args.max_message_bytes,
                       max_clients=args.max_clients, max_send_queue=args.max_send_queue, sndhwm=args.sndhwm,
                       heartbeat_ms=args.heartbeat_ms, curve_secret_key=secret, curve_clients=clients,
                       sndbuf=args.sndbuf)
    cfg.validate()
    return cfg


def _z85_arg(value: str) -> bytes:
    path = Path(value)
    if len(value) != 40 and path.exists():
        value = path.read_text().strip()
    if len(value) != 40:
        raise ValueError("a CURVE key is 40 characters of z85")
    return value.encode()


def engine_params(args: argparse.Namespace):
    from gllm.engine import GeneratorParams
    from gllm.engine.params import SERVER_COMPUTE_NICE
    fields = {"max_batch_size": args.max_batch_size, "max_seq_len": args.max_seq_len, "block_size": args.block_size,
              "max_step_tokens": args.max_step_tokens, "kv_cache_tokens": args.kv_cache_tokens,
              "kv_cache_mb": args.kv_cache_mb, "cpu_threads": args.cpu_threads, "dtype": args.dtype}
    fields = {k: v for k, v in fields.items() if v is not None}
    if args.no_prefix_caching:
        fields["enable_prefix_caching"] = False
    if args.prompt_as_text:
        fields["prompt_special_tokens"] = False
    fields["compute_nice"] = SERVER_COMPUTE_NICE if args.compute_nice is None else args.compute_nice
    return GeneratorParams(**fields)


def run(args: argparse.Namespace) -> int:
    """Serve the bridge alone (the same runner as `gllm serve`, without --http)."""
    from gllm.serve import run as serve
    return serve(args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gllm.bridge", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))
