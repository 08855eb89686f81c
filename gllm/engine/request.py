"""What callers hand the engine and what they get back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from gllm.request_fields import ENGINE_FIELDS, SAMPLING_FIELDS, SCHEDULING_FIELDS
from gllm.sampling import SamplingParams, TokenLogprobs


@dataclass
class GenerationRequest:
    prompt: str | None = None                       # raw text (BOS added by the tokenizer)
    messages: list[dict[str, Any]] | None = None    # or a chat, rendered with the model's template
    prompt_token_ids: list[int] | None = None       # or token ids as they are
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    logprobs: int | None = None
    stop: list[str] | tuple[str, ...] = ()
    stop_token_ids: list[int] | tuple[int, ...] = ()
    ignore_eos: bool = False
    priority: int = 0                               # higher is served first and preempted last
    max_tokens_per_s: float = 0.0                   # pace the reply (0 = as fast as possible)
    ttft_deadline_ms: float = 0.0                   # first token wanted within this (0 = no deadline)
    # Structured output, at most one: a JSON Schema (dict or JSON text), a regex, a Lark/GBNF grammar, a choice.
    json_schema: dict[str, Any] | str | None = None
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | tuple[str, ...] = ()
    tools: list[dict[str, Any]] | None = None       # function tools shown to the model by its chat template
    request_id: str | None = None                   # default: a fresh unique id
    logits_processor: Callable[[list[int], Any], Any] | None = None
    # NPC memory (issue #23).
    cache_result: bool = True                       # false: never answered from / stored in the result cache
    pin_prefix: bool = False                        # keep the system part's KV resident (see LLMEngine.pin)

    def sampling_params(self) -> SamplingParams:
        """The sampling fields, validated against the request field table (`FieldError` names the field); the
        scheduling fields are checked too."""
        for f in SCHEDULING_FIELDS + ENGINE_FIELDS:
            f.check(getattr(self, f.name))
        return SamplingParams(logits_processor=self.logits_processor,
                              **{f.name: getattr(self, f.name) for f in SAMPLING_FIELDS})


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0          # prompt tokens served by the prefix cache
    cached: bool = False            # the whole result came from the prompt-result cache


@dataclass
class Timings:
    queued_ms: float                # submission to first scheduled step
    ttft_ms: float | None           # submission to first token
    total_ms: float
    ttft_deadline_met: bool | None = None   # with a ttft_deadline_ms: whether the first token came in time


@dataclass
class GenerationResult:
    request_id: str
    text: str
    tokens: list[int]
    finish_reason: str              # "stop", "length", "cancelled" or "error"
    usage: Usage
    timings: Timings
    logprobs: list[TokenLogprobs] | None = None
    num_preemptions: int = 0
    error: str | None = None        # set when finish_reason == "error"


@dataclass
class StreamEvent:
    """New output of one request since its previous event; the last one carries the result."""
    request_id: str
    text: str                                    # new text (never splits a character or leaks a stop string)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    result: GenerationResult | None = None       # set on the final event
    step: int = 0                                # the engine step that produced it (0: outside a step)

    @property
    def finished(self) -> bool:
        return self.result is not None


@dataclass
class StepInfo:
    """What one engine step did (for metrics and dashboards)."""
    step: int
    seconds: float                  # wall time of the step: schedule, forward, sample, deliver
    num_tokens: int                 # tokens computed (prefill chunks + decodes)
    num_seqs: int                   # sequences in the batch
    num_decodes: int                # of which were single-token decodes
    num_preempted: int
    running: int                    # after the step
    waiting: int
    kv_free_blocks: int
    started: float = 0.0            # when the step began (time.perf_counter)
