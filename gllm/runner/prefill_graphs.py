"""`CudaGraphPrefill`: prefill steps replayed from CUDA graphs captured for a ladder of token counts.

An eager prefill step of a small model costs the host a few milliseconds of kernel launches (about
ten per layer, Triton's the slowest to launch) whatever the prompt length: for a prompt whose prefix
is cached, that is most of the time to first token. A step in which every scheduled sequence computes
a chunk of more than one token is padded up to the next captured token count and replayed. The
attention plan lives in static buffers sized for the worst case (`max_tiles`); tiles a step does not
need point at an empty sequence. Padding tokens write their K/V into the scratch block; only the
rows that sample are turned into logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gllm.kv import KVCache, slots_array
from gllm.model import ForwardBatch, LlamaForCausalLM
from gllm.ops import PrefillKernelPlan
from gllm.ops.triton_prefill import BLOCK_M, PrefillPlan, max_tiles, prefill_partials, prefill_splits, tile_rows
from gllm.runner.cuda_graphs import capture_graphs
from gllm.runner.step_inputs import PackedLayout

DEFAULT_TOKEN_LADDER = (16, 32, 64, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
MAX_GRAPH_SEQS = 8          # prefill chunks per replayed step


@dataclass
class PrefillChunk:
    """One sequence's part of a prefill step: `token_ids` at positions start.., read through `block_ids`."""
    token_ids: list[int]
    start: int
    block_ids: list[int]
    samples: bool           # whether its last token's logits are wanted


class CudaGraphPrefill:
    def __init__(self, model: LlamaForCausalLM, kv_cache: KVCache, max_tokens: int, max_seqs: int,
                 max_blocks_per_seq: int, device: torch.device,
                 pool: tuple | None = None, ladder: tuple[int, ...] = DEFAULT_TOKEN_LADDER) -> None:
        self.model, self.kv_cache, self.device = model, kv_cache, device
        self.block_size = kv_cache.block_size
        self.scratch_slot = kv_cache.scratch_slot
        top = max_tokens    # larger steps run eagerly (GeneratorParams.prefill_graph_tokens)
        self.token_sizes = sorted({t for t in ladder if t < top} | {top})
        self.max_seqs = seqs = min(max_seqs, MAX_GRAPH_SEQS)
        self.max_context = max_blocks_per_seq * self.block_size
        self.max_tiles = max_tiles(top, seqs)
        i64, i32 = torch.int64, torch.int32
        # Static inputs in one byte buffer (one copy a step); sequence row `seqs` is the empty sequence that
        # padding tiles point at.
        self.layout = PackedLayout([
            ("input_ids", i64, (top,)), ("positions", i64, (top,)), ("slot_mapping", i64, (top,)),
            ("block_tables", i32, (seqs + 1, max_blocks_per_seq)), ("per_seq", i32, (3, seqs + 1)),
            ("tiles", i32, (2, self.max_tiles)), ("logits_indices", i64, (seqs,))], align=128)
        self._device_bytes = torch.zeros(self.layout.nbytes, dtype=torch.uint8, device=device)
        self.buffers = self.layout.views(self._device_bytes)
        self._staging_bytes = [torch.zeros(self.layout.nbytes, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self._staging = [self.layout.views(b) for b in self._staging_bytes]
        self._turn = 0
        self.num_replays = 0
        self.plans: dict[int, PrefillPlan] = {}
        self._capture_all(pool)

    def _batch(self, tokens: int) -> ForwardBatch:
        buf = self.buffers
        cfg, num_tiles = self.model.cfg, self.max_tiles_for(tokens)
        # Split keys as for the fewest tiles this size holds, a single chunk over the longest context.
        splits = prefill_splits(-(-tokens // BLOCK_M), cfg.num_attention_heads, self.max_context, self.device)
        # Kept for the graph's lifetime: the graph writes its partial-softmax buffers.
        self.plans[tokens] = plan = PrefillPlan(num_tiles, buf["tiles"], buf["per_seq"], splits, prefill_partials(
            num_tiles, cfg.num_attention_heads, cfg.head_dim, splits, self.device))
        return ForwardBatch(
            input_ids=buf["input_ids"][:tokens], positions=buf["positions"][:tokens],
            slot_mapping=buf["slot_mapping"][:tokens], context_lens=buf["per_seq"][2],
            block_tables=buf["block_tables"], logits_indices=buf["logits_indices"],
            attention=PrefillKernelPlan(plan))

    def max_tiles_for(self, tokens: int) -> int:
        return min(self.max_tiles, max_tiles(tokens, self.max_seqs))

    def _capture_all(self, pool: tuple | None) -> None:
        self._clear(self._staging[0], 0, self.token_sizes[-1], 0)
        self._upload(0)
        torch.cuda.synchronize(self.device)
        self.graphs, self.outputs, self.pool = capture_graphs(self.token_sizes, self._step, self.device, pool)

    def _step(self, tokens: int) -> Callable[[], torch.Tensor]:
        batch = self._batch(tokens)
        return lambda: self.model(batch, self.kv_cache.layers)

    def padded_size(self, chunks: list[PrefillChunk]) -> int | None:
        """The captured token count this step replays at, or None when it must run eagerly."""
        if not chunks or len(chunks) > self.max_seqs or any(len(c.token_ids) < 2 for c in chunks):
            return None
        total = sum(len(c.token_ids) for c in chunks)
        for t in self.token_sizes:
            if t >= total:
                return t
        return None

    def run(self, chunks: list[PrefillChunk]) -> torch.Tensor:
        """Compute the chunks (see `padded_size`); float32 logits for each chunk that samples, in order."""
        tokens = self.padded_size(chunks)
        assert tokens is not None, "step does not fit a captured prefill graph"
        turn, self._turn = self._turn, self._turn ^ 1
        host = self._staging[turn]
        bs = self.block_size
        ids, pos, slots = (host[k].numpy() for k in ("input_ids", "positions", "slot_mapping"))
        tables, per_seq, logits_rows = (host[k].numpy() for k in ("block_tables", "per_seq", "logits_indices"))
        at, samplers, chunk_lens = 0, 0, []
        for i, c in enumerate(chunks):
            n = len(c.token_ids)
            blocks = np.asarray(c.block_ids, dtype=np.int64)
            p = np.arange(c.start, c.start + n)
            ids[at:at + n] = c.token_ids
            pos[at:at + n] = p
            slots[at:at + n] = slots_array(blocks, p, bs)
            tables[i, :len(blocks)] = blocks
            per_seq[:, i] = (at, n, c.start + n)
            if c.samples:
                logits_rows[samplers] = at + n - 1
                samplers += 1
            chunk_lens.append((i, n))
            at += n
        tile_seq, tile_row = tile_rows(chunk_lens)
        host["tiles"].numpy()[0, :len(tile_seq)] = tile_seq
        host["tiles"].numpy()[1, :len(tile_row)] = tile_row
        self._clear(host, at, tokens, len(chunks), len(tile_seq), samplers)
        self._upload(turn)
        self.graphs[tokens].replay()
        self.num_replays += 1
        return self.outputs[tokens][:samplers]

    def _clear(self, host: dict[str, torch.Tensor], used_tokens: int, tokens: int, used_seqs: int,
               used_tiles: int = 0, used_logits: int = 0) -> None:
        """Point everything past the step's real rows at nothing: padding tokens write the scratch block,
        padding tiles and sequences are empty."""
        host["input_ids"][used_tokens:tokens] = 0
        host["positions"][used_tokens:tokens] = 0
        host["slot_mapping"][used_tokens:tokens] = self.scratch_slot
        host["per_seq"][:, used_seqs:] = 0
        host["tiles"][0, used_tiles:] = self.max_seqs
        host["tiles"][1, used_tiles:] = 0
        host["logits_indices"][used_logits:] = 0

    def _upload(self, turn: int) -> None:
        """One asynchronous copy of a staging buffer's bytes to the graphs' static inputs."""
        self._device_bytes.copy_(self._staging_bytes[turn], non_blocking=True)
