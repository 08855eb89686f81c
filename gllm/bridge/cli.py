"""The bridge's command-line flags: where the ROUTER socket listens, authentication, limits.

`gllm.serve` composes them with the engine's flags (`gllm.frontend.engine_flags`) into `gllm serve` and
`python -m gllm.bridge`, and runs the server. Once bound, the server prints one line
``gllm bridge listening on <endpoint>`` on stdout (tools and tests wait for it).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

from gllm.bridge import protocol as P

if TYPE_CHECKING:
    from gllm.bridge.server import ServerConfig

READY_PREFIX = "gllm bridge listening on "


def add_arguments(p: argparse.ArgumentParser) -> None:
    """``--zmq`` and the bridge's authentication and limits flags (``--insecure`` is `gllm.serve`'s, shared
    with HTTP)."""
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


def config_from_args(args: argparse.Namespace) -> ServerConfig:
    """The `ServerConfig` the flags describe, validated (ValueError if refused, OSError for a missing file)."""
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
