"""Structured output through llguidance: a request's `json_schema`, `regex`, `grammar` or `choice` becomes a
matcher that says, before each token, which tokens keep the output valid (a bitmask over the vocabulary).

`Grammars` belongs to one engine (one tokenizer): it compiles a constraint once per distinct content and keeps
the compiled matcher in a bounded LRU cache, so a request only copies it (microseconds). `Constraint` is one
request's matcher; `Grammars.fill_masks` computes the masks of a batch's constrained rows on the CPU (the
engine runs it while the device computes the step's logits). The sampler applies a mask after the raw
logprobs are taken and before penalties, temperature and the filters.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import llguidance
import numpy as np
import torch

from gllm.request_fields import FieldError

DEFAULT_CACHE_SIZE = 128
# JSON without optional whitespace: a game parses it, nobody reads it, and a small model cannot then
# wander off into newlines and spaces until its token limit.
JSON_OPTIONS = {"whitespace_flexible": False}
# llguidance's slicer allows a whole slice of the vocabulary at once where the lexer accepts every token in it.
# With its default slices a JSON string within 10 characters of its maxLength walks all 128k tokens (~2 ms a
# row); slices by length cut that by a third and the mean mask by a quarter (docs/benchmarks.md, issue 21).
_STRING_CHAR = r'[^"\\\x00-\x1F\x7F]'
SLICES = [r"[\x20\x0A\x0D\x09]+", *(f"{_STRING_CHAR}{{1,{n}}}" for n in (2, 4, 6, 8, 10, 20, 30)), f"{_STRING_CHAR}+"]


class Constraint:
    """One request's position in its grammar. `complete`: the grammar has ended (no token but end-of-sequence
    could follow)."""

    def __init__(self, matcher: llguidance.LLMatcher, field: str) -> None:
        self.matcher = matcher
        self.field = field
        self.complete = matcher.is_stopped()
        self._taken: tuple[int, str | None] | None = None   # a token the mask thread consumed ahead (see below)

    def advance(self, token: int) -> str | None:
        """Consume a sampled token; the matcher's error when it does not fit (None: it did). If a mask job
        consumed it already (`Grammars.start_masks`), returns what happened then without touching the matcher,
        which that job may be using."""
        if self._taken is not None:
            (taken, error), self._taken = self._taken, None
            if taken != token:
                raise RuntimeError(f"{self.field}: token {token} sampled, but the mask thread consumed {taken}")
            return error
        error = None if self.matcher.consume_token(token) else self._error(token)
        self.complete = self.matcher.is_stopped()
        return error

    @property
    def going(self) -> bool:
        """Neither ended nor failed: the grammar says which tokens may come next."""
        return not self.complete and not self.matcher.is_error()

    def _taken_ahead(self, token: int, consumed: bool) -> None:
        """Record a token consumed on the mask thread, for the engine's `advance` of it."""
        error = None if consumed else self._error(token)
        self.complete = self.matcher.is_stopped()
        self._taken = (token, error)

    def _error(self, token: int) -> str:
        return f"{self.field}: token {token} does not fit the constraint: {self.matcher.get_error()}"


class Grammars:
    """Compiled constraints for one tokenizer, cached by content (thread-safe: requests are checked on the
    callers' threads). `tokenizer_json` gives the tokenizer's `tokenizers` JSON; it is read once, on the first
    constraint (building llguidance's token trie takes a second for a 128k vocabulary). `threads` compute a
    batch's masks in parallel; `pinned` puts the masks in pinned memory (for a GPU)."""

    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: Sequence[int],
                 cache_size: int = DEFAULT_CACHE_SIZE, threads: int = 1, pinned: bool = False) -> None:
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self._eos = list(eos_token_ids)
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], _Compiled] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor: llguidance.LLExecutor | None = None
        self._mask_thread: ThreadPoolExecutor | None = None   # for masks computed beside the engine's Python
        self._threads = threads             # for a batch's masks (rows in parallel)
        self.originals = threads            # matchers compiled per constraint (see `_Compiled`)
        self._pinned = pinned               # masks in pinned memory, for a GPU sampler to copy without staging
        self.compiled = 0                   # cache misses (for tests and stats)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._tokenizer_json(), n_vocab=self.vocab_size,
                                                         eos_token=self._eos or None, slices=SLICES)
            return self._tokenizer

    @property
    def prepared(self) -> bool:
        """Whether the token index is built (by `prepare` or the first constraint)."""
        return self._tokenizer is not None

    def prepare(self) -> None:
        """Build the token index now rather than at the first constraint (see `LLMEngine.prepare_structured_output`)."""
        self.tokenizer  # noqa: B018 (the property builds it)

    @property
    def threads(self) -> int:
        """Threads a batch's masks are computed on."""
        return self._threads

    @property
    def mask_words(self) -> int:
        """int32 words per row of a mask."""
        return (self.vocab_size + 31) // 32

    def start(self, field: str, source: str) -> Constraint:
        """A fresh matcher for `source` (the text the request field table made of the field's value);
        `FieldError(field, "invalid")` when it does not compile."""
        key = (field, source)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            compiled = _Compiled(self._compile(field, source), self.originals)
            with self._lock:
                self._cache[key] = compiled
                self.compiled += 1
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return Constraint(compiled.copy(self.tokenizer), field)

    def _compile(self, field: str, source: str) -> tuple[str, llguidance.LLMatcher]:
        try:
            if field == "json_schema":
                grammar = llguidance.LLMatcher.grammar_from_json_schema(source, defaults=JSON_OPTIONS)
            elif field == "regex":
                grammar = llguidance.LLMatcher.grammar_from_regex(source)
            elif field == "grammar":   # Lark as llguidance reads it, or llama.cpp's GBNF (converted to Lark)
                grammar = llguidance.grammar_from("grammar", source)
            elif field == "choice":
                grammar = llguidance.grammar_from("choice", json.loads(source))
            else:
                raise ValueError(f"unknown constraint {field!r}")
        except ValueError as exc:
            raise FieldError(field, "invalid", f"cannot be compiled: {exc}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise FieldError(field, "invalid", f"cannot be compiled: {_first_lines(matcher.get_error())}")
        return grammar, matcher

    def fill_masks(self, constraints: Sequence[Constraint]) -> torch.Tensor:
        """The allowed-token bitmasks of `constraints`, one int32 row each (bit t of word t // 32 set: token t
        allowed), on the host. One caller at a time (the engine thread's step), never while a `MaskJob` runs."""
        masks = self._new_masks(len(constraints))
        self._fill(constraints, masks)
        return masks

    def start_masks(self, constraints: Sequence[Constraint], tokens: Callable[[], Sequence[int]],
                    then: Callable[[], None]) -> "MaskJob":
        """The next step's masks, on the mask thread, after the jobs queued before: wait there for `tokens()`
        (the previous step's sampled ids, one per constraint), advance each constraint by its token, then
        compute the masks; `then` runs there once they are written, or the job failed (the signal to whatever
        waits for them: a gate the device waits at). A constraint that ended or failed at its token gets an
        all-ones row (its next token is void). Returns at once. Until `MaskJob.advanced` the caller must not
        advance these constraints; after it, `advance` returns what the job's consuming did; and until
        `MaskJob.wait` returned it touches them only through `advance` and `complete`."""
        masks = self._new_masks(len(constraints))
        advanced = threading.Event()

        def work() -> None:
            try:
                try:
                    ids = list(tokens())
                    pairs = [(c.matcher, t) for c, t in zip(constraints, ids)]
                    consumed = self._llg_executor().consume_token_par(pairs)
                    for c, t, ok in zip(constraints, ids, consumed):
                        c._taken_ahead(t, ok)
                finally:
                    advanced.set()
                live = [i for i, c in enumerate(constraints) if c.going]
                if len(live) < len(constraints):
                    masks[sorted(set(range(len(constraints))) - set(live))] = -1
                self._fill([constraints[i] for i in live], masks, rows=live)
            finally:
                then()

        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(1, thread_name_prefix="gllm-masks")
        return MaskJob(masks, self._mask_thread.submit(work), advanced)

    def settle(self) -> None:
        """Until every mask job queued so far has ended (their `then` has run)."""
        if self._mask_thread is not None:
            self._mask_thread.submit(lambda: None).result()

    def close(self) -> None:
        """Stop the mask thread (after the job it may be running)."""
        if self._mask_thread is not None:
            self._mask_thread.shutdown(wait=True)
            self._mask_thread = None

    def _new_masks(self, rows: int) -> torch.Tensor:
        return torch.empty((rows, self.mask_words), dtype=torch.int32, pin_memory=self._pinned)

    def _llg_executor(self) -> llguidance.LLExecutor:
        if self._executor is None:
            self._executor = llguidance.LLExecutor(num_threads=self._threads)
        return self._executor

    def _fill(self, constraints: Sequence[Constraint], masks: torch.Tensor, rows: Sequence[int] | None = None) -> None:
        """Write `constraints`' masks into `masks` (row i, or `rows[i]`)."""
        if constraints:
            self._llg_executor().unsafe_compute_mask_ptr(
                [(c.matcher, i) for i, c in zip(rows if rows is not None else range(len(constraints)), constraints)],
                masks.data_ptr(), self.mask_words * 4, masks.shape[0])


class MaskJob:
    """Masks being computed on the mask thread (`Grammars.start_masks`): `masks` is their host buffer, written
    by the time `wait` returns; `advanced` is set once the job has consumed the previous step's tokens (or
    failed before)."""

    def __init__(self, masks: torch.Tensor, future: Future[None], advanced: threading.Event) -> None:
        self.masks = masks
        self.advanced = advanced
        self._future = future

    def wait(self) -> None:
        """Until the masks are written; raises what computing them raised."""
        self._future.result()


class _Compiled:
    """One constraint's compiled matchers. A request's matcher is a copy of one of them, and copies share their
    original's lexer, whose lazily built automaton sits behind a lock: rows copied from one original do not
    compute their masks in parallel (16 rows at the end of a bounded string: 38 ms on 2 threads against 39 ms
    on one). So there are as many originals as mask threads, built as requests arrive (~1 ms each), and
    requests take them in turn; each original's automaton warms up for the requests that share it."""

    def __init__(self, compiled: tuple[str, llguidance.LLMatcher], originals: int) -> None:
        self.grammar, first = compiled
        self._originals = [first]
        self._size = max(1, originals)
        self._next = 0
        self._lock = threading.Lock()

    def copy(self, tokenizer: llguidance.LLTokenizer) -> llguidance.LLMatcher:
        with self._lock:
            i, self._next = self._next, (self._next + 1) % self._size
            if i < len(self._originals):
                return self._originals[i].deep_copy()
        original = llguidance.LLMatcher(tokenizer, self.grammar, log_level=0)
        with self._lock:
            if len(self._originals) < self._size:
                self._originals.append(original)
        return original.deep_copy()


def unpack_masks(masks: torch.Tensor, vocab_size: int, shifts: torch.Tensor) -> torch.Tensor:
    """[n, words] int32 bitmasks to [n, vocab_size] booleans (True: allowed), on the masks' device. On the CPU
    numpy's unpackbits over the words' bytes (little-endian: bit t of word t // 32 is bit t % 8 of byte t // 8),
    a tenth of the shift-and-mask temporaries' time at 16 rows of a 128k vocabulary."""
    if masks.device.type == "cpu" and sys.byteorder == "little":
        raw = masks.contiguous().numpy().view(np.uint8)
        return torch.from_numpy(np.unpackbits(raw, axis=1, count=vocab_size, bitorder="little").view(np.bool_))
    bits = (masks[:, :, None] >> shifts) & 1
    return bits.reshape(masks.shape[0], -1)[:, :vocab_size].bool()


def _first_lines(text: str, n: int = 6) -> str:
    return "\n".join(text.splitlines()[:n])
