"""`BridgeServer`: one engine behind a ZeroMQ ROUTER socket, for any number of DEALER clients.

Threads:
- the I/O thread (whoever calls `serve_forever`) owns the ROUTER socket and every client's state; it holds
  `_lock` whenever it touches either. It never calls into the engine except `stats()`, which only reads
  counters.
- two submit threads call `engine.add_request` / `engine.cancel` in arrival order (tokenizing a long
  prompt takes milliseconds; the I/O loop does not wait for it): one for ordinary requests, one for those
  with more than `BULK_CHARS` of text, so that a flood of huge prompts never delays another NPC's request.
  Each request's add and cancel go through the same one.
- the engine thread runs `on_event` callbacks, which only append to a queue, and the end-of-step listener
  (`EngineAPI.add_step_listener`), which sends the step's messages itself when `_lock` is free.

Delivery: events of one engine step are gathered per client and sent as one ``tokens`` message once the
step is over. At the end of each step the engine thread takes `_lock` without waiting and encodes and
sends every client's messages itself: no hand-off to the I/O thread, whose wake-up would wait for the GIL
behind the next step's Python code (0.4 ms on average and several ms at p99, measured). If the I/O thread
holds the lock, the engine thread wakes it instead and goes on. Sharing the socket this way is what ZeroMQ
allows (one thread at a time, a full memory barrier between them): the I/O thread waits on the socket's
file descriptor, which is an OS object, not on the socket, and whoever used the socket last checks it for
input before letting go (the descriptor is edge-triggered). The I/O thread also sends a client's step
early once every request it has in flight has reported for it, or once the engine has started a later
step; `MAX_HOLD_S` bounds how long events can wait in any case.

Metrics: given a `gllm.frontend.metrics.Metrics` (as `gllm serve` does when HTTP is on), every ``generate``
is tracked as ``front_end="bridge"`` (its tokens, its outcome: done, error, cancelled), a ``generate``
refused before or by the engine is counted as rejected with its error code as the reason, and the number
of sessions is reported as the bridge clients gauge.

Backpressure: each client's messages go through its ZeroMQ pipe (``SNDHWM``) and then a bounded
backlog; a client whose backlog overflows is not reading and is dropped, its requests cancelled.
Liveness: a client silent for longer than the lease is dropped the same way. Sends use
``ROUTER_MANDATORY``, so a client whose connection is gone is noticed at the next send.

Abuse: a full server makes room by ending the longest idle session (pings do not keep a session first in
line); wrong tokens get answered three times, then each one costs its connection a doubling back-off;
routing ids are unpredictable (`gllm.bridge.routing_ids`). On `stop()`, requests in flight are cancelled
and their `done` messages sent (for up to `STOP_DRAIN_S`) before the socket closes.
"""

from __future__ import annotations

import collections
import functools
import hmac
import itertools
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import msgpack
import zmq

from gllm import __version__
from gllm.bridge import protocol as P
from gllm.bridge.memory_ops import engine_request_id, run_memory_op
from gllm.bridge.routing_ids import seed_libc_rand
from gllm.engine.errors import EngineBusy, RequestTooLong
from gllm.frontend.helpers import is_local_address, preview, require_positive, require_positive_int, short_model_name
from gllm.memory import release_free_memory
from gllm.request_fields import BRIDGE_FIELDS

if TYPE_CHECKING:
    from gllm.engine.interface import EngineAPI
    from gllm.engine.request import GenerationRequest, StepInfo, StreamEvent
    from gllm.frontend.metrics import Metrics

log = logging.getLogger("gllm.bridge")

MAX_HOLD_S = 0.05            # longest a step's tokens wait for the step to be known complete
LEASE_CHECK_S = 0.05
RECV_BATCH = 256             # inbound messages handled before looking at engine events again
BULK_CHARS = 32_768          # requests with more text than this are tokenized on their own thread
AUTH_FREE_FAILURES = 3       # wrong tokens in a row a connection gets answered at once (a typo, a retry)
AUTH_BACKOFF_S = (0.5, 8.0)  # then its hellos are ignored this long after each wrong one (doubling)
STOP_DRAIN_S = 2.0           # on stop, how long requests in flight get to send their `done` (cancelled)


@dataclass
class ServerConfig:
    address: str = "tcp://127.0.0.1:5555"
    token: str | None = None                # shared secret required in hello.token
    insecure: bool = False                  # allow a non-loopback bind with neither token nor CURVE
    lease_s: float = 5.0                    # a client silent this long is dropped, its requests cancelled
    max_inflight: int = 16                  # generate requests in flight per client
    max_message_bytes: int = P.DEFAULT_MAX_MESSAGE_BYTES
    max_clients: int = 256                  # sessions at once
    max_send_queue: int = 1024              # messages backlogged per client beyond ZeroMQ's SNDHWM
    sndhwm: int = 1000                      # ZeroMQ per-client pipe, in messages
    heartbeat_ms: int = 1000                # ZMTP PING interval (0: off); timeout is the lease
    curve_secret_key: bytes | None = None   # z85 server secret key: CURVE encryption
    curve_clients: frozenset[bytes] | None = None  # z85 client public keys allowed (None: any, with CURVE)
    sndbuf: int = 0                         # SO_SNDBUF for client connections (0: the OS default)

    def validate(self) -> None:
        for name in ("max_inflight", "max_message_bytes", "max_clients", "max_send_queue", "sndhwm"):
            require_positive_int(name, getattr(self, name))
        require_positive("lease_s", self.lease_s)
        if self.token is not None and not 0 < len(self.token.encode()) <= P.MAX_TOKEN_BYTES:
            raise ValueError(f"token must be 1 to {P.MAX_TOKEN_BYTES} bytes")
        if self.curve_clients is not None and self.curve_secret_key is None:
            raise ValueError("curve_clients needs curve_secret_key")
        if self.authenticated or self.insecure or is_local_address(self.address):
            return
        raise ValueError(f"refusing to listen on {self.address}, which is not loopback, without authentication: "
                         f"give --token (or CURVE keys with an allowed-clients list), or --insecure to accept "
                         f"anyone who can reach it")

    @property
    def authenticated(self) -> bool:
        return self.token is not None or (self.curve_secret_key is not None and self.curve_clients is not None)


@dataclass(eq=False)
class _Client:
    ident: bytes
    serial: int
    name: str
    last_seen: float
    last_active: float = 0.0       # last hello or generate: pings keep a session alive, not first in line
    live: dict[str, str] = field(default_factory=dict)       # client id -> engine id
    bulk: set[str] = field(default_factory=set)               # client ids submitted through the bulk lane
    pending_step: int | None = None
    pending_items: list[dict[str, Any]] = field(default_factory=list)
    reported: set[str] = field(default_factory=set)
    pending_after: list[bytes] = field(default_factory=list)  # done messages, sent after the step's tokens
    hold_since: float = 0.0
    backlog: collections.deque[bytes] = field(default_factory=collections.deque)
    closed: bool = False


# What the engine and submit threads hand the I/O thread (`BridgeServer._events`) ...
@dataclass(slots=True)
class _EngineEvent:
    """An engine event of one of a client's requests (on the engine thread)."""
    client: _Client
    cid: str                       # the client's id of the request
    event: StreamEvent


@dataclass(slots=True)
class _Rejected:
    """`add_request` refused a request (on a submit thread): answer with an error."""
    client: _Client
    cid: str
    code: str
    message: str


# ... and what the I/O thread hands the submit lanes (`BridgeServer._submit_q`, `_bulk_q`; None ends a lane).
@dataclass(slots=True)
class _Add:
    client: _Client
    cid: str
    req: GenerationRequest


@dataclass(slots=True)
class _Cancel:
    engine_id: str


_SubmitJob = Union[_Add, _Cancel, None]


# NPC memory (issue #23): an op for the memory lane (`BridgeServer._memory_q`), and its answer for the I/O thread.
@dataclass(slots=True)
class _MemoryJob:
    client: _Client
    msg: P.MemoryMessage


@dataclass(slots=True)
class _Reply:
    client: _Client
    msg: dict[str, Any]


class BridgeServer:
    def __init__(self, engine: EngineAPI, config: ServerConfig | None = None, *,
                 context: zmq.Context | None = None, model_name: str | None = None,
                 metrics: Metrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics          # shared with the other front ends: requests, rejections, sessions
        self.config = config = config or ServerConfig()
        config.validate()
        self.model_name = model_name or short_model_name(engine.model_name)
        self._own_ctx = context is None     # then terminated on stop, after the last messages went out
        self.ctx = context or zmq.Context()
        self.endpoint: str | None = None
        self.clients: dict[bytes, _Client] = {}
        self._ended: collections.OrderedDict[bytes, str] = collections.OrderedDict()  # ident -> why
        # ident -> (failed hellos in a row, until when its hellos are ignored): bounds token guessing
        self._auth_failures: collections.OrderedDict[bytes, tuple[int, float]] = collections.OrderedDict()
        self._serials = itertools.count(1)
        self._events: collections.deque[_EngineEvent | _Rejected | _Reply] = collections.deque()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_flag = False
        self._lock = threading.Lock()   # the ROUTER socket and client state: the I/O thread, or the engine thread
        self._stop = False
        # Two submit lanes, so a huge prompt being tokenized never holds up an ordinary one (each lane keeps
        # the order of its requests' add and cancel).
        self._submit_q: queue.SimpleQueue[_SubmitJob] = queue.SimpleQueue()
        self._bulk_q: queue.SimpleQueue[_SubmitJob] = queue.SimpleQueue()
        self._submitters: list[threading.Thread] = []
        self._memory_q: queue.SimpleQueue[_MemoryJob | None] = queue.SimpleQueue()   # NPC-memory ops, in order
        self._thread: threading.Thread | None = None     # the I/O thread, when `start()` made it
        self._auth = None
        self.router: zmq.Socket | None = None
        self.counters = collections.Counter()
        # The last step the engine has finished delivering (written by the engine thread's step listener).
        self._completed_step = int(engine.num_steps)
        engine.add_step_listener(self._on_step_end)
        if metrics is not None:
            metrics.attach(engine)      # step times and engine gauges (a no-op if HTTP attached it already)

    # ------------------------------------------------------------------------------ lifecycle
    def bind(self) -> str:
        cfg = self.config
        seed_libc_rand()      # the ROUTER's generated peer ids start at rand(): see gllm.bridge.routing_ids
        r = self.ctx.socket(zmq.ROUTER)
        r.setsockopt(zmq.LINGER, 0)
        r.setsockopt(zmq.ROUTER_MANDATORY, 1)
        r.setsockopt(zmq.SNDHWM, cfg.sndhwm)
        r.setsockopt(zmq.RCVHWM, 1000)
        r.setsockopt(zmq.MAXMSGSIZE, 4 * cfg.max_message_bytes + 1024)  # beyond this libzmq cuts the connection
        if cfg.sndbuf:
            r.setsockopt(zmq.SNDBUF, cfg.sndbuf)
        if cfg.heartbeat_ms > 0:
            r.setsockopt(zmq.HEARTBEAT_IVL, cfg.heartbeat_ms)
            r.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(int(cfg.lease_s * 1000), cfg.heartbeat_ms))
        if cfg.curve_secret_key is not None:
            self._start_curve(r)
        r.bind(cfg.address)
        self.router = r
        self.endpoint = r.getsockopt_string(zmq.LAST_ENDPOINT)
        return self.endpoint

    def _start_curve(self, r: zmq.Socket) -> None:
        cfg = self.config
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq was built without CURVE")
        if cfg.curve_clients is not None:
            from zmq.auth.thread import ThreadAuthenticator
            allowed = cfg.curve_clients

            class _Keys:
                def callback(self, domain: str, key: bytes) -> bool:   # key: the client's z85 public key
                    return key in allowed

            self._auth = ThreadAuthenticator(self.ctx)
            self._auth.start()
            self._auth.configure_curve_callback("*", credentials_provider=_Keys())
        r.curve_secretkey = cfg.curve_secret_key
        r.curve_server = True

    def serve_forever(self, ready: Callable[[str], None] | None = None) -> None:
        """Run the I/O loop on this thread until `stop()`."""
        if self.router is None:
            self.bind()
        self._submitters = [threading.Thread(target=self._submit_loop, args=(q,), name=name, daemon=True)
                            for q, name in ((self._submit_q, "gllm-bridge-submit"), (self._bulk_q, "gllm-bridge-bulk"))]
        for t in self._submitters:
            t.start()
        memory = threading.Thread(target=self._memory_loop, name="gllm-bridge-memory", daemon=True)
        memory.start()
        if ready is not None:
            ready(self.endpoint)
        try:
            self._loop()
        finally:
            with self._lock:
                for c in list(self.clients.values()):
                    self._end_client(c, "server stopping")
            for q, t in zip((self._submit_q, self._bulk_q), self._submitters):
                q.put(None)
                t.join(timeout=5)
            self._memory_q.put(None)
            memory.join(timeout=5)
            with self._lock:   # the engine thread checks `router` under the lock before sending
                self.router.close(linger=int(STOP_DRAIN_S * 1000))   # what is queued still goes out
                self.router = None
            if self._auth is not None:
                self._auth.stop()
            self._wake_r.close()
            self._wake_w.close()
            if self._own_ctx:
                self.ctx.term()     # returns once queued messages are sent (or the linger is over)
            self.engine.remove_step_listener(self._on_step_end)

    def _clients_changed(self) -> None:
        if self.metrics is not None:
            self.metrics.set_bridge_clients(len(self.clients))

    def _count_rejected(self, code: str) -> None:
        """A generate refused before it reached the engine (I/O thread)."""
        if self.metrics is not None:
            self.metrics.count_rejected("bridge", code)

    def start(self) -> threading.Thread:
        """Serve on a background thread (tests, embedding); returns once bound."""
        self.bind()
        t = threading.Thread(target=self.serve_forever, name="gllm-bridge-io", daemon=True)
        t.start()
        self._thread = t
        return t

    def stop(self) -> None:
        """Ask the I/O loop to end (thread-safe); with `start()`, also waits for it."""
        self._stop = True
        self._wake()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=10)

    # ------------------------------------------------------------------------------ cross-thread
    def _post(self, item: _Rejected | _Reply) -> None:
        self._events.append(item)
        if not self._wake_flag:
            self._wake_flag = True
            self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full: a wake is already pending (or we are shutting down)

    def _on_engine_event(self, c: _Client, cid: str, ev: StreamEvent) -> None:
        """On the engine thread: queue the event. The step's end sends it (or wakes the I/O thread); an event
        from outside a step (a request cancelled between steps carries the number of the step before) has no
        step end coming, so it wakes the I/O thread now."""
        self._events.append(_EngineEvent(c, cid, ev))
        if ev.step <= self._completed_step:
            self._wake_now()

    def _on_step_end(self, info: StepInfo) -> None:
        """Engine thread, after every step's events were handed over: send them now if the I/O thread is not
        using the socket; otherwise wake it to do so. Never waits (the engine does not wait on clients)."""
        self._completed_step = info.step
        if not self._lock.acquire(blocking=False):
            self._wake_now()     # it will see `_completed_step` when it next flushes
            return
        try:
            if self.router is None:
                return
            # Events of this step may already sit in a client's pending items (the I/O thread drained them
            # mid-step): look at those too, not only at the queue.
            if not (self._events or any(c.pending_step is not None for c in self.clients.values())):
                return
            self._drain_events()
            self._flush_ready(time.monotonic())
            wake = (bool(self.router.getsockopt(zmq.EVENTS) & zmq.POLLIN) or bool(self._events)
                    or any(c.backlog or c.pending_step is not None for c in self.clients.values()))
        except Exception:   # the engine thread must never die of a front end's bug
            log.exception("sending step %s failed", info.step)
            wake = True
        finally:
            self._lock.release()
        if wake:   # input arrived (the fd may not signal it again), or something is left for the I/O thread
            self._wake_now()

    def _wake_now(self) -> None:
        if not self._wake_flag:
            self._wake_flag = True
            self._wake()

    def _submit_loop(self, jobs: queue.SimpleQueue[_SubmitJob]) -> None:
        while True:
            job = jobs.get()
            if job is None:
                return
            if isinstance(job, _Cancel):
                try:
                    self.engine.cancel(job.engine_id)
                except Exception:
                    log.exception("cancel %s failed", job.engine_id)
                continue
            client, cid, req = job.client, job.cid, job.req
            if client.closed:  # dropped while queued: never started
                if self.metrics is not None:
                    self.metrics.count_rejected("bridge", "client_gone")
                continue
            callback = functools.partial(self._on_engine_event, client, cid)
            tracker = None
            if self.metrics is not None:
                tracker = self.metrics.track(req.request_id, callback, front_end="bridge", kind=_kind(req),
                                             preview=_preview(req))
                callback = tracker.on_event
            try:
                self.engine.add_request(req, callback)
            except ValueError as exc:
                code = (P.TOO_LONG if isinstance(exc, RequestTooLong) else P.BUSY if isinstance(exc, EngineBusy)
                        else P.BAD_REQUEST)
                if tracker is not None:
                    tracker.reject(code)
                self._post(_Rejected(client, cid, code, str(exc)))
            except Exception as exc:
                log.exception("add_request failed")
                if tracker is not None:
                    tracker.reject(P.INTERNAL)
                self._post(_Rejected(client, cid, P.INTERNAL, f"{type(exc).__name__}: {exc}"))
            if client.closed:  # dropped while we were submitting: make sure it does not run
                self.engine.cancel(req.request_id)
            if jobs is self._bulk_q:   # a huge prompt is done with: give the pages it took back to the OS
                del job, req, callback, tracker
                release_free_memory()

    def _memory_loop(self) -> None:
        """The memory lane: snapshot, restore, pin, unpin and embed wait for the engine thread, so they run here,
        one at a time in arrival order, never on the I/O thread or a generate's lane."""
        while True:
            job = self._memory_q.get()
            if job is None:
                return
            if job.client.closed:
                continue
            try:
                reply = run_memory_op(self.engine, job.client.serial, job.msg, self.config.max_message_bytes)
            except Exception as exc:
                log.exception("%s failed", type(job.msg).__name__)
                reply = P.error(job.msg.id, P.INTERNAL, f"{type(exc).__name__}: {exc}")
            self._post(_Reply(job.client, reply))

    # ------------------------------------------------------------------------------ I/O loop
    def _loop(self) -> None:
        router = self.router
        with self._lock:
            router_fd = router.getsockopt(zmq.FD)
        poller = zmq.Poller()
        poller.register(router_fd, zmq.POLLIN)     # the socket's fd, not the socket: see the module docstring
        poller.register(self._wake_r.fileno(), zmq.POLLIN)
        next_lease_check = time.monotonic() + LEASE_CHECK_S
        timeout = 0
        drain_until: float | None = None
        while True:
            if self._stop and drain_until is None:   # cancel what is in flight; its `done`s go out first
                drain_until = time.monotonic() + STOP_DRAIN_S
                with self._lock:
                    for c in self.clients.values():
                        for cid, engine_id in c.live.items():
                            self._lane(c, cid).put(_Cancel(engine_id))
            if drain_until is not None:
                with self._lock:
                    settled = not any(c.live or c.backlog or c.pending_step is not None
                                      for c in self.clients.values())
                if settled or time.monotonic() > drain_until:
                    break
                timeout = min(timeout, 5)
            ready = dict(poller.poll(timeout))
            if self._wake_r.fileno() in ready:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except (BlockingIOError, OSError):
                    pass
            with self._lock:
                self._wake_flag = False
                more_input = False
                if router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    for _ in range(RECV_BATCH):
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=True)
                        except zmq.Again:
                            break
                        self._on_message(frames)
                    else:
                        more_input = True
                self._drain_events()
                now = time.monotonic()
                self._flush_ready(now)
                backlogged = False
                for c in list(self.clients.values()):
                    if c.backlog:
                        self._pump(c)
                        backlogged = backlogged or bool(c.backlog)
                if now >= next_lease_check:
                    next_lease_check = now + LEASE_CHECK_S
                    self._check_leases(now)
                # step ends send or wake; the tick is only a safety net for held events
                busy = any(c.pending_step is not None for c in self.clients.values())
                # last touch of the socket before sleeping on its edge-triggered fd: is input already waiting?
                more_input = more_input or bool(router.getsockopt(zmq.EVENTS) & zmq.POLLIN)
            timeout = 0 if more_input else 1 if busy else 2 if backlogged else int(LEASE_CHECK_S * 1000)

    # ------------------------------------------------------------------------------ inbound
    def _on_message(self, frames: list[bytes]) -> None:
        ident = frames[0]
        client = self.clients.get(ident)
        now = time.monotonic()
        if client is not None:
            client.last_seen = now
        self.counters["received"] += 1
        if len(frames) != 2:
            self._reply(ident, client, P.error(None, P.BAD_REQUEST,
                                               f"a message must be exactly one frame, got {len(frames) - 1}"))
            return
        raw = frames[1]
        try:
            msg = P.decode(raw, self.config.max_message_bytes)
        except P.ProtocolError as exc:
            self._reply(ident, client, exc.to_message())
            return
        try:
            parsed = P.validate_client_message(msg)
        except P.ProtocolError as exc:
            if exc.request_id is not None and client is not None and exc.request_id in client.live:
                exc = P.ProtocolError(P.DUPLICATE_ID, f"id {exc.request_id!r} is already in flight; "
                                      f"this message was ignored", exc.request_id)
            if msg.get("op") == "generate":
                self._count_rejected(exc.code)
            self._reply(ident, client, exc.to_message())
            return
        except Exception as exc:  # a validator bug must not take the server down
            log.exception("validating a message failed")
            if msg.get("op") == "generate":
                self._count_rejected(P.INTERNAL)
            self._reply(ident, client, P.error(P.readable_id(msg), P.INTERNAL, f"{type(exc).__name__}: {exc}"))
            return
        try:
            self._dispatch(ident, client, parsed, now)
        except Exception as exc:
            log.exception("handling %s failed", type(parsed).__name__)
            rid = None
            if isinstance(parsed, P.Generate):
                rid = parsed.id
                self._count_rejected(P.INTERNAL)
            self._reply(ident, self.clients.get(ident), P.error(rid, P.INTERNAL, f"{type(exc).__name__}: {exc}"))

    def _dispatch(self, ident: bytes, client: _Client | None, m: P.ClientMessage, now: float) -> None:
        if isinstance(m, P.Hello):
            self._on_hello(ident, client, m, now)
            return
        if client is None:
            why = self._ended.get(ident)
            text = f"session ended ({why}); send hello" if why else "send hello first"
            if isinstance(m, P.Generate):
                self._count_rejected(P.NO_SESSION)
            self._reply(ident, None, P.error(m.id if isinstance(m, P.Generate) else None, P.NO_SESSION, text))
            return
        if isinstance(m, P.Generate):
            self._on_generate(client, m)
        elif isinstance(m, P.Cancel):
            engine_id = client.live.get(m.id)
            if engine_id is not None:  # an id not in flight is ignored: it may have just finished
                self._lane(client, m.id).put(_Cancel(engine_id))
        elif isinstance(m, P.Ping):
            if _has_bin_or_ext(m.t):   # the server never sends bin or ext (PROTOCOL.md §3): no echo of them
                self._send(client, P.encode(P.error(None, P.BAD_REQUEST, "ping.t must not contain bin or ext "
                                                    "values (the server never sends them)")))
            else:
                self._send(client, P.encode(P.pong(m.t)))
        elif isinstance(m, P.Frame):
            self.engine.report_frame(m.ms, m.target_ms or None, source=f"bridge/{client.serial}", max_ms=m.max_ms,
                                     frames=m.frames, over=m.over)
        elif isinstance(m, P.Idle):
            self.engine.report_idle(m.ms, source=f"bridge/{client.serial}")
        elif isinstance(m, (P.Snapshot, P.Restore, P.Pin, P.Unpin, P.Embed)):
            if self._stop:
                self._send(client, P.encode(P.error(m.id, P.BUSY, "the server is stopping")))
            else:
                self._memory_q.put(_MemoryJob(client, m))
        elif isinstance(m, P.Stats):
            values = dict(self.engine.stats())
            values["clients"] = len(self.clients)
            values["inflight"] = len(client.live)
            self._send(client, P.encode(P.stats(values)))

    def _on_hello(self, ident: bytes, client: _Client | None, m: P.Hello, now: float) -> None:
        token = self.config.token
        if token is not None:
            failures, until = self._auth_failures.get(ident, (0, 0.0))
            if now < until:              # backing off: not checked, not answered
                self.counters["hello_ignored"] += 1
                return
            if m.token is None or not hmac.compare_digest(m.token.encode(), token.encode()):
                if client is not None:
                    self._end_client(client, "unauthorized hello")
                first, cap = AUTH_BACKOFF_S
                extra = failures + 1 - AUTH_FREE_FAILURES
                backoff = 0.0 if extra < 0 else min(first * 2 ** extra, cap)
                self._auth_failures[ident] = (failures + 1, now + backoff)
                self._auth_failures.move_to_end(ident)
                while len(self._auth_failures) > 4096:
                    self._auth_failures.popitem(last=False)
                later = f"; hellos on this connection are ignored for {backoff:g} s" if backoff else ""
                self._reply(ident, None, P.error(None, P.UNAUTHORIZED, f"missing or wrong token{later}"))
                return
            self._auth_failures.pop(ident, None)
        if client is None:
            if len(self.clients) >= self.config.max_clients and not self._evict_idle():
                self._reply(ident, None, P.error(None, P.BUSY, f"too many clients ({self.config.max_clients}), "
                                                 f"each with requests in flight"))
                return
            client = _Client(ident=ident, serial=next(self._serials), name=m.client, last_seen=now)
            self.clients[ident] = client
            self._clients_changed()
            self._ended.pop(ident, None)
        client.name = m.client
        client.last_active = now
        eng = self.engine
        self._send(client, P.encode(P.welcome(
            self.model_name, int(eng.gen_params.max_seq_len), f"gllm/{__version__}",
            lease_ms=int(self.config.lease_s * 1000), max_inflight=self.config.max_inflight,
            max_message_bytes=self.config.max_message_bytes, v=min(m.v, P.PROTOCOL_VERSION))))

    def _evict_idle(self) -> bool:
        """Make room for a new session by ending the idle one (no request in flight) that said hello or
        generate longest ago, so that sessions kept alive only by pings cannot lock a game's client out."""
        idle = [c for c in self.clients.values() if not c.live]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.last_active)
        self.counters["evicted"] += 1
        self._end_client(oldest, "evicted: the server was full and this session was the longest idle")
        return True

    def _on_generate(self, client: _Client, g: P.Generate) -> None:
        if self._stop:   # draining: what is in flight was cancelled, nothing new starts
            self._count_rejected(P.BUSY)
            self._send(client, P.encode(P.error(g.id, P.BUSY, "the server is stopping")))
            return
        if g.id in client.live:
            self._count_rejected(P.DUPLICATE_ID)
            self._send(client, P.encode(P.error(g.id, P.DUPLICATE_ID,
                                                f"id {g.id!r} is already in flight; this message was ignored")))
            return
        if len(client.live) >= self.config.max_inflight:
            self._count_rejected(P.BUSY)
            self._send(client, P.encode(P.error(g.id, P.BUSY, f"this client already has {len(client.live)} "
                                                f"requests in flight (max_inflight {self.config.max_inflight})")))
            return
        from gllm.engine.request import GenerationRequest  # here, so that config checks need no torch
        engine_id = engine_request_id(client.serial, g.id)
        req = GenerationRequest(prompt=g.prompt, messages=g.messages, request_id=engine_id,
                                **{f.name: getattr(g, f.wire_name) for f in BRIDGE_FIELDS})
        client.live[g.id] = engine_id
        client.last_active = time.monotonic()
        self.counters["generate"] += 1
        text = len(g.prompt) if g.prompt is not None else sum(len(m.get("content", "")) for m in g.messages or ())
        if text > BULK_CHARS:
            client.bulk.add(g.id)
        self._lane(client, g.id).put(_Add(client, g.id, req))

    def _lane(self, client: _Client, cid: str) -> queue.SimpleQueue:
        return self._bulk_q if cid in client.bulk else self._submit_q

    # ------------------------------------------------------------------------------ engine events
    def _drain_events(self) -> None:
        events = self._events
        while events:
            item = events.popleft()
            client = item.client
            if client.closed:
                continue
            if isinstance(item, _Reply):
                self._send(client, P.encode(item.msg))
            elif isinstance(item, _Rejected):
                client.live.pop(item.cid, None)
                client.bulk.discard(item.cid)
                self._send(client, P.encode(P.error(item.cid, item.code, item.message)))
            else:
                self._on_event(client, item.cid, item.event)

    def _on_event(self, c: _Client, cid: str, ev: StreamEvent) -> None:
        step = ev.step
        has_item = bool(ev.text) or bool(ev.token_ids)
        if has_item:
            if c.pending_step is not None and c.pending_step != step:
                self._flush(c)
            if c.pending_step is None:
                c.pending_step, c.hold_since = step, time.monotonic()
            lps = None
            if ev.logprobs is not None:
                lps = [P.logprob_entry(lp.token_id, lp.logprob, lp.top) for lp in ev.logprobs if lp is not None]
            c.pending_items.append(P.token_item(cid, ev.text, len(ev.token_ids), lps))
            c.reported.add(cid)
        elif c.pending_step == step:
            c.reported.add(cid)
        if ev.result is not None:
            c.live.pop(cid, None)
            c.bulk.discard(cid)
            r = ev.result
            payload = P.encode(P.done(cid, r.finish_reason, r.text, r.usage.prompt_tokens, r.usage.completion_tokens,
                                      r.timings.ttft_ms, r.timings.total_ms, error=r.error,
                                      cached_tokens=r.usage.cached_tokens,
                                      ttft_deadline_met=r.timings.ttft_deadline_met, cached=r.usage.cached))
            if c.pending_step is None:
                self._send(c, payload)
            else:
                c.pending_after.append(payload)

    def _flush_ready(self, now: float) -> None:
        engine_step = self.engine.num_steps
        completed = self._completed_step
        for c in list(self.clients.values()):
            if c.pending_step is None:
                continue
            if c.pending_step <= completed or all(cid in c.reported for cid in c.live):
                self._flush(c)
            elif engine_step > c.pending_step:
                self.counters["flush_next_step"] += 1
                self._flush(c)
            elif now - c.hold_since > MAX_HOLD_S:
                self.counters["flush_hold_timeout"] += 1
                log.debug("client %s: step %s still incomplete after %.0f ms; sending what it has",
                          c.ident.hex(), c.pending_step, MAX_HOLD_S * 1000)
                self._flush(c)

    def _flush(self, c: _Client) -> None:
        if c.pending_items:
            self._send(c, P.encode(P.tokens(c.pending_step, c.pending_items)))
            self.counters["tokens_messages"] += 1
        after = c.pending_after
        c.pending_step, c.pending_items, c.reported, c.pending_after = None, [], set(), []
        for payload in after:
            if c.closed:
                break
            self._send(c, payload)

    # ------------------------------------------------------------------------------ outbound
    def _reply(self, ident: bytes, client: _Client | None, msg: dict[str, Any]) -> None:
        self.counters["errors" if msg.get("op") == "error" else "replies"] += 1
        payload = P.encode(msg)
        if client is not None:
            self._send(client, payload)
            return
        try:  # no session: best effort, never queued
            self.router.send_multipart([ident, payload], zmq.NOBLOCK)
        except zmq.ZMQError:
            pass

    def _send(self, c: _Client, payload: bytes) -> None:
        if c.closed:
            return
        if c.backlog:
            c.backlog.append(payload)
            if len(c.backlog) > self.config.max_send_queue:
                self._end_client(c, "not reading: send queue full")
            return
        try:
            self.router.send_multipart([c.ident, payload], zmq.NOBLOCK)
            self.counters["sent"] += 1
        except zmq.Again:
            c.backlog.append(payload)
        except zmq.ZMQError as exc:
            if exc.errno == zmq.EHOSTUNREACH:
                self._end_client(c, "disconnected")
            else:
                log.warning("send to client %s failed: %s", c.name, exc)

    def _pump(self, c: _Client) -> None:
        while c.backlog and not c.closed:
            try:
                self.router.send_multipart([c.ident, c.backlog[0]], zmq.NOBLOCK)
                self.counters["sent"] += 1
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                if exc.errno == zmq.EHOSTUNREACH:
                    self._end_client(c, "disconnected")
                return
            c.backlog.popleft()

    # ------------------------------------------------------------------------------ session end
    def _check_leases(self, now: float) -> None:
        lease = self.config.lease_s
        for c in list(self.clients.values()):
            if now - c.last_seen > lease:
                self._end_client(c, f"lease expired: silent for more than {lease:g} s")

    def _end_client(self, c: _Client, why: str) -> None:
        """Forget a client: cancel everything it has in flight and drop what it has not read."""
        if c.closed:
            return
        c.closed = True
        self.counters["dropped"] += 1
        log.info("client %s (%s) ended: %s; cancelling %d requests", c.ident.hex(), c.name, why, len(c.live))
        for cid, engine_id in c.live.items():
            self._lane(c, cid).put(_Cancel(engine_id))
        c.live.clear()
        c.bulk.clear()
        c.backlog.clear()
        c.pending_items, c.pending_after, c.pending_step = [], [], None
        self.clients.pop(c.ident, None)
        self._clients_changed()
        self._ended[c.ident] = why
        while len(self._ended) > 4096:
            self._ended.popitem(last=False)


def _has_bin_or_ext(value: Any, depth: int = 0) -> bool:
    if isinstance(value, (bytes, bytearray, msgpack.ExtType, msgpack.Timestamp)):
        return True
    if depth > 64:           # decode already bounds nesting; this only keeps the walk finite
        return True
    if isinstance(value, (list, tuple)):
        return any(_has_bin_or_ext(v, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_has_bin_or_ext(k, depth + 1) or _has_bin_or_ext(v, depth + 1) for k, v in value.items())
    return False


def _kind(req: GenerationRequest) -> str:
    return "chat" if req.messages is not None else "completion"


def _preview(req: GenerationRequest) -> str:
    """The dashboard's line for a request: the last user message of a chat (as HTTP shows), or the prompt."""
    if req.messages is not None:
        users = [m.get("content", "") for m in req.messages if m.get("role") == "user"]
        return preview(users[-1] if users else (req.messages[-1].get("content", "") if req.messages else ""))
    return preview(req.prompt or "")
