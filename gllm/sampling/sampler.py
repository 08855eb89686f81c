"""`Sampler`: picks the next token for every row of a batch at once.

Order per row: logprobs from the raw distribution; per-request logits processor (seam for
constrained decoding); the structured-output mask (tokens the request's grammar forbids get -inf);
penalties; temperature (0 = greedy argmax); top-k; top-p; min-p; then
an exponential race (argmax of p / E, E ~ Exp(1) from seeded noise), which samples exactly
from the filtered distribution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gllm.sampling.grammar import unpack_masks
from gllm.sampling.noise import RACE_MARGIN, NoiseTable, row_key
from gllm.sampling.params import SamplingParams
from gllm.transfer import to_device


@dataclass
class SampleRow:
    """What the sampler needs to know about one row."""
    params: SamplingParams
    seed: int                     # the request's seed (drawn by the engine if the request gave none)
    step: int                     # how many tokens this request sampled before
    prompt_ids: list[int]
    output_ids: list[int]
    mask_row: int | None = None   # the row of `launch`'s `masks` holding this row's allowed tokens (structured output)


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the N most likely tokens, most likely first


@dataclass
class SampleOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: list[str | None]      # per row: why its logits processor failed (that row's token is void)


@dataclass
class PendingSample:
    """A sample whose tokens (and logprobs) are still on their way to the host; `result()` waits for them.

    Lets the engine queue the next step's work on the GPU before it needs this step's tokens."""
    rows: list[SampleRow]
    errors: list[str | None]
    tokens: torch.Tensor                       # [B] int64, host (pinned on CUDA)
    chosen: torch.Tensor | None = None         # [B] float32 logprob of each token (host)
    top_vals: torch.Tensor | None = None       # [B, N] (host)
    top_ids: torch.Tensor | None = None
    done: torch.cuda.Event | None = None       # recorded after the copies (None on the CPU: already there)
    device_tokens: torch.Tensor | None = None  # [B] the tokens where they were sampled (input of a step ahead)
    ready: SampleOutput | None = None          # already on the host (rows sampled one by one)

    def token_ids(self) -> list[int]:
        """The sampled ids alone (waits for them as `result` does; any thread may ask)."""
        if self.ready is not None:
            return self.ready.token_ids
        if self.done is not None:
            self.done.synchronize()
        return self.tokens.tolist()

    def result(self) -> SampleOutput:
        if self.ready is not None:
            return self.ready
        token_list = self.token_ids()
        if self.chosen is None:
            return SampleOutput(token_list, [None] * len(self.rows), self.errors)
        chosen, top_vals, top_ids = self.chosen.tolist(), self.top_vals.tolist(), self.top_ids.tolist()
        logprobs: list[TokenLogprobs | None] = []
        for i, r in enumerate(self.rows):
            n = r.params.logprobs
            logprobs.append(None if n is None else
                            TokenLogprobs(token_list[i], chosen[i], list(zip(top_ids[i][:n], top_vals[i][:n]))))
        return SampleOutput(token_list, logprobs, self.errors)


def _race_for(device: torch.device):
    """The fused race kernel on CUDA with Triton (`gllm.sampling.triton_race`), else None (torch's ops)."""
    if device.type != "cuda":
        return None
    try:
        from gllm.sampling.triton_race import race
    except ImportError:
        return None
    return race


def _argmax_for(device: torch.device):
    """Row-wise argmax: the chunked Triton kernels on CUDA (torch's spends ~28 µs on one 128k row), else torch's."""
    if device.type == "cuda":
        try:
            from gllm.sampling.triton_argmax import argmax
            return argmax
        except ImportError:   # no Triton: the engine has already logged the slower path
            pass
    return lambda logits: logits.argmax(dim=-1)


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device | str) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.noise = NoiseTable(vocab_size, device)
        self._argmax = _argmax_for(self.device)
        self._fused_race = _race_for(self.device)
        self._shifts = torch.arange(32, dtype=torch.int32, device=self.device)
        if self._fused_race is not None:
            self._warm_up()

    def _warm_up(self) -> None:
        """Compile the race kernel and launch what follows a batch's masks once, now, at load: not in a step (a
        second or so), and not behind a stream gate (with CUDA's lazy loading a kernel's first launch waits
        for the device)."""
        logits = torch.zeros(2, self.vocab_size, device=self.device)
        masks = torch.full((1, (self.vocab_size + 31) // 32), -1, dtype=torch.int32).pin_memory()
        for logprobs in (None, 0, 20):
            for mask_row in (None, 0):
                rows = [SampleRow(SamplingParams(temperature=t, logprobs=logprobs), 0, 0, [], [], mask_row=mask_row)
                        for t in (0.0, 1.0)]
                self.launch(logits, rows, masks=masks if mask_row is not None else None).result()

    def sample(self, logits: torch.Tensor, rows: list[SampleRow], masks: torch.Tensor | None = None) -> SampleOutput:
        """logits: [B, V] float32, one row per entry of `rows`."""
        return self.launch(logits, rows, masks=masks).result()

    @torch.inference_mode()
    def launch(self, logits: torch.Tensor, rows: list[SampleRow], greedy_tokens: torch.Tensor | None = None,
               masks: torch.Tensor | None = None,
               masks_upload: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PendingSample:
        """Queue the sampling of `logits` and the copy of its results to the host; does not wait for the GPU
        (unless a logits processor does). `greedy_tokens`, if given, is each row's argmax of `logits` already
        computed (a decode graph's); the greedy rows take it unless processors, masks or penalties change the
        logits. `masks` ([n, ceil(V/32)] int32 bitmasks on the host, see `gllm.sampling.grammar`) holds the allowed
        tokens of the rows whose `mask_row` points into it. `masks_upload`, on CUDA, puts them on the device
        instead of a plain copy (`StreamGate.copy_when_open`: masks the host is still writing); only for a
        batch that `fuses`.
        If sampling the batch fails, each row is sampled alone: a row that still fails gets an error (its
        token is void) and the other rows their tokens, so one request's values never fail its neighbours.
        Not with `masks_upload` (a gate the host cannot wait for here): then the failure is raised."""
        try:
            return self._launch_batch(logits, rows, greedy_tokens, masks, masks_upload)
        except Exception:
            if masks_upload is not None:
                raise
            return self._launch_each(logits, rows, greedy_tokens, masks)

    def _launch_each(self, logits: torch.Tensor, rows: list[SampleRow], greedy_tokens: torch.Tensor | None,
                     masks: torch.Tensor | None) -> PendingSample:
        tokens: list[int] = []
        logprobs: list[TokenLogprobs | None] = []
        errors: list[str | None] = []
        for i, row in enumerate(rows):
            try:
                one = self._launch_batch(logits[i:i + 1], [row],
                                         None if greedy_tokens is None else greedy_tokens[i:i + 1], masks).result()
                token, lp, error = one.token_ids[0], one.logprobs[0], one.errors[0]
            except Exception as exc:
                token, lp, error = 0, None, f"sampling failed: {type(exc).__name__}: {exc}"
            tokens.append(token)
            logprobs.append(lp)
            errors.append(error)
        return PendingSample(rows, errors, torch.tensor(tokens, dtype=torch.int64),
                             ready=SampleOutput(tokens, logprobs, errors))

    def _launch_batch(self, logits: torch.Tensor, rows: list[SampleRow], greedy_tokens: torch.Tensor | None,
                      masks: torch.Tensor | None = None,
                      masks_upload: Callable[[torch.Tensor], torch.Tensor] | None = None) -> PendingSample:
        logits = logits[:, : self.vocab_size]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(r.params.logprobs is not None for r in rows) else None
        logits, errors = self._apply_processors(logits, rows)
        masked = [i for i, r in enumerate(rows) if r.mask_row is not None]
        sampled_rows = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        penalties = any(r.params.has_penalties for r in rows)
        fused = self.fuses(rows)
        if masks_upload is not None and not (fused and masked):
            raise ValueError("masks_upload is for a batch with masks that fuses")
        top = None
        if raw_logprobs is not None:   # before the masks: nothing after them that the GPU may not have loaded
            max_n = max(r.params.logprobs or 0 for r in rows)
            top = raw_logprobs.topk(max_n, dim=-1) if max_n else None
        if masked:
            masks = masks_upload(masks) if masks_upload is not None else self._masks_to_device(masks)
        if masked and not fused:
            logits = self._apply_masks(logits, rows, masked, masks)
        if penalties:
            logits = self._apply_penalties(logits, rows)
        if masked or penalties or any(r.params.logits_processor is not None for r in rows):
            greedy_tokens = None
        if fused:
            tokens = self._race_rows(logits, rows, masks if masked else None)
        elif not sampled_rows:
            tokens = self._argmax(logits) if greedy_tokens is None else greedy_tokens
        elif len(sampled_rows) == len(rows):      # no greedy row: no argmax pass, no row copies
            tokens = self._sample_random(logits, rows)
        else:
            # Rows are overwritten in place: a graph's token buffer then holds what the next step reads.
            tokens = self._argmax(logits) if greedy_tokens is None else greedy_tokens
            index = to_device(sampled_rows, torch.int64, self.device)
            tokens[index] = self._sample_random(logits[index], [rows[i] for i in sampled_rows])
        pending = PendingSample(rows, errors, self._to_host(tokens), device_tokens=tokens)
        if raw_logprobs is not None:
            pending.chosen = self._to_host(raw_logprobs.gather(1, tokens[:, None])[:, 0])
            top_vals, top_ids = top if top is not None else (raw_logprobs[:, :0], tokens[:, None][:, :0])
            pending.top_vals, pending.top_ids = self._to_host(top_vals), self._to_host(top_ids)
        if tokens.is_cuda:
            pending.done = torch.cuda.Event()
            pending.done.record()
        return pending

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        if not t.is_cuda:
            return t
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        return host.copy_(t, non_blocking=True)

    def _apply_processors(self, logits: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, list[str | None]]:
        errors: list[str | None] = [None] * len(rows)
        if all(r.params.logits_processor is None for r in rows):
            return logits, errors
        logits = logits.clone()
        for i, r in enumerate(rows):
            if r.params.logits_processor is not None:
                try:  # user code: its failure voids its own row, not the batch
                    logits[i] = r.params.logits_processor(r.prompt_ids + r.output_ids, logits[i])
                except Exception as exc:
                    errors[i] = f"logits_processor failed: {type(exc).__name__}: {exc}"
        return logits, errors

    def fuses(self, rows: list[SampleRow]) -> bool:
        """Whether the batch samples in the fused race kernel: noise, mask and argmax in one pass, where nothing
        needs the masked logits themselves (filters sort them, penalties change them; a batch of greedy rows
        without masks has its argmax already)."""
        return self._fused_race is not None and not any(r.params.has_penalties or _filters(r) for r in rows) \
            and any(r.mask_row is not None or not r.params.is_greedy for r in rows)

    def _masks_to_device(self, masks: torch.Tensor) -> torch.Tensor:
        """The whole host buffer at once, in stream order, where the sampling runs. `Grammars` puts a GPU's
        masks in pinned memory; a pageable buffer is copied too, after the work queued before it. (Not asked
        with `Tensor.is_pinned`: ~54 us of host time a call on an H200 host, docs/benchmarks.md issue 21.)"""
        if self.device.type != "cuda":
            return masks.to(self.device)
        return masks.to(self.device, non_blocking=True)

    def _apply_masks(self, logits: torch.Tensor, rows: list[SampleRow], masked: list[int],
                     masks: torch.Tensor) -> torch.Tensor:
        """-inf for the tokens each masked row's grammar forbids (the other rows' logits stay as they are)."""
        mask_rows = [rows[i].mask_row for i in masked]
        bits = masks if mask_rows == list(range(masks.shape[0])) else masks[
            to_device(mask_rows, torch.int64, self.device)]
        allowed = unpack_masks(bits, logits.shape[1], self._shifts)
        if len(masked) == logits.shape[0]:     # every row constrained: one pass, no gather and scatter
            return logits.masked_fill(~allowed, float("-inf"))
        index = to_device(masked, torch.int64, self.device)
        logits = logits.clone()
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        return logits

    def _race_rows(self, logits: torch.Tensor, rows: list[SampleRow], masks: torch.Tensor | None) -> torch.Tensor:
        # The rows' temperatures (0: greedy), noise keys and mask rows go up in one copy: int32 words, the
        # temperatures' float32 bits and the keys' 32 bits as they are.
        packed = np.empty((3, len(rows)), dtype=np.int32)
        packed[0] = np.array([0.0 if r.params.is_greedy else r.params.temperature for r in rows],
                             dtype=np.float32).view(np.int32)
        packed[1] = np.array([row_key(r.seed, r.step) for r in rows], dtype=np.uint32).view(np.int32)
        packed[2] = [-1 if r.mask_row is None else r.mask_row for r in rows]
        staged = torch.empty(packed.shape, dtype=torch.int32, pin_memory=True)   # (see `to_device`)
        staged.numpy()[:] = packed
        columns = staged.to(self.device, non_blocking=True)
        return self._fused_race(logits, columns[0].view(torch.float32), columns[1], self.noise.token_hash, masks,
                                columns[2] if masks is not None else None)

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        batch, vocab = logits.shape
        output_counts = torch.zeros(batch, vocab, device=self.device)
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            if r.output_ids:
                out_ids = to_device(r.output_ids, torch.int64, self.device)
                output_counts[i].index_add_(0, out_ids, torch.ones(len(r.output_ids), device=self.device))
            if r.params.repetition_penalty != 1:
                seen[i, to_device(r.prompt_ids + r.output_ids, torch.int64, self.device)] = True
        rep = self._column([r.params.repetition_penalty for r in rows])
        presence = self._column([r.params.presence_penalty for r in rows])
        frequency = self._column([r.params.frequency_penalty for r in rows])
        penalised = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalised, logits)
        return logits - frequency * output_counts - presence * (output_counts > 0)

    def _sample_random(self, logits: torch.Tensor, rows: list[SampleRow]) -> torch.Tensor:
        temperature = self._column([r.params.temperature for r in rows])
        keys = to_device([row_key(r.seed, r.step) for r in rows], torch.int64, self.device)
        if logits.device.type == "cpu":
            return self._sample_random_on_host(logits, rows, temperature, keys)
        vocab = logits.shape[1]
        logits = logits / temperature
        if any(r.params.top_k > 0 or r.params.top_p < 1 for r in rows):
            sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
            k = self._column([min(r.params.top_k, vocab) or vocab for r in rows], dtype=torch.long)
            drop = torch.arange(vocab, device=self.device)[None, :] >= k
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            probs = sorted_logits.softmax(dim=-1)
            # Keep the smallest head whose mass reaches top_p (the first token always stays).
            mass_before = probs.cumsum(dim=-1) - probs
            drop = mass_before > self._column([r.params.top_p for r in rows])
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)
        if any(r.params.min_p > 0 for r in rows):
            probs = logits.softmax(dim=-1)
            floor = self._column([r.params.min_p for r in rows]) * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < floor, float("-inf"))
        # the whole vocabulary: no data-dependent shapes, so no host sync before the sample
        return self._argmax(logits - self.noise.exponential(keys).log())

    def _sample_random_on_host(self, logits: torch.Tensor, rows: list[SampleRow], temperature: torch.Tensor,
                               keys: torch.Tensor) -> torch.Tensor:
        """The race on the CPU, over each row's contenders alone: logit/T wins only if logit/T >= its row's
        best - MARGIN. Plain temperature races on the unscaled logits (no full-vocabulary copy); with top-k,
        top-p or min-p, what they keep is a head of the row's order, so only the contenders are sorted
        (`_kept_contenders`), not the whole vocabulary."""
        if not any(_filters(r) for r in rows):
            return self._race(logits, temperature, keys, logits.amax(dim=-1, keepdim=True) - RACE_MARGIN * temperature)
        scaled = logits / temperature
        return self._race_at(scaled, torch.ones_like(temperature), keys, *_kept_contenders(scaled, rows))

    def _race(self, logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor,
              floors: torch.Tensor) -> torch.Tensor:
        """argmax over each row's contenders (logits >= the row's floor, [B, 1]) of logit/T - log(E); the same
        winner as the whole-vocabulary race (ties, vanishingly rare, go to the smallest token id). On the CPU
        only (the host's logits)."""
        return self._race_at(logits, temperature, keys, *_at_least(logits, floors))

    def _race_at(self, logits: torch.Tensor, temperature: torch.Tensor, keys: torch.Tensor, row_idx: torch.Tensor,
                 token_idx: torch.Tensor) -> torch.Tensor:
        """The race over the given (row, token) contenders; a row without any gets the vocabulary size."""
        scores = logits[row_idx, token_idx] / temperature[row_idx, 0] \
            - self.noise.exponential_at(keys, row_idx, token_idx).log()
        batch = logits.shape[0]
        best = torch.full((batch,), float("-inf"), device=logits.device).scatter_reduce(0, row_idx, scores, "amax")
        winners = scores == best[row_idx]
        return torch.full((batch,), logits.shape[1], dtype=torch.long, device=logits.device).scatter_reduce(
            0, row_idx[winners], token_idx[winners], "amin")

    def _column(self, values: list, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return to_device(values, dtype, self.device)[:, None]


def _at_least(values: torch.Tensor, floors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the float32 CPU `values` >= their row's floor, row by row in increasing order, as
    `(values >= floors).nonzero(as_tuple=True)` gives them, by numpy's compare and flatnonzero row by row
    (a fifth of torch's broadcast compare and nonzero: docs/benchmarks.md, CPU sampling)."""
    v, f = values.contiguous().numpy(), floors.reshape(-1).numpy()
    return _index_pairs([np.flatnonzero(v[i] >= f[i]) for i in range(v.shape[0])])


def _index_pairs(columns: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's column ids (row i: `columns[i]`) as the (rows, columns) index tensors of `nonzero`."""
    rows = np.repeat(np.arange(len(columns)), [len(c) for c in columns])
    flat = np.concatenate(columns).astype(np.int64) if columns else np.zeros(0, np.int64)
    return torch.from_numpy(rows), torch.from_numpy(flat)


def _kept_contenders(scaled: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, columns) of the tokens that each row's top-k, top-p and min-p keep and that may win its race
    (logit/T >= the best - MARGIN), from the CPU's temperature-scaled float32 logits. What the filters keep
    is a head of the row in descending order (ties: smaller ids first), and so is the contenders' set: only
    the contenders are sorted. top-p's mass is over what top-k keeps (the whole row without top-k), in
    float64; min-p keeps a token whose probability is at least min_p times the best one's, i.e.
    exp(logit/T - best) >= min_p whatever the normalizer. NaNs drop nothing, as comparisons with them fail."""
    values = scaled.contiguous().numpy()
    vocab = values.shape[1]
    columns = []
    for i, row in enumerate(rows):
        v = values[i]
        best = v.max()
        ids = np.flatnonzero(v >= best - np.float32(RACE_MARGIN))
        top_k = min(row.params.top_k, vocab) or vocab
        if top_k < len(ids) or row.params.top_p < 1:   # a head in order: sort the contenders (min-p needs none)
            ids = ids[np.argsort(-v[ids], kind="stable")]
        head = v[ids].astype(np.float64) - float(best)
        keep = min(len(ids), top_k)
        if row.params.top_p < 1:
            if top_k == vocab:
                total = np.exp(v.astype(np.float64) - float(best)).sum()
            elif top_k <= len(ids):
                total = np.exp(head[:top_k]).sum()
            else:
                kth = np.partition(v, vocab - top_k)[vocab - top_k:]
                total = np.exp(kth.astype(np.float64) - float(best)).sum()
            probs = np.exp(head[:keep]) / total
            over = np.flatnonzero(np.cumsum(probs) - probs > row.params.top_p)
            keep = int(over[0]) if len(over) else keep
        ids = ids[:keep]
        if row.params.min_p > 0:   # (in order or not: a threshold on each token)
            ids = ids[~(np.exp(head[:keep]) < row.params.min_p)]
        columns.append(ids)
    return _index_pairs(columns)


def _filters(row: SampleRow) -> bool:
    """The row's sampling keeps only part of the distribution (top-k, top-p or min-p)."""
    return row.params.top_k > 0 or row.params.top_p < 1 or row.params.min_p > 0
