"""`EngineAPI`: what the front ends (`gllm.bridge`, `gllm.http`, `gllm.frontend.metrics`) use of an engine.

`LLMEngine` has all of it; a test double only needs to look the same (a `typing.Protocol`, checked by type
checkers, never at run time). Front ends call nothing else, and probe for nothing: every member is there.
This module imports no engine code (request types only, for type checkers).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from gllm.engine.params import GeneratorParams
    from gllm.engine.request import GenerationRequest, StepInfo, StreamEvent


class EngineAPI(Protocol):
    @property
    def model_name(self) -> str:
        """The model as it was named (a known name, a path, an HF id); front ends show `short_model_name`."""

    @property
    def device(self) -> Any:
        """Where the engine computes (shown as ``str(device)``)."""

    @property
    def gen_params(self) -> GeneratorParams:
        """The engine's sizing (max_seq_len, max_batch_size, block_size, ...)."""

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (token text for OpenAI logprobs)."""

    @property
    def num_steps(self) -> int:
        """Engine steps run so far (written by the engine thread)."""

    @property
    def closed(self) -> bool:
        """True once `close()` was called: no new requests are accepted."""

    def add_request(self, req: GenerationRequest, on_event: Callable[[StreamEvent], None]) -> str:
        """Submit; `on_event` runs on the engine thread for each event, the last one carrying the result.
        Raises ValueError (`RequestRejected` and subclasses) for a request it refuses, RuntimeError once closed."""

    def cancel(self, request_id: str) -> None:
        """End a request (finish_reason "cancelled"); a no-op for one already finished."""

    def stats(self) -> dict[str, Any]:
        """A snapshot of the engine's counters: running, waiting, kv_free_blocks, kv_total_blocks, steps, ..."""

    def report_frame(self, ms: float, target_ms: float | None = None, source: str = "python", *,
                     max_ms: float | None = None, frames: int | None = None, over: int | None = None) -> None:
        """The game's frame took `ms` against `target_ms` (and, since the previous report, the longest frame,
        how many frames, how many over 1.1 x target): feeds the frame governor."""

    def report_idle(self, ms: float, source: str = "python") -> None:
        """The game will not need the device for the next `ms` milliseconds: the engine computes in such windows."""

    def add_step_listener(self, listener: Callable[[StepInfo], None]) -> None:
        """Call `listener(StepInfo)` on the engine thread after every step."""

    def remove_step_listener(self, listener: Callable[[StepInfo], None]) -> None:
        """Stop calling `listener`."""

    # NPC memory (issue #23)
    def embed(self, inputs: Any, *, pooling: str = "mean", timeout: float | None = 120.0) -> Any:
        """`Embeddings` (vectors, prompt_tokens) of the inputs; blocks the calling thread (call it off an event
        loop). Raises ValueError (`RequestRejected`) for bad input, `EngineBusy` when KV blocks are short."""

    def snapshot(self, source: list[int] | str, *, encoding: str = "raw", timeout: float | None = 60.0) -> bytes:
        """A KV snapshot blob of a finished request (by id) or of token ids; `SnapshotError` if none is cached."""

    def restore(self, blob: bytes, *, timeout: float | None = 60.0) -> Any:
        """Put a snapshot into the prefix cache (`RestoreInfo`); `SnapshotError` (typed) for a bad blob."""

    def pin(self, what: Any, *, timeout: float | None = 120.0) -> str:
        """Keep a prefix's KV resident; its pin id. `PinRefused` when it would starve requests."""

    def unpin(self, pin_id: str, *, timeout: float | None = 60.0) -> bool:
        """Release a pin; False if there is none of that id."""

    def snapshot_tokens(self, blob: bytes) -> int:
        """How many tokens a snapshot blob holds (from its header)."""

    def pins(self) -> dict[str, int]:
        """Pin id -> tokens it keeps resident."""

