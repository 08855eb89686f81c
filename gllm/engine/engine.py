"""`LLMEngine`: the request lifecycle around one model, stepped on a background thread.

Callers submit from any thread or event loop; the engine thread owns the scheduler, the KV
cache and the model, and sends each request's events back through its sink. Nothing a caller
does blocks on a model step, and nothing a request does (bad input, an exception in a step)
stops the engine or loses another request: every request ends with exactly one final event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import math
import queue
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gllm.engine.assembly import assemble, default_cpu_threads
from gllm.engine.compute_windows import ComputeWindows
from gllm.engine.embeddings import POOLINGS, Embeddings, check_inputs, embed_tokens
from gllm.engine.errors import EngineBusy, PinRefused, RequestRejected, RequestTooLong
from gllm.engine.governor import FrameGovernor
from gllm.engine.identity import tokenizer_digest, weights_digest
from gllm.engine.loading import LoadedModel
from gllm.engine.params import GeneratorParams
from gllm.engine.request import GenerationRequest, GenerationResult, StepInfo, StreamEvent, Timings
from gllm.engine.result_cache import ResultCache, is_deterministic, result_key
from gllm.engine.results import Ending, RequestState, final_event, token_text
from gllm.engine.sessions import RestoreInfo, SessionStore
from gllm.engine.sinks import AsyncSink, CallbackSink, EventSink, RequestHandle
from gllm.engine.thread_priority import lower_this_thread
from gllm.kv.snapshot import ENCODINGS, PayloadUploader, SnapshotIdentity, decode, dtype_name, encode, read_header
from gllm.model import ModelConfig
from gllm.ops.stream_gate import StreamGate
from gllm.sampling import PendingSample, SampleRow, StopChecker, StopResult, TokenLogprobs
from gllm.sampling.grammar import Grammars, MaskJob
from gllm.scheduler import SchedulerOutput, Sequence
from gllm.tokenizer import IncrementalDetokenizer

log = logging.getLogger("gllm.engine")
# The longest sleep between two steps (a slow step at the governor's floor): cancels and closes stay prompt.
MAX_GOVERNOR_PAUSE_S = 0.5
# A step that found nothing to compute and no paced request to wait for (blocks short, say): look again after this.
IDLE_RECHECK_S = 0.002


@dataclass(eq=False)
class _LaunchedStep:
    """A step queued on the device whose sampled tokens are not yet on the host."""
    out: SchedulerOutput
    states: list[RequestState]
    samplers: list[RequestState]
    sample: PendingSample | None
    started: float
    step: int = 0
    decode: bool = False       # every sequence decodes one token: the kind of step a step can be queued after
    window_end: float | None = None   # launched inside a game's idle window closing then (monotonic s)
    mask_error: str | None = None   # the grammar masks failed: the constrained rows' tokens are void
    # A step queued ahead with constrained rows: its logits and rows, sampled once the previous step's tokens
    # have moved the grammars on (`_sample_ahead`), while the device computes it.
    unsampled: tuple[Any, list[SampleRow]] | None = None
    masks_job: MaskJob | None = None   # its masks, computed while its sampling waits at a stream gate
    gate_ticket: int | None = None     # that gate
    masks_waited: bool = False
    paused_s: float = 0.0      # between its layers, waiting for the game's next idle window (CPU)


_NOT_FINISHED = StopResult(False)
_GRAMMAR_COMPLETE = StopResult(True, "stop", keep_text=True)


class LLMEngine:
    def __init__(self, model: str | Path | LoadedModel | None = None, gen_params: GeneratorParams | None = None,
                 device: str | None = None, quiet: bool = True) -> None:
        self.gen_params = gen = gen_params or GeneratorParams()
        rt = assemble(model, gen, device, quiet)
        self.device, self.dtype, self.dtype_reason = rt.device, rt.dtype, rt.dtype_reason
        self.cpu_threads = rt.cpu_threads
        self.weight_format, self.weight_bytes = rt.weight_format, rt.weight_bytes
        loaded = rt.loaded
        self.model, self.model_config, self.tokenizer = loaded.model, loaded.config, loaded.tokenizer
        self.model_name, self.model_source = loaded.source.name, loaded.source
        self.load_seconds = loaded.load_seconds
        cfg: ModelConfig = self.model_config
        self.eos_token_ids = frozenset(cfg.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.kv_cache, self.block_manager, self.scheduler = rt.kv_cache, rt.block_manager, rt.scheduler
        self.cost_model, self.fast_path, self.runner, self.sampler = rt.cost_model, rt.fast_path, rt.runner, rt.sampler
        self.step_seconds: deque[float] = deque(maxlen=512)
        # Structured output: constraints compiled once per content; their masks are computed once the step's
        # forward is queued (on a GPU they take the time the device computes anyway), with one thread on the
        # CPU (the model's are busy) and half the usable cores (up to 8) beside a GPU. On the engine thread,
        # except for a step queued ahead on CUDA (below): a worker the engine thread waits for has to get the GIL
        # back from it, which cost 1.6 ms a step at batch 16 (docs/benchmarks.md, issue 21).
        mask_threads = gen.grammar_threads or (1 if self.device.type == "cpu" else default_cpu_threads())
        # (a bound method of the tokenizer, not a closure over self: an engine in no reference cycle is freed,
        # with its KV pool's device memory, as soon as a game drops it, without waiting for Python's cycle GC)
        self.grammars = Grammars(self.tokenizer.hf_tokenizer.to_str, self.sampler.vocab_size,
                                 sorted(self.eos_token_ids), threads=mask_threads, pinned=self.device.type == "cuda")
        # On the CPU, where a step takes milliseconds, the cost model always learns (its refits cost ~1 ms every
        # 16 steps), so the governor's step budget holds from its first decision; on a GPU only under a budget.
        self.scheduler.learn_shapes = self.device.type == "cpu"
        # Overlap: step N's text work (detokenizing, stop strings, events) runs while step N+1 computes.
        self.overlap_steps = self.device.type == "cuda" if gen.overlap_steps is None else gen.overlap_steps
        self._deferred: tuple[StepInfo, list[RequestState]] | None = None   # engine thread only
        self._inflight: _LaunchedStep | None = None   # a step queued ahead, whose tokens are not collected yet
        # On CUDA a step queued ahead samples behind a gate the masks' thread opens: the engine thread queues the
        # sampling and the next forward while llguidance computes (GIL released), instead of before or after.
        self._mask_gate = StreamGate.create(self.device) if gen.mask_gate_rows and self.overlap_steps else None

        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._live_ids: set[str] = set()          # ids submitted and not yet finished (any thread)
        self._ids_lock = threading.Lock()
        self._states: dict[str, RequestState] = {}  # engine thread only
        self._by_seq: dict[int, RequestState] = {}  # engine thread only
        self._seq_ids = itertools.count()
        self._closed = False
        self._step_listeners: list[Callable[[StepInfo], None]] = []
        self.num_steps = 0
        self.num_steps_ahead = 0     # of those, steps queued before the previous step's tokens were on the host
        self.late_mask_gates = 0     # constrained steps whose masks missed their stream gate (see StreamGate)
        self.governor = FrameGovernor()          # yields to the game when its reported frames run over
        self.windows = ComputeWindows()          # the game's idle phases, where it reports them
        self._window_seen = 0                    # windows.reports at the last step: a new window since?
        self.window_steps = 0                    # steps launched inside a game's idle window
        self.window_waits = 0                    # times the engine waited for one (work to do, no room)
        self.window_spills = 0                   # window steps whose tokens came after their window closed
        self._window_end: float | None = None
        self.thread_priority = "unchanged"       # set by the engine thread as it starts
        self.compute_s = 0.0                     # wall time in steps (engine thread)
        self.paused_s = 0.0                      # wall time the governor paused between steps
        self.layer_pauses = 0                    # CPU window steps: pauses between layers for the next window
        self.layer_pause_s = 0.0                 # and their wall time
        self._layer_mark = 0.0                   # when the layer now computing started (perf_counter)
        self._head_mark: float | None = None     # when the current window step's head started
        self._head_s: float | None = None        # a window step's head and sampling, lately (moving average)
        self._step_paused = 0.0                  # the current step's layer pauses so far
        # NPC memory (issue #23): snapshots and pins (engine thread), the prompt-result cache (engine thread).
        self.sessions = SessionStore(self.block_manager, self.kv_cache, gen.max_seq_len)
        self._uploader = PayloadUploader(self.device)   # restores: the payload to the pool's device
        self.result_cache = ResultCache(gen.result_cache_entries, int(gen.result_cache_mb * 2**20))
        self._identity_lock = threading.Lock()
        # Now, at load (milliseconds; a quarter second for a memory-mapped CPU model's first reads), not inside
        # the first restore or cached request.
        self._identity: SnapshotIdentity | None = None
        self._identity = self.identity
        self._thread = threading.Thread(target=self._run, name="gllm-engine", daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------- public API
    async def enqueue_request(self, req: GenerationRequest) -> GenerationResult:
        """Run one request to the end; cancelling the awaiting task cancels the request."""
        async for event in self.stream(req):
            if event.result is not None:
                return event.result
        raise RuntimeError("stream ended without a result")  # unreachable: the final event ends the stream

    async def stream(self, req: GenerationRequest) -> AsyncIterator[StreamEvent]:
        """Events as tokens are decoded; the last one carries the result. Leaving early cancels."""
        loop = asyncio.get_running_loop()
        sink = AsyncSink(loop)
        # Tokenizing a long prompt takes a while: off the caller's event loop, so its other tasks go on.
        submitting = loop.run_in_executor(None, self._submit, req, sink)
        try:
            request_id = await asyncio.shield(submitting)
        except asyncio.CancelledError:   # the caller left while it was tokenized: cancel what it submitted
            submitting.add_done_callback(lambda f: f.exception() is None and self.cancel(f.result()))
            raise
        finished = False
        try:
            while not finished:
                event = await sink.events.get()
                finished = event.result is not None
                yield event
        finally:
            if not finished:
                self.cancel(request_id)

    def submit(self, req: GenerationRequest) -> RequestHandle:
        """Non-blocking submission for threads and game loops: poll the handle each frame."""
        handle = RequestHandle("")
        handle.request_id = self._submit(req, handle)
        return handle

    def add_request(self, req: GenerationRequest, on_event: Callable[[StreamEvent], None]) -> str:
        """Low-level submission for front ends: `on_event` runs on the engine thread for each event
        (the last one carries the result) and must return at once. Returns the request id."""
        return self._submit(req, CallbackSink(on_event))

    def generate(self, requests: Iterable[GenerationRequest] | GenerationRequest,
                 timeout: float | None = None) -> list[GenerationResult]:
        """Synchronous batch form: submit all, wait for all, results in request order. Every request is
        checked before any is queued (one bad request fails the call, and none runs), and they reach the
        scheduler together."""
        if isinstance(requests, GenerationRequest):
            requests = [requests]
        handles = [RequestHandle("") for _ in requests]
        # One inbox entry for the lot: the engine schedules them together, not as the thread happens to
        # wake between submissions, so the same calls give the same batches (and the same bits).
        states: list[RequestState] = []
        try:
            for req, handle in zip(requests, handles):
                states.append(self._prepare(req, handle))
                handle.request_id = states[-1].request_id
        except Exception:
            with self._ids_lock:
                self._live_ids.difference_update(st.request_id for st in states)
            raise
        self._inbox.put(("add", states))
        return [h.result(timeout) for h in handles]

    def add_step_listener(self, listener: Callable[[StepInfo], None]) -> None:
        """Call `listener(StepInfo)` on the engine thread after every step; it must return at once, and must
        not wait for the GPU (a step queued ahead may wait there for the engine's own mask thread)."""
        self._step_listeners = [*self._step_listeners, listener]   # copy-on-write: the loop iterates a snapshot

    def remove_step_listener(self, listener: Callable[[StepInfo], None]) -> None:
        self._step_listeners = [x for x in self._step_listeners if x is not listener]

    @property
    def closed(self) -> bool:
        return self._closed

    def cancel(self, request_id: str) -> None:
        """End a request with finish_reason "cancelled" and free its blocks (no-op if already done)."""
        self._inbox.put(("cancel", request_id))

    def report_frame(self, ms: float, target_ms: float | None = None, source: str = "python", *,
                     max_ms: float | None = None, frames: int | None = None, over: int | None = None) -> None:
        """The game's frame took `ms` against `target_ms` (None: 60 fps); optionally, since the previous report,
        the longest frame, the number of frames and how many of them took over 1.1 x target. While frames run
        over their target the engine computes a smaller share of the time (see `gllm.engine.governor`); any
        thread."""
        if not (isinstance(ms, (int, float)) and ms >= 0 and (target_ms is None or target_ms > 0)):
            raise ValueError(f"report_frame needs ms >= 0 and target_ms > 0, got {ms!r}, {target_ms!r}")
        if frames is not None and not (0 <= (over or 0) <= frames):
            raise ValueError(f"report_frame needs 0 <= over <= frames, got over={over!r}, frames={frames!r}")
        self.governor.report(source, min(float(ms), 1e6), target_ms, time.monotonic(),
                             max_ms=None if max_ms is None else min(float(max_ms), 1e6), frames=frames, over=over)

    def report_idle(self, ms: float, source: str = "python") -> None:
        """The game will not need the device for the next `ms` milliseconds (its frame's work is done). Called
        once per frame, it makes the engine compute only in those windows, with steps sized to fit them (see
        `gllm.engine.compute_windows`); any thread."""
        if not (isinstance(ms, (int, float)) and not isinstance(ms, bool) and 0 <= ms <= 1e9):
            raise ValueError(f"report_idle needs 0 <= ms <= 1e9, got {ms!r}")
        self.windows.open(source, ms / 1000.0, time.monotonic())
        self._inbox.put(("wake", None))      # the engine thread may be waiting for this window

    def stats(self) -> dict[str, Any]:
        """A snapshot of the engine's counters (read without locking: for monitoring)."""
        prefix = self.block_manager.stats
        return {
            "kv_free_blocks": self.block_manager.num_free_blocks,
            "kv_total_blocks": self.block_manager.num_blocks,
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "prefix_cache_hits": prefix.hits,
            "prefix_cache_misses": prefix.misses,
            "steps": self.num_steps,
            **self._step_time_stats(),
            "governor_duty_pct": round(self.governor.duty * 100),
            "governor_pressure_pct": round((self.governor.pressure or 0.0) * 100),
            "governor_frames_over_permille": round((self.governor.over_share or 0.0) * 1000),
            "governor_paused_ms": int(self.paused_s * 1000),
            "compute_ms": int(self.compute_s * 1000),
            "layer_pauses": self.layer_pauses,
            "layer_pause_ms": int(self.layer_pause_s * 1000),
            "weight_bytes": self.weight_bytes,
            "window_reports": self.windows.reports,
            "window_steps": self.window_steps,
            "window_waits": self.window_waits,
            "window_spills": self.window_spills,
            "late_mask_gates": self.late_mask_gates,   # structured output (issue 21): see StreamGate
            # NPC memory (issue #23)
            "result_cache_hits": self.result_cache.stats.hits,
            "result_cache_misses": self.result_cache.stats.misses,
            "result_cache_entries": self.result_cache.stats.entries,
            "result_cache_bytes": self.result_cache.stats.bytes,
            "pins": len(self.sessions.pins),
            "pinned_blocks": self.sessions.num_pinned_blocks,
        }

    def _step_time_stats(self) -> dict[str, int]:
        """Recent step times and the fitted step cost model, in integer microseconds (nanoseconds for the
        per-token terms): the bridge's stats carry integers only."""
        times = sorted(self.step_seconds)
        out = {"step_p50_us": int(times[len(times) // 2] * 1e6) if times else 0,
               "step_p99_us": int(times[min(len(times) - 1, int(0.99 * len(times)))] * 1e6) if times else 0,
               "step_budget_us": int((self.scheduler.step_budget_s or 0) * 1e6)}
        coef = self.cost_model.as_dict()
        if coef:
            out.update(step_cost_fixed_us=int(coef["fixed"] * 1e6),
                       step_cost_prefill_token_ns=int(coef["per_prefill_token"] * 1e9),
                       step_cost_decode_row_ns=int(coef["per_decode_row"] * 1e9),
                       step_cost_kv_ktoken_ns=int(coef["per_kv_token"] * 1e12),
                       step_cost_prefill_step_us=int(coef["per_prefill_step"] * 1e6))
        return out

    def tokenize_request(self, req: GenerationRequest) -> list[int]:
        given = [x is not None for x in (req.prompt, req.messages, req.prompt_token_ids)]
        if sum(given) != 1:
            raise RequestRejected("give exactly one of prompt, messages or prompt_token_ids", "prompt")
        if req.prompt is not None:
            if not isinstance(req.prompt, str):
                raise RequestRejected("prompt must be a string", "prompt")
            self._check_text_fits("prompt", len(req.prompt))
            return self.tokenizer.encode(req.prompt, special_tokens_as_text=not self.gen_params.prompt_special_tokens)
        if req.messages is not None:
            if isinstance(req.messages, list):
                self._check_text_fits("messages", sum(len(v) for m in req.messages if isinstance(m, dict)
                                                      for v in m.values() if isinstance(v, str)))
            if req.tools is not None and not (isinstance(req.tools, list) and all(isinstance(t, dict)
                                                                                  for t in req.tools)):
                raise RequestRejected("tools must be a list of objects", "tools")
            extra = {"tools": req.tools} if req.tools else {}
            try:
                return self.tokenizer.encode_chat(req.messages, add_generation_prompt=True, **extra)   # text stays text
            except ValueError as exc:   # a malformed conversation, or the template refused it
                raise RequestRejected(str(exc), "messages") from exc
        ids = list(req.prompt_token_ids)
        vocab = self.model_config.vocab_size
        if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
            raise RequestRejected(f"prompt_token_ids must be integers in [0, {vocab})", "prompt_token_ids")
        return ids

    def _check_text_fits(self, field: str, chars: int) -> None:
        """Refuse text that cannot fit in max_seq_len tokens before tokenizing it (a token spells at most
        `max_token_chars` characters), so a huge prompt costs nothing but this check."""
        limit = self.gen_params.max_seq_len * self.tokenizer.max_token_chars
        if chars > limit:
            raise RequestTooLong(f"{field} is {chars} characters; max_seq_len {self.gen_params.max_seq_len} tokens "
                                 f"hold at most {limit} characters of text", field)

    def close(self) -> None:
        """Stop the engine thread; requests still running end with finish_reason "cancelled"."""
        if not self._closed:
            self._closed = True
            self._inbox.put(("close", None))
            self._thread.join()

    def __enter__(self) -> "LLMEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----------------------------------------------------------------- submission (caller's thread)
    def _submit(self, req: GenerationRequest, sink: EventSink) -> str:
        state = self._prepare(req, sink)
        self._inbox.put(("add", [state]))
        return state.request_id

    def _prepare(self, req: GenerationRequest, sink: EventSink) -> RequestState:
        """Check `req` and register its id; the caller puts the state in the inbox."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        params = req.sampling_params()
        spec = params.constraint   # compiled (or found in the cache) before any compute: a bad one is a FieldError
        constraint = self.grammars.start(*spec) if spec is not None else None
        prompt_ids = self.tokenize_request(req)
        gen = self.gen_params
        if not prompt_ids:
            raise RequestRejected("prompt must contain at least one token", "prompt")
        if len(prompt_ids) >= gen.max_seq_len:
            raise RequestTooLong(f"prompt is {len(prompt_ids)} tokens; max_seq_len is {gen.max_seq_len} "
                                 f"(prompt + output), so the prompt must be shorter", "prompt")
        max_new = min(params.max_new_tokens, gen.max_seq_len - len(prompt_ids))
        need_blocks = self.block_manager.blocks_needed(len(prompt_ids) + max_new)
        if need_blocks > self.block_manager.num_blocks:
            raise RequestTooLong(f"prompt + max_new_tokens need {need_blocks} KV blocks; the cache holds "
                                 f"{self.block_manager.num_blocks} (raise kv_cache_tokens or lower max_new_tokens)",
                                 "max_new_tokens")
        request_id = req.request_id if req.request_id is not None else uuid.uuid4().hex
        if not isinstance(request_id, str) or not request_id:
            raise RequestRejected("request_id must be a non-empty string", "request_id")
        with self._ids_lock:
            if request_id in self._live_ids:
                raise RequestRejected(f"request_id {request_id!r} is already in flight", "request_id")
            if len(self._live_ids) >= gen.max_waiting_requests + gen.max_batch_size:
                raise EngineBusy(f"too many requests in flight (limit {gen.max_waiting_requests + gen.max_batch_size})")
            self._live_ids.add(request_id)
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        state = RequestState(
            request_id=request_id,
            seq=Sequence(seq_id=next(self._seq_ids), token_ids=list(prompt_ids), num_prompt_tokens=len(prompt_ids),
                         priority=req.priority,
                         deadline=time.monotonic() + req.ttft_deadline_ms / 1000 if req.ttft_deadline_ms else math.inf,
                         token_interval=1.0 / req.max_tokens_per_s if req.max_tokens_per_s else 0.0),
            params=params,
            seed=params.seed if params.seed is not None else secrets.randbits(64),
            stop=StopChecker(stop_ids, params.stop, max_new),
            detok=IncrementalDetokenizer(self.tokenizer),
            sink=sink,
            submitted=time.perf_counter(),
            prompt_ids=prompt_ids,
            ttft_deadline_ms=req.ttft_deadline_ms or None,
            constraint=constraint,
        )
        # A paced reply is not answered from the cache: it wants its tokens spread out, not at once.
        if req.cache_result and self.result_cache.enabled and is_deterministic(params) and not req.max_tokens_per_s:
            state.cache_key = result_key(self.identity.model + self.identity.tokenizer, prompt_ids, params, max_new,
                                         stop_ids)
        if req.pin_prefix:
            state.pin_tokens = self._system_part(req, prompt_ids)
        return state

    # ----------------------------------------------------------------- engine thread
    def _run(self) -> None:
        # Before any tensor work on this thread: the compute threads it starts inherit the priority.
        self.thread_priority = lower_this_thread(self.gen_params.compute_nice, self.gen_params.compute_idle)
        torch.set_num_threads(self.cpu_threads)  # per thread under OpenMP: set it where the maths runs
        wait: float | None = 0.0
        while True:
            if not self.scheduler.has_work and self._deferred is None and self._inflight is None:
                wait = None                   # nothing to do: sleep until a request or a cancel arrives
            if not self._drain_inbox(wait):
                break
            wait = 0.0
            try:
                if self.scheduler.has_work or self._inflight is not None:
                    if not self._window_allows_step():
                        self.window_waits += 1
                        wait = IDLE_RECHECK_S    # outside the game's idle phase: its next report wakes us
                        continue
                    started = time.perf_counter()
                    self._step_paused = 0.0
                    if self._step():
                        self.window_steps += self.scheduler.strict_budget
                        self._yield_to_the_game(time.perf_counter() - started - self._step_paused)
                    else:   # nothing to compute now (running requests paced ahead): sleep until one is due
                        due = self.scheduler.seconds_until_due(time.monotonic())
                        wait = IDLE_RECHECK_S if due is None else max(due, 1e-4)
                else:
                    self._flush_deferred()
            except Exception as exc:   # outside any one request's step: the thread must live on
                self._recover(exc)
        if self._inflight is not None:
            self._collect(self._inflight)
            self._inflight = None
        self._flush_deferred()
        for state in list(self._states.values()):
            self._finish(state, "cancelled")
        self.sessions.unpin_all()
        self._uploader.close()
        self.grammars.close()
        while True:   # calls queued behind the close: refuse them, so no caller waits forever
            try:
                op, arg = self._inbox.get_nowait()
            except queue.Empty:
                break
            if op == "call" and arg[2].set_running_or_notify_cancel():
                arg[2].set_exception(RuntimeError("the engine is closed"))

    def _recover(self, exc: Exception) -> None:
        """A failure outside any one request's model step (scheduling, a step listener's caller, text work):
        what is in flight can no longer be trusted, so every live request ends with an error and gives its
        blocks back; the engine thread goes on serving new requests."""
        log.exception("engine loop failed; ending the %d requests in flight", len(self._states))
        self.grammars.settle()   # every gate opens: nothing on the device waits for a dead step
        self._inflight = self._deferred = None
        message = f"engine failure: {type(exc).__name__}: {exc}"
        for state in list(self._states.values()):
            state.pending = None
            try:
                self._finish(state, "error", error=message, failed_step=True)
            except Exception:   # even finishing failed: end it by hand, so it still gets its one final event
                log.exception("ending request %s failed", state.request_id)
                self._states.pop(state.request_id, None)
                self._by_seq.pop(state.seq.seq_id, None)
                with self._ids_lock:
                    self._live_ids.discard(state.request_id)
                self._deliver(state, final_event(state, "error", None, None, None, message, self.num_steps))

    def _window_allows_step(self) -> bool:
        """Whether a step may start now, and under which budget: freely while no game reports idle windows;
        else only inside one, with the step held to what is left of it (strictly: decode rows too)."""
        now = time.monotonic()
        self._window_end = self.windows.closes_at(now)
        budget = None if self._window_end is None else self.windows.budget_s(now, self._window_end)
        self.scheduler.strict_budget = budget is not None
        if budget is None:
            return True
        if budget <= 0 and self._inflight is None:
            return False
        first = self.windows.reports != self._window_seen
        self._window_seen = self.windows.reports
        self.scheduler.guarantee_progress = first
        self.scheduler.step_budget_s = min([budget, *self._step_budgets()])
        return True

    def _step_budgets(self) -> list[float]:
        """The step budgets in force besides a game's idle window: the governor's and the configured one."""
        return [b for b in (self.governor.step_budget_s(), self.scheduler.config.step_budget_s) if b is not None]

    def _yield_to_the_game(self, step_s: float) -> None:
        """Sleep after a step as the frame governor asks (its duty cycle < 1 while the game's frames run over),
        and hold steps to its step budget meanwhile."""
        self.compute_s += step_s
        governing = self.governor.update(time.monotonic()) < 1.0
        budgets = self._step_budgets()
        self.scheduler.step_budget_s = min(budgets) if budgets else None
        pause = self.governor.pause_after(step_s) if governing else 0.0
        if pause > 0:
            pause = min(pause, MAX_GOVERNOR_PAUSE_S)
            time.sleep(pause)
            self.paused_s += pause
            self._window_seen = self.windows.reports   # the window the pause ran into is not new: no forced step

    def _drain_inbox(self, wait: float | None) -> bool:
        """Apply queued adds and cancels, waiting up to `wait` seconds for the first (None: as long as it takes;
        0: not at all); False once close was asked."""
        while True:
            try:
                op, arg = self._inbox.get(timeout=wait) if wait is None or wait > 0 else self._inbox.get_nowait()
            except queue.Empty:
                return True
            wait = 0.0
            if op == "close":
                return False
            if op == "add":
                for state in arg:
                    if state.cache_key is not None and self._answer_from_cache(state):
                        continue
                    self._states[state.request_id] = state
                    self._by_seq[state.seq.seq_id] = state
                    self.scheduler.add(state.seq)
            elif op == "cancel" and arg in self._states:
                self._finish(self._states[arg], "cancelled")
            elif op == "call":   # work that touches KV blocks: here, between steps, never during one
                fn, args, future = arg
                if self._inflight is not None:   # it may wait for the device: first every gate open (masks done)
                    self.grammars.settle()
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:   # the caller gets it; the engine thread goes on
                        future.set_exception(exc)

    def _step(self) -> bool:
        """One engine step. With `overlap_steps`, the previous step's text work runs after this step is queued
        on the GPU and before its tokens are waited for; and in steady decoding the next step is queued before
        this one's tokens reach the host (its inputs are the sampled ids on the device), so the GPU does not
        wait for the host between steps. Token ids, stop tokens and lengths are always applied before a
        step is chosen from them, so batches and results are the same as in lock-step. False when there was
        nothing to compute."""
        started = time.perf_counter()
        launched, self._inflight = self._inflight, None
        if launched is None:
            out = self.scheduler.schedule_step(time.monotonic())
            if not out.scheduled:
                self._flush_deferred()
                return False
            launched = self._launch(out, started)
        ahead = self._launch_ahead(launched) if self.overlap_steps else None
        self._let_masks_open_their_gate(launched)
        self._flush_deferred()
        self._collect(launched, ahead)
        if ahead is not None:
            self.scheduler.commit_ahead(ahead.out)
            if ahead.unsampled is not None:
                self._sample_ahead(ahead)
            self._inflight = ahead
        elif not (self.overlap_steps and self.scheduler.has_work):
            self._flush_deferred()   # no next step to hide it behind
        return True

    def _launch(self, out: SchedulerOutput, started: float) -> _LaunchedStep:
        self.num_steps += 1
        states = [self._by_seq[s.seq.seq_id] for s in out.scheduled]
        now = time.perf_counter()
        for state in states:
            state.first_scheduled = state.first_scheduled or now
        samplers = [st for st, s in zip(states, out.scheduled) if s.samples]
        launched = _LaunchedStep(out, states, samplers, None, started, step=self.num_steps,
                                 decode=all(s.num_tokens == 1 and s.samples for s in out.scheduled),
                                 window_end=self._window_end if self.scheduler.strict_budget else None)
        constrained = [st for st in samplers if st.constraint is not None]
        try:
            step = self.runner.run(out, self._between_layers if self._pause_between_layers(launched) else None)
            if self._step_paused:   # it ran on in later windows: spills count against the last one
                launched.paused_s = self._step_paused
                launched.window_end = self.windows.closes_at(time.monotonic())
            self.scheduler.on_step_done(out)
            mask_tensor = self._masks_of(launched, constrained)   # while the device computes the logits
            mask_row = {st.request_id: i for i, st in enumerate(constrained)} if mask_tensor is not None else {}
            rows = [SampleRow(st.params, st.seed, len(st.output_ids), st.prompt_ids, st.output_ids,
                              mask_row=mask_row.get(st.request_id)) for st in samplers]
            launched.sample = self.sampler.launch(step.logits, rows, step.greedy_tokens, mask_tensor) if rows else None
            if self._head_mark is not None:   # a window step's head and sampling, for the pause before the next one's
                head_s = time.perf_counter() - self._head_mark
                self._head_s = head_s if self._head_s is None else 0.7 * self._head_s + 0.3 * head_s
                self._head_mark = None
        except Exception as exc:  # a failed step fails its requests, never the engine
            self._fail_step(launched, exc)
        return launched

    def _pause_between_layers(self, launched: _LaunchedStep) -> bool:
        """A step inside a game's idle window on the CPU, where the layers run as the engine thread computes
        them, may pause between them (`GeneratorParams.layer_pauses`)."""
        if launched.window_end is None or self.device.type != "cpu" or not self.gen_params.layer_pauses:
            return False
        self._layer_mark = time.perf_counter()
        return True

    # A layer is judged by the one before it, with this much to spare: layers of one step vary (the game's
    # threads share the cores).
    LAYER_MARGIN = 1.25

    def _between_layers(self, head_next: bool) -> None:
        """Before the next layer of a window step (or its head, with sampling after it: `head_next`): if the
        game's window closes before a layer as long as the last one (the head and sampling as long as lately)
        would end, wait for its next idle report (at most until a silent game stops counting), so the step goes
        on in the next window instead of beside the game's frame."""
        layer_s = time.perf_counter() - self._layer_mark
        next_s = self._head_s if head_next and self._head_s is not None else layer_s
        seen = self.windows.reports
        now = time.monotonic()
        closes = self.windows.closes_at(now)
        if closes is not None and closes - now < next_s * self.LAYER_MARGIN:
            waited = time.perf_counter()
            self.windows.wait_for_report(seen, self.windows.config.stale_s)
            paused = time.perf_counter() - waited
            self.layer_pauses += 1
            self.layer_pause_s += paused
            self._step_paused += paused
        self._layer_mark = time.perf_counter()
        if head_next:
            self._head_mark = self._layer_mark

    def _masks_of(self, launched: _LaunchedStep, constrained: list[RequestState]) -> torch.Tensor | None:
        """The grammar masks of a step's constrained rows (None without any); if computing them fails, the
        constrained rows fail alone (in `_collect`)."""
        if not constrained:
            return None
        try:
            return self.grammars.fill_masks([st.constraint for st in constrained])
        except Exception as exc:
            log.exception("computing the grammar masks of step %d failed", launched.step)
            launched.mask_error = f"structured output failed: {type(exc).__name__}: {exc}"
            return None

    def _launch_ahead(self, launched: _LaunchedStep) -> _LaunchedStep | None:
        """Queue the decode step after `launched` before its tokens are known, when the scheduler would choose
        it anyway (see `Scheduler.schedule_ahead`) and no request needs its token history on the host. With
        constrained rows, only its forward is queued now; it is sampled in `_sample_ahead`."""
        if not launched.decode or launched.sample is None or launched.sample.device_tokens is None:
            return None
        if self.scheduler.strict_budget:   # inside a game's idle window: each step is launched only if it fits
            return None
        states = [st for st in launched.samplers if self._states.get(st.request_id) is st]
        if any(st.params.has_penalties or st.params.logits_processor is not None for st in states):
            return None   # their sampling reads the token history on the host
        rows = [i for i, st in enumerate(launched.samplers)
                if len(st.output_ids) + 1 < st.stop.max_new_tokens and self._states.get(st.request_id) is st]
        out = self.scheduler.schedule_ahead([st.seq for st in states], [launched.samplers[i].seq for i in rows],
                                            time.monotonic())
        if out is None:
            return None
        self.num_steps += 1
        self.num_steps_ahead += 1
        keep = [launched.samplers[i] for i in rows]
        ahead = _LaunchedStep(out, keep, keep, None, time.perf_counter(), step=self.num_steps,
                              decode=True)
        try:
            step = self.runner.run_ahead(out, launched.sample.device_tokens, rows)
            # Each row's token count is one more than now: the token being sampled is not appended yet.
            sample_rows = [SampleRow(st.params, st.seed, len(st.output_ids) + 1, st.prompt_ids, st.output_ids)
                           for st in keep]
            constrained = [k for k, st in enumerate(keep) if st.constraint is not None]
            if not constrained:
                ahead.sample = self.sampler.launch(step.logits, sample_rows, step.greedy_tokens)
            elif (self._mask_gate is not None and len(constrained) >= self.gen_params.mask_gate_rows
                  and self.sampler.fuses(sample_rows)):
                self._sample_behind_gate(ahead, step, sample_rows, constrained, launched.sample, rows)
            else:
                ahead.unsampled = (step, sample_rows)   # a grammar's mask needs the token being sampled now
        except Exception as exc:
            self._fail_step(ahead, exc)
        return ahead

    def _sample_ahead(self, ahead: _LaunchedStep) -> None:
        """Sample a step queued ahead whose constrained rows were not queued behind a gate: the previous step's
        tokens are in, so the grammars have moved on; their masks are computed now, while the device computes
        the step, and then it is sampled."""
        step, rows = ahead.unsampled
        ahead.unsampled = None
        try:
            # Rows whose request ended meanwhile sample unmasked: their token is void, and a finished grammar
            # may allow nothing.
            live = [i for i, st in enumerate(ahead.samplers)
                    if st.constraint is not None and self._states.get(st.request_id) is st]
            masks = self._masks_of(ahead, [ahead.samplers[i] for i in live])
            if masks is not None:
                for k, i in enumerate(live):
                    rows[i].mask_row = k
            ahead.sample = self.sampler.launch(step.logits, rows, step.greedy_tokens, masks)
        except Exception as exc:
            self._fail_step(ahead, exc)

    def _sample_behind_gate(self, ahead: _LaunchedStep, step: Any, rows: list[SampleRow], constrained: list[int],
                            previous: PendingSample, sources: list[int]) -> None:
        """Queue the sampling of a step queued ahead behind a stream gate, before the tokens that its masks
        depend on exist. The mask thread waits for the previous step's tokens (`previous`; row `sources[i]`
        there is row i here), moves the grammars on, computes the masks and opens the gate, with no turn of
        the engine thread between the tokens and the masks; `_collect` takes the grammars' verdicts from it
        (docs/benchmarks.md, issue 21)."""
        gate = self._mask_gate
        ticket = ahead.gate_ticket = gate.next_ticket()
        for k, i in enumerate(constrained):
            rows[i].mask_row = k
        from_rows = [sources[i] for i in constrained]

        def tokens() -> list[int]:
            ids = previous.token_ids()
            return [ids[i] for i in from_rows]

        ahead.masks_job = self.grammars.start_masks([ahead.samplers[i].constraint for i in constrained], tokens,
                                                   then=lambda: gate.open(ticket))
        try:
            ahead.sample = self.sampler.launch(step.logits, rows, step.greedy_tokens, ahead.masks_job.masks,
                                               masks_upload=lambda host: gate.copy_when_open(ticket, host))
        except Exception:   # sampled again once the gate is open, where each row can be sampled alone
            masks = self._await_masks(ahead)
            ahead.sample = self.sampler.launch(step.logits, rows, step.greedy_tokens, masks)

    @staticmethod
    def _let_masks_open_their_gate(launched: _LaunchedStep) -> None:
        """Hand the GIL over for a moment while a step's masks may be done: their thread needs it to open the
        gate, and would otherwise wait for this thread to block (up to the interpreter's 5 ms switch interval),
        holding back the sampling the device is ready for. Costs a microsecond when nobody waits."""
        if launched.masks_job is not None and not launched.masks_waited:
            time.sleep(0)

    def _await_masks(self, launched: _LaunchedStep) -> torch.Tensor | None:
        """Wait for a step's masks still being computed (its gate is open after this); a failure voids the
        step's constrained rows (`mask_error`). Before anything waits for the device or advances a grammar.
        The job (its pinned buffer, which the device reads) stays with the step until the step is dropped."""
        job = launched.masks_job
        if job is None or launched.masks_waited:
            return None if job is None else job.masks
        launched.masks_waited = True
        try:
            job.wait()
        except Exception as exc:
            log.exception("computing the grammar masks of step %d failed", launched.step)
            launched.mask_error = f"structured output failed: {type(exc).__name__}: {exc}"
        return job.masks

    def _fail_step(self, launched: _LaunchedStep, exc: Exception) -> None:
        self._await_masks(launched)
        log.exception("engine step %d failed (%d sequences, %d tokens)", self.num_steps, len(launched.out.scheduled),
                      launched.out.num_tokens)
        for state in launched.states:
            self._finish(state, "error", error=f"{type(exc).__name__}: {exc}", failed_step=True)
        launched.samplers, launched.sample = [], None

    def _collect(self, launched: _LaunchedStep, ahead: _LaunchedStep | None = None) -> None:
        """Wait for the step's tokens and apply them by id; their text waits in `_deferred` when overlapping.
        `ahead`: the step queued after it, whose mask job may consume these tokens into the grammars."""
        out = launched.out
        step = launched.step
        deferred: list[RequestState] = []
        self._await_masks(launched)   # their thread opens the gate the step's sampling waits at
        try:
            sampled = launched.sample.result() if launched.sample is not None else None
        except Exception as exc:
            self._fail_step(launched, exc)
            sampled = None
        if ahead is not None and ahead.masks_job is not None:
            ahead.masks_job.advanced.wait()   # the grammars' verdicts on these tokens come from that job
        if launched.gate_ticket is not None and self._mask_gate.was_late(launched.gate_ticket):
            self.late_mask_gates += 1   # sampled under all-ones masks: each token is still checked by its grammar
            log.warning("step %d: its grammar masks came later than the stream gate's timeout", step)
        # A step that outlasted its idle window shared the device with the game's next frame.
        spilled = launched.window_end is not None and time.monotonic() > launched.window_end
        self.window_spills += spilled
        if sampled is not None:
            for state, token, lp, error in zip(launched.samplers, sampled.token_ids, sampled.logprobs, sampled.errors):
                if self._states.get(state.request_id) is not state:
                    continue   # finished while this step ran (a stop string found late, a cancel): token void
                if launched.mask_error is not None and state.constraint is not None:
                    error = error or launched.mask_error
                if error is not None:
                    self._finish(state, "error", error=error)
                    continue
                try:
                    if self._accept_token(state, token, lp, step):
                        deferred.append(state)
                except Exception as exc:
                    log.exception("request %s failed", state.request_id)
                    self._finish(state, "error", error=f"{type(exc).__name__}: {exc}")
        info = StepInfo(step=step, seconds=time.perf_counter() - launched.started - launched.paused_s,
                        num_tokens=out.num_tokens,
                        num_seqs=len(out.scheduled),
                        num_decodes=sum(1 for s in out.scheduled if s.num_tokens == 1 and s.samples),
                        num_preempted=len(out.preempted), running=len(self.scheduler.running),
                        waiting=len(self.scheduler.waiting), kv_free_blocks=self.block_manager.num_free_blocks,
                        started=launched.started)
        self.step_seconds.append(info.seconds)
        if out.shape is not None and sampled is not None:   # a shape is computed only when a budget is in force
            self.cost_model.observe(out.shape, info.seconds, shared=spilled)   # (refits cost the engine thread ~1 ms)
        self._deferred = (info, deferred)

    def _flush_deferred(self) -> None:
        """Process the text of the last collected step, then tell the step listeners it is over."""
        if self._deferred is None:
            return
        info, states = self._deferred
        self._deferred = None
        for state in states:
            self._catch_up(state)
        for listener in self._step_listeners:
            try:
                listener(info)
            except Exception:
                log.exception("step listener failed")

    def _catch_up(self, state: RequestState) -> bool:
        """Process a live request's pending token text; True if that finished it (a stop string)."""
        if state.pending is None or self._states.get(state.request_id) is not state:
            return False
        token, lp, step = state.pending
        state.pending = None
        try:
            self._accept_text(state, token, lp, _NOT_FINISHED, step)
        except Exception as exc:
            log.exception("request %s failed", state.request_id)
            self._finish(state, "error", error=f"{type(exc).__name__}: {exc}")
        return self._states.get(state.request_id) is not state

    def _accept_token(self, state: RequestState, token: int, lp: TokenLogprobs | None, step: int) -> bool:
        """Apply a sampled token; True if its text is left for `_flush_deferred` (overlapping, not finished)."""
        now = time.perf_counter()
        state.first_token = state.first_token or now
        state.last_step = step
        state.output_ids.append(token)
        state.seq.token_ids.append(token)
        if lp is not None:
            state.logprobs.append(lp)
        verdict = state.stop.check_token(token, len(state.output_ids))
        # A stop token ends the output as it is; any other token, the last one allowed included, moves the grammar.
        if state.constraint is not None and not (verdict.finished and verdict.finish_reason == "stop"):
            error = state.constraint.advance(token)
            if error is not None:
                self._finish(state, "error", error=error)
                return False
            if state.constraint.complete:   # the grammar has ended: so has the output, with this token's text
                verdict = _GRAMMAR_COMPLETE
        if self.overlap_steps and not verdict.finished:
            state.pending = (token, lp, step)
            return True
        self._accept_text(state, token, lp, verdict, step)
        return False

    def _accept_text(self, state: RequestState, token: int, lp: TokenLogprobs | None, verdict: StopResult,
                     step: int) -> None:
        outcome = token_text(state, token, lp, verdict, step)
        if isinstance(outcome, Ending):
            self._finish(state, outcome.reason, text=outcome.text, new_tokens=[token], new_logprobs=lp)
        else:
            self._deliver(state, outcome)

    def _finish(self, state: RequestState, reason: str, *, text: str | None = None,
                new_tokens: list[int] | None = None, new_logprobs: TokenLogprobs | None = None,
                error: str | None = None, failed_step: bool = False) -> None:
        """End a request exactly once: free its blocks and send its final event."""
        if self._catch_up(state):
            return   # its pending token's text completed a stop string: it ended there
        if self._states.get(state.request_id) is not state:
            return
        del self._states[state.request_id]
        del self._by_seq[state.seq.seq_id]
        if reason in ("stop", "length"):
            self._remember(state)
        self.scheduler.finish(state.seq, failed=failed_step)
        with self._ids_lock:
            self._live_ids.discard(state.request_id)
        event = final_event(state, reason, text, new_tokens, new_logprobs, error,
                            step=state.last_step or self.num_steps)
        if state.cache_key is not None and event.result is not None:
            self.result_cache.put(state.cache_key, event.result)
        self._deliver(state, event)

    def _deliver(self, state: RequestState, event: StreamEvent) -> None:
        try:
            state.sink.put(event)
        except Exception:  # a listener's failure is its own; the engine goes on
            log.exception("delivering an event of request %s failed", state.request_id)

    # ----------------------------------------------------------------- NPC memory (issue #23)
    @property
    def identity(self) -> SnapshotIdentity:
        """The model's identity for snapshots and cached results (digests computed once, on first use)."""
        with self._identity_lock:
            if self._identity is None:
                cfg = self.model_config
                self._identity = SnapshotIdentity(
                    model=weights_digest(self.model, cfg), tokenizer=tokenizer_digest(self.tokenizer),
                    dtype=dtype_name(self.dtype), layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                    head_dim=cfg.head_dim)
            return self._identity

    def snapshot(self, source: list[int] | str, *, encoding: str = "raw", timeout: float | None = 60.0) -> bytes:
        """The KV of a conversation as a blob for the save game: `source` is a finished request's id (its prompt
        and output) or token ids. Holds the longest prefix of whole KV blocks the prefix cache has of them
        (`snapshot_tokens(blob)` says how many); `encoding` "raw" (the cache's bytes) or "int8" (about half)."""
        if encoding not in ENCODINGS:
            raise ValueError(f"snapshot encoding must be one of {ENCODINGS}, got {encoding!r}")
        # The engine thread only copies the blocks' KV (queued copies on a GPU); encoding and checksumming the
        # copy runs here, so a save does not hold up every NPC's next step (it took 154 ms on an H200).
        token_ids, layers = self._on_engine_thread(self.sessions.read, source, timeout=timeout)
        return encode(self.identity, token_ids, layers, self.block_manager.block_size, encoding)

    def prepare_structured_output(self) -> float:
        """Build the grammar engine's index of the vocabulary now (1.3-1.6 s for a 128k vocabulary, holding the
        GIL most of that time) instead of on the thread that submits the first `json_schema`/`regex`/`grammar`/
        `choice` request, where it would stall a game's frame or the bridge's message loop. Call it at load
        time; `gllm serve` does before it listens. Returns the seconds it took (0 if already built)."""
        started = time.perf_counter()
        if self.grammars.prepared:
            return 0.0
        self.grammars.prepare()
        return time.perf_counter() - started

    @staticmethod
    def snapshot_tokens(blob: bytes) -> int:
        """How many tokens a snapshot holds (read from its header; the blob is not checked further)."""
        return read_header(blob)[0]["tokens"]

    def restore(self, blob: bytes, *, timeout: float | None = 60.0) -> RestoreInfo:
        """Put a snapshot's KV into the prefix cache: the next request that starts with its tokens skips their
        prefill. A `gllm.kv.snapshot.SnapshotError` (typed) for another model's, a damaged or a too large blob."""
        # Checked and put on the pool's device on the caller's thread; the block writes wait for the engine thread.
        started = time.perf_counter()
        snap = decode(blob, self.identity, max_tokens=self.gen_params.max_seq_len, uploader=self._uploader)
        checked = time.perf_counter()
        info = self._on_engine_thread(self.sessions.restore, snap, timeout=timeout)
        return dataclasses.replace(info, check_s=checked - started, write_s=time.perf_counter() - checked)

    def pin(self, what: list[int] | str | list[dict[str, Any]], *, timeout: float | None = 120.0) -> str:
        """Keep the KV of a prefix resident (never evicted) until `unpin`: token ids, a text (a raw prompt) or
        chat messages (rendered without a generation prompt). Computes the prefix first if it is not cached.
        Returns the pin's id (the same for the same tokens). `PinRefused` if it would starve requests."""
        if isinstance(what, str):
            token_ids = self.tokenizer.encode(what, special_tokens_as_text=not self.gen_params.prompt_special_tokens)
        elif isinstance(what, list) and what and all(isinstance(m, dict) for m in what):
            token_ids = self.tokenizer.encode_chat(what, add_generation_prompt=False)
        elif isinstance(what, (list, tuple)):
            token_ids = list(what)
        else:
            raise RequestRejected("pin takes token ids, a text or chat messages", "pin")
        if len(token_ids) >= self.gen_params.max_seq_len:
            raise PinRefused(f"a pin of {len(token_ids)} tokens does not fit max_seq_len "
                             f"{self.gen_params.max_seq_len}", "pin")
        for _ in range(3):   # a prefix computed and then evicted before it was pinned (pool pressure): again
            pin_id = self._on_engine_thread(self.sessions.pin, token_ids, timeout=timeout)
            if pin_id is not None:
                return pin_id
            # One token more than the prefix, so that every block of the prefix is computed and published.
            self.generate(GenerationRequest(prompt_token_ids=token_ids + token_ids[-1:], max_new_tokens=1,
                                            temperature=0, cache_result=False), timeout=timeout)
        raise PinRefused("the prefix's KV blocks were evicted before they could be pinned (the pool is too busy)",
                         "pin")

    def unpin(self, pin_id: str, *, timeout: float | None = 60.0) -> bool:
        """Let a pin's blocks be evicted again; False if there is no such pin."""
        return self._on_engine_thread(self.sessions.unpin, pin_id, timeout=timeout)

    def embed(self, inputs: str | list[str] | list[int] | list[list[int]], *, pooling: str = "mean",
              timeout: float | None = 120.0) -> Embeddings:
        """Unit-length vectors of the loaded model's pooled final hidden states ("mean" over the tokens or the
        "last" token's), one per input in order. Texts get BOS as prompts do; token id lists are taken as they
        are. Each input runs on the engine thread between generation steps."""
        if pooling not in POOLINGS:
            raise RequestRejected(f"pooling must be one of {POOLINGS}, got {pooling!r}", "pooling")
        items = check_inputs(inputs)
        encoded = []
        for item in items:
            if isinstance(item, str):
                self._check_text_fits("input", len(item))
                item = self.tokenizer.encode(item, special_tokens_as_text=True)
            if not item:
                raise RequestRejected("an input must hold at least one token", "input")
            if len(item) > self.gen_params.max_seq_len:
                raise RequestTooLong(f"an input is {len(item)} tokens; max_seq_len is {self.gen_params.max_seq_len}",
                                     "input")
            if max(item) >= self.model_config.vocab_size or min(item) < 0:
                raise RequestRejected(f"token ids must be in [0, {self.model_config.vocab_size})", "input")
            encoded.append(item)
        vectors = [self._on_engine_thread(embed_tokens, self.runner, self.block_manager, ids, pooling,
                                          timeout=timeout) for ids in encoded]
        return Embeddings(vectors, sum(map(len, encoded)))

    def pins(self) -> dict[str, int]:
        """Pin id -> tokens it keeps resident (a snapshot for monitoring)."""
        bs = self.block_manager.block_size
        return {pin_id: len(blocks) * bs for pin_id, blocks in list(self.sessions.pins.items())}

    def _on_engine_thread(self, fn: Callable[..., Any], *args: Any, timeout: float | None) -> Any:
        """Run `fn(*args)` on the engine thread between two steps and return what it returns (or raise)."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        if self._closed:
            raise RuntimeError("the engine is closed")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, args, future)))
        return future.result(timeout)

    def _answer_from_cache(self, state: RequestState) -> bool:
        """Answer a deterministic request from the result cache (engine thread): one event with all its tokens,
        then the final one. False on a miss."""
        cached = self.result_cache.get(state.cache_key)
        if cached is None:
            return False
        now = time.perf_counter()
        elapsed = (now - state.submitted) * 1000.0
        cached.request_id = state.request_id
        cached.usage.cached, cached.usage.cached_tokens = True, cached.usage.prompt_tokens
        cached.timings = Timings(queued_ms=elapsed, ttft_ms=elapsed, total_ms=elapsed,
                                 ttft_deadline_met=None if state.ttft_deadline_ms is None
                                 else elapsed <= state.ttft_deadline_ms)
        cached.num_preemptions = 0
        with self._ids_lock:
            self._live_ids.discard(state.request_id)
        self._deliver(state, StreamEvent(state.request_id, cached.text, list(cached.tokens),
                                         list(cached.logprobs) if cached.logprobs is not None else None))
        self._deliver(state, StreamEvent(state.request_id, "", [], None, result=cached))
        return True

    def _remember(self, state: RequestState) -> None:
        """A request ended by itself: keep its tokens for `snapshot(request_id)`, and pin its system part if it
        asked (engine thread, before its blocks are freed)."""
        self.sessions.remember(state.request_id, state.prompt_ids + state.output_ids)
        if state.pin_tokens:
            try:
                self.sessions.pin(state.pin_tokens)
            except PinRefused as exc:
                log.warning("request %s: pin_prefix refused: %s", state.request_id, exc)

    def _system_part(self, req: GenerationRequest, prompt_ids: list[int]) -> list[int]:
        """The prompt ids of a request's leading system messages (for messages), else the whole prompt."""
        if req.messages is None:
            return list(prompt_ids)
        system = list(itertools.takewhile(lambda m: isinstance(m, dict) and m.get("role") == "system", req.messages))
        if not system:
            return []
        ids = self.tokenizer.encode_chat(system, add_generation_prompt=False)
        common = next((i for i, (a, b) in enumerate(zip(ids, prompt_ids)) if a != b), min(len(ids), len(prompt_ids)))
        return list(prompt_ids[:common])

