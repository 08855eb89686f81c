"""From sampled token ids to what a caller sees: a live request's state, its streamed text deltas (held back
where a stop string could still begin), and its one final result."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gllm.engine.request import GenerationResult, StreamEvent, Timings, Usage
from gllm.engine.sinks import EventSink
from gllm.sampling import SamplingParams, StopChecker, StopResult, TokenLogprobs
from gllm.sampling.grammar import Constraint
from gllm.scheduler import Sequence
from gllm.tokenizer import IncrementalDetokenizer


@dataclass(eq=False)
class RequestState:
    """Everything the engine tracks for one live request (engine thread only after submission). The token
    ids live in `seq` (for the scheduler and runner) and again as prompt/output lists, which the sampler
    reads every step without slicing."""
    request_id: str
    seq: Sequence
    params: SamplingParams
    seed: int
    stop: StopChecker
    detok: IncrementalDetokenizer
    sink: EventSink
    submitted: float
    prompt_ids: list[int] = field(default_factory=list)
    ttft_deadline_ms: float | None = None
    first_scheduled: float | None = None
    first_token: float | None = None
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    sent_chars: int = 0
    # A token accepted by id whose text is not processed yet (overlapped steps): (token, logprobs, step).
    pending: tuple[int, TokenLogprobs | None, int] | None = None
    last_step: int = 0          # the step that produced its last token (its final event's step)
    constraint: Constraint | None = None   # structured output: where the output stands in its grammar
    cache_key: str | None = None         # its prompt-result cache key (a deterministic request that may be cached)
    pin_tokens: list[int] | None = None  # pin_prefix: the prompt ids to pin once it has run


@dataclass
class Ending:
    """A token's text ended its request: with `reason`, and this final text."""
    reason: str
    text: str


def token_text(state: RequestState, token: int, lp: TokenLogprobs | None, verdict: StopResult,
               step: int) -> StreamEvent | Ending:
    """Detokenize an accepted token: the event streaming its new text, or how the request ends."""
    stop_token = verdict.finished and verdict.finish_reason == "stop" and not verdict.keep_text
    new_text = "" if stop_token else state.detok.add([token])
    text = state.detok.text
    cut = state.stop.find_stop_string(text, len(new_text))
    if cut is not None:
        return Ending("stop", text[:cut])
    if verdict.finished:
        return Ending(verdict.finish_reason or "stop", text + state.detok.finish())
    safe = state.stop.safe_length(text)
    delta, state.sent_chars = text[state.sent_chars:safe], max(state.sent_chars, safe)
    return StreamEvent(state.request_id, delta, [token], None if lp is None else [lp], step=step)


def final_event(state: RequestState, reason: str, text: str | None, new_tokens: list[int] | None,
                new_logprobs: TokenLogprobs | None, error: str | None, step: int) -> StreamEvent:
    """The request's last event, carrying its result (the text not streamed yet as its delta)."""
    if text is None:
        text = state.detok.text[: state.stop.safe_length(state.detok.text)]
    now = time.perf_counter()

    def ms(t: float | None) -> float | None:
        return None if t is None else (t - state.submitted) * 1000.0

    result = GenerationResult(
        request_id=state.request_id, text=text, tokens=list(state.output_ids), finish_reason=reason,
        usage=Usage(state.seq.num_prompt_tokens, len(state.output_ids), state.seq.num_cached_tokens),
        timings=Timings(queued_ms=ms(state.first_scheduled) or 0.0, ttft_ms=ms(state.first_token),
                        total_ms=ms(now), ttft_deadline_met=_deadline_met(state, ms(state.first_token))),
        logprobs=list(state.logprobs) if state.params.logprobs is not None else None,
        num_preemptions=state.seq.num_preemptions, error=error)
    return StreamEvent(state.request_id, text[state.sent_chars:], new_tokens or [],
                       None if new_logprobs is None else [new_logprobs], result=result, step=step)


def _deadline_met(state: RequestState, ttft_ms: float | None) -> bool | None:
    if state.ttft_deadline_ms is None:
        return None
    return ttft_ms is not None and ttft_ms <= state.ttft_deadline_ms
