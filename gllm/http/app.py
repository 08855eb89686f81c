"""The Starlette application: OpenAI-compatible routes, metrics, health and the live dashboard.

Routes (all JSON errors in OpenAI's shape):
    GET  /                      live dashboard (HTML)
    GET  /health                liveness (never needs the API key)
    GET  /metrics               Prometheus text format
    GET  /v1/models             the served model;  GET /v1/models/{id}
    POST /v1/chat/completions   chat, streaming (SSE, ``data: [DONE]``) or not
    POST /v1/completions        raw-prompt completions, streaming or not
    POST /v1/embeddings         the loaded model's pooled hidden states (gllm.http.embeddings_api)
    GET  /v1/gllm/live          the dashboard's JSON

Each request goes to the engine with ``engine.add_request(req, on_event)``: submission is synchronous,
so invalid input becomes a 4xx before any response starts; events come back from the engine thread
through ``loop.call_soon_threadsafe`` into an asyncio queue. A client that goes away (mid-stream or
while waiting for a non-streaming answer) has its request cancelled, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gllm.frontend.helpers import short_model_name
from gllm.frontend.metrics import Metrics
from gllm.http import openai_api as oa
from gllm.http.dashboard import dashboard_html
from gllm.http.embeddings_api import embed_error, embeddings_response, parse_embeddings
from gllm.http.errors import ApiError, error_body
from gllm.http.guard import LocalOnly
from gllm.memory import LARGE_TEXT_CHARS, release_free_memory

if TYPE_CHECKING:
    from gllm.engine.interface import EngineAPI
    from gllm.engine.request import StreamEvent

log = logging.getLogger("gllm.http")

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024     # a full 128k-token chat is about 0.5 MB of JSON
DEFAULT_BODY_TIMEOUT_S = 30.0                  # a request body must arrive in full within this
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class OpenAIServer:
    """Builds the ASGI app around one engine (``self.app``)."""

    def __init__(self, engine: EngineAPI, metrics: Metrics | None = None, *, api_key: str | None = None,
                 served_model_name: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 cors_origins: Iterable[str] = (), default_max_tokens: int | None = None,
                 allowed_hosts: Iterable[str] = (), body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        self.engine = engine
        self.metrics = metrics if metrics is not None else Metrics(engine)
        self.metrics.attach(engine)
        self.api_key = api_key or None
        self.model_id = served_model_name or short_model_name(engine.model_name)
        self.model_aliases = {self.model_id, str(engine.model_name), short_model_name(engine.model_name)}
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.default_max_tokens = default_max_tokens or engine.gen_params.max_seq_len
        self.token_text = oa.TokenText(engine.tokenizer)
        self.started = time.time()
        self._page = dashboard_html()
        self._inflight: set[str] = set()            # request ids being answered (for cancel_all)
        self._inflight_lock = threading.Lock()
        self.metrics.http_requests_in_flight.set_function(lambda: len(self._inflight))
        middleware = []
        origins = list(cors_origins)
        if self.api_key is None:   # keyless: no foreign Host, Origin or non-JSON POST (see gllm.http.guard)
            middleware.append(Middleware(LocalOnly, allowed_hosts=allowed_hosts, allowed_origins=origins))
        if origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                                         allow_headers=["Authorization", "Content-Type"]))
        self.app = Starlette(
            routes=[
                Route("/", self.dashboard, methods=["GET"]),
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.prometheus, methods=["GET"]),
                Route("/v1/models", self.list_models, methods=["GET"]),
                Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
                Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                Route("/v1/completions", self.completions, methods=["POST"]),
                Route("/v1/gllm/live", self.live, methods=["GET"]),
                Route("/v1/embeddings", self.embeddings, methods=["POST"]),
            ],
            middleware=middleware,
            exception_handlers={ApiError: self._api_error, HTTPException: self._http_error,
                                Exception: self._internal_error},
        )

    def cancel_all(self) -> int:
        """Cancel every request this server is answering (before a shutdown): their streams end with an
        error event and ``[DONE]``, non-streaming ones with 503. Safe from any thread."""
        with self._inflight_lock:
            ids = list(self._inflight)
        for request_id in ids:
            self.engine.cancel(request_id)
        return len(ids)

    def _track_inflight(self, request_id: str, add: bool) -> None:
        with self._inflight_lock:
            if add:
                self._inflight.add(request_id)
            else:
                self._inflight.discard(request_id)

    # ------------------------------------------------------------------ errors
    async def _api_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    async def _http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"Invalid URL ({request.method} {request.url.path}): no such route"
        elif exc.status_code == 405:
            message = f"Method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return JSONResponse(error_body(message, "invalid_request_error", None, None), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.exception("internal error answering %s %s", request.method, request.url.path)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error", None,
                                       "internal"), status_code=500)

    # ------------------------------------------------------------------ helpers
    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _json_body(self, request: Request) -> dict[str, Any]:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise ApiError(413, f"request body is {length} bytes; the limit is {self.max_body_bytes}",
                           code="request_too_large")
        chunks: list[bytes] = []

        async def read() -> None:
            size = 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise ApiError(413, f"request body exceeds the limit of {self.max_body_bytes} bytes",
                                   code="request_too_large")
                chunks.append(chunk)

        try:   # a body that never ends must not hold its connection (and a worker) forever
            await asyncio.wait_for(read(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s",
                           code="request_timeout", headers={"Connection": "close"}) from None
        request.state.body_bytes = sum(map(len, chunks))
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
        return oa.check_body(body)

    def _model_for(self, body: dict[str, Any]) -> str:
        model = oa.requested_model(body)
        if model is None:
            return self.model_id
        if model not in self.model_aliases:
            raise ApiError(404, f"The model `{model}` does not exist; this server serves `{self.model_id}`",
                           param="model", code="model_not_found")
        return model

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": int(self.started), "owned_by": "gllm",
                "max_model_len": self.engine.gen_params.max_seq_len}

    # ------------------------------------------------------------------ simple routes
    async def dashboard(self, request: Request) -> Response:
        return HTMLResponse(self._page, headers={"Cache-Control": "no-cache"})

    async def health(self, request: Request) -> Response:
        closed = self.engine.closed
        body = {"status": "closed" if closed else "ok", "model": self.model_id,
                "uptime_s": round(time.time() - self.started, 3)}
        return JSONResponse(body, status_code=503 if closed else 200)

    async def prometheus(self, request: Request) -> Response:
        self._authorize(request)
        data, content_type = self.metrics.exposition()
        return Response(data, media_type=content_type)

    async def list_models(self, request: Request) -> Response:
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def get_model(self, request: Request) -> Response:
        self._authorize(request)
        model_id = request.path_params["model_id"]
        if model_id not in self.model_aliases:
            raise ApiError(404, f"The model `{model_id}` does not exist; this server serves `{self.model_id}`",
                           param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def live(self, request: Request) -> Response:
        self._authorize(request)
        snap = self.metrics.live.snapshot()
        stats = dict(self.engine.stats())
        gen = self.engine.gen_params
        stats.update(max_seq_len=gen.max_seq_len, max_batch_size=gen.max_batch_size, block_size=gen.block_size)
        total, free = stats.get("kv_total_blocks", 0), stats.get("kv_free_blocks", 0)
        hits, misses = stats.get("prefix_cache_hits", 0), stats.get("prefix_cache_misses", 0)
        sources = snap.pop("sources")
        frame = sources.pop("frame", None)
        if frame is None:
            frame = {k: v for k, v in stats.items() if k.startswith("frame")} or None
        snap.update({
            "model": self.model_id, "model_source": str(self.engine.model_name), "device": str(self.engine.device),
            "uptime_s": round(time.time() - self.started, 3), "engine": stats,
            "kv": {"used": total - free, "free": free, "total": total, "usage": (total - free) / total if total else 0},
            "prefix_cache_hit_rate": hits / (hits + misses) if hits + misses else None,
            "frame": frame, "sources": sources,
        })
        return JSONResponse(snap, headers={"Cache-Control": "no-store"})

    # ------------------------------------------------------------------ generation
    async def chat_completions(self, request: Request) -> Response:
        return await self._completion_route(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._completion_route(request, "completion")

    async def embeddings(self, request: Request) -> Response:
        try:
            self._authorize(request)
            body = await self._json_body(request)
            model = self._model_for(body)
            parsed = parse_embeddings(body)
        except ApiError as exc:
            self.metrics.count_rejected("http", exc.code or {401: "unauthorized", 404: "not_found"}.get(
                exc.status, "bad_request"))
            raise
        call = functools.partial(self.engine.embed, parsed.inputs, pooling=parsed.pooling)
        try:   # tokenizing and waiting for the engine thread: off the event loop
            result = await asyncio.get_running_loop().run_in_executor(None, call)
        except (ValueError, RuntimeError) as exc:
            err = embed_error(exc)
            self.metrics.count_rejected("http", err.code or "bad_request")
            raise err from None
        return JSONResponse(embeddings_response(result.vectors, result.prompt_tokens, model, parsed.encoding_format))

    async def _completion_route(self, request: Request, kind: str) -> Response:
        try:
            return await self._answer_completion(request, kind)
        finally:
            if getattr(request.state, "body_bytes", 0) >= LARGE_TEXT_CHARS:
                # once this request's objects are gone, give the pages they took back to the OS
                asyncio.get_running_loop().call_later(0.05, release_free_memory)

    async def _answer_completion(self, request: Request, kind: str) -> Response:
        try:
            self._authorize(request)
            body = await self._json_body(request)
            model = self._model_for(body)
            request_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
            parse = oa.parse_chat if kind == "chat" else oa.parse_completion
            parsed = parse(body, model, request_id, self.default_max_tokens)
        except ApiError as exc:
            self.metrics.count_rejected("http", exc.code or {401: "unauthorized", 404: "not_found"}.get(
                exc.status, "bad_request"))
            raise
        return await self._generate(request, parsed)

    async def _generate(self, request: Request, parsed: oa.ParsedRequest) -> Response:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        request_id = parsed.request.request_id

        def deliver(event: StreamEvent) -> None:               # engine thread: hand over and return at once
            if event.result is not None:
                self._track_inflight(request_id, False)
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:
                pass                                    # the server's loop is gone

        tracker = self.metrics.track(request_id, deliver, front_end="http", kind=parsed.kind, preview=parsed.preview)

        def refused(reason: str) -> None:
            self._track_inflight(request_id, False)
            tracker.reject(reason)

        self._track_inflight(request_id, True)
        # add_request on a worker thread: tokenizing a long prompt must not stall the other streams here.
        submitted = loop.run_in_executor(None, self.engine.add_request, parsed.request, tracker.on_event)
        try:
            await asyncio.shield(submitted)
        except asyncio.CancelledError:                  # the client left while the prompt was tokenized
            def settle(f: asyncio.Future) -> None:
                if f.exception() is None:
                    self.engine.cancel(request_id)
                else:
                    refused("client_gone")
            submitted.add_done_callback(settle)
            raise
        except (ValueError, TypeError, RuntimeError) as exc:
            err = oa.engine_error(exc, parsed.kind, parsed.params)
            refused(err.code or ("unavailable" if err.status >= 500 else "bad_request"))
            raise err from None
        except Exception:
            refused("internal")
            raise
        created = int(time.time())
        if parsed.stream:
            return StreamingResponse(self._stream(parsed, events, created), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        return await self._wait(request, parsed, events, created)

    async def _wait(self, request: Request, parsed: oa.ParsedRequest, events: asyncio.Queue, created: int) -> Response:
        request_id = parsed.request.request_id

        async def result():
            while True:
                event = await events.get()
                if event.result is not None:
                    return event.result

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waiter, watcher = asyncio.ensure_future(result()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({waiter, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not waiter.done():                       # the client left: free the request's blocks
                self.engine.cancel(request_id)
                return Response(status_code=499)
            res = waiter.result()
        except asyncio.CancelledError:
            self.engine.cancel(request_id)
            raise
        finally:
            self._track_inflight(request_id, False)
            for task in (waiter, watcher):
                task.cancel()
        if res.finish_reason == "error":
            raise ApiError(500, f"generation failed: {res.error}", code="internal")
        if res.finish_reason == "cancelled":
            raise ApiError(503, "the request was cancelled (the server is shutting down)", code="cancelled")
        build = oa.chat_response if parsed.kind == "chat" else oa.completion_response
        return JSONResponse(build(parsed, res, created, self.token_text))

    async def _stream(self, parsed: oa.ParsedRequest, events: asyncio.Queue, created: int) -> AsyncIterator[str]:
        request_id = parsed.request.request_id
        writer = oa.ChunkWriter(parsed, request_id, self.token_text, created)
        finished = False
        try:
            first = writer.first()
            if first is not None:
                yield _sse(first)
            while not finished:
                batch = [await events.get()]
                while not events.empty():               # a slow reader gets the backlog as one chunk
                    batch.append(events.get_nowait())
                text = "".join(e.text for e in batch)
                lps = [lp for e in batch for lp in (e.logprobs or [])] if parsed.logprobs else None
                result = batch[-1].result
                chunk = writer.delta(text, lps)
                if chunk is not None:
                    yield _sse(chunk)
                if result is None:
                    continue
                finished = True
                if result.finish_reason in ("error", "cancelled"):
                    message = (f"generation failed: {result.error}" if result.finish_reason == "error"
                               else "the request was cancelled (the server is shutting down)")
                    yield _sse(error_body(message, "server_error", None,
                                          "internal" if result.finish_reason == "error" else "cancelled"))
                else:
                    for chunk in writer.final(result):
                        yield _sse(chunk)
                yield "data: [DONE]\n\n"
        finally:
            self._track_inflight(request_id, False)
            if not finished:                            # the client went away mid-stream
                self.engine.cancel(request_id)
