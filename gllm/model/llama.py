"""The Llama 3.x forward pass over a flat batch, reading and writing K/V through block tables."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from gllm.model.batch import ForwardBatch
from gllm.model.config import ModelConfig
from gllm.model.kernels import PLAIN_KERNELS, ModelKernels
from gllm.model.quantized import GpuQuantizedLinear, QuantizedEmbedding, QuantizedLinear
from gllm.model.rope import RotaryEmbedding
from gllm.ops import paged_attention, triton_fused, triton_gemv, write_kv


# The model's weights always come from a checkpoint (`load_weights` refuses one that misses any), so its layers
# skip torch's random initialisation: wasted work on a device, and on the meta device, where `build_model`
# constructs the model, `init.normal_` alone imports ~900 torch modules (76 MB held for the process's life).
class Linear(nn.Linear):
    def reset_parameters(self) -> None:
        pass


class Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, fused: bool = False):
        """norm(x); or, given `residual`, (norm(x + residual), x + residual). `fused`: the Triton kernel."""
        if fused:
            if residual is None:
                return triton_fused.rms_norm(x, self.weight, self.eps)
            return triton_fused.rms_norm(x, self.weight, self.eps, residual), residual   # residual updated in place
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the input dtype, as the reference does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # q, k and v projections fused into one matmul; the loader fills the three slices.
        self.qkv_proj = Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.attention_bias)
        self.o_proj = Linear(cfg.q_size, cfg.hidden_size, bias=cfg.attention_bias)
        self.scale = cfg.head_dim ** -0.5

    def forward(self, x: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding,
                k_cache: torch.Tensor, v_cache: torch.Tensor, kernels: ModelKernels = PLAIN_KERNELS) -> torch.Tensor:
        qkv = kernels.linear(self.qkv_proj, x)
        return kernels.linear(self.o_proj, self.attend(qkv, batch, rope, k_cache, v_cache, kernels.fused))

    def attend(self, qkv: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding,
               k_cache: torch.Tensor, v_cache: torch.Tensor, fused: bool = False,
               dependent_launch: bool = False) -> torch.Tensor:
        """From the fused q/k/v projection to the attention output [T, q_size] (before o_proj); with `fused`,
        `dependent_launch` launches the RoPE kernel as `triton_gemv.linear` does (decode steps only)."""
        cfg = self.cfg
        q, k, v = qkv.split([cfg.q_size, cfg.kv_size, cfg.kv_size], dim=-1)
        q = q.view(-1, cfg.num_attention_heads, cfg.head_dim)
        k = k.view(-1, cfg.num_key_value_heads, cfg.head_dim)
        v = v.view(-1, cfg.num_key_value_heads, cfg.head_dim)
        if fused:   # RoPE on q in place, rotated k and v straight into their cache slots
            triton_fused.rope_and_write_kv(q, k, v, rope.cos, rope.sin, batch.positions, batch.slot_mapping,
                                           k_cache, v_cache, dependent_launch)
        else:
            q, k = rope(batch.positions, q, k)
            write_kv(k_cache, v_cache, k, v, batch.slot_mapping)
        return paged_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, batch.attention,
                               self.scale).reshape(-1, cfg.q_size)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.intermediate = cfg.intermediate_size
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor, kernels: ModelKernels = PLAIN_KERNELS) -> torch.Tensor:
        gate_up = kernels.linear(self.gate_up_proj, x)
        if kernels.fused:
            return kernels.linear(self.down_proj, triton_fused.silu_and_mul(gate_up))
        gate, up = gate_up.split(self.intermediate, dim=-1)
        return kernels.linear(self.down_proj, F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: ForwardBatch, rope: RotaryEmbedding,
                k_cache: torch.Tensor, v_cache: torch.Tensor, kernels: ModelKernels = PLAIN_KERNELS
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Takes and returns the pair (this sublayer's output, the residual stream before adding it)."""
        fused = kernels.fused
        if residual is None:
            residual, x = x, self.input_layernorm(x, fused=fused)
        else:
            x, residual = self.input_layernorm(x, residual, fused=fused)
        x = self.self_attn(x, batch, rope, k_cache, v_cache, kernels)
        x, residual = self.post_attention_layernorm(x, residual, fused=fused)
        return self.mlp(x, kernels), residual

    def forward_streamed(self, h: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding,
                         k_cache: torch.Tensor, v_cache: torch.Tensor, dependent_launch: bool) -> torch.Tensor:
        """The same layer for a few rows (decode): four weight-streaming kernels with the norms folded in
        before, RoPE and the K/V cache writes after q/k/v, SiLU·mul after gate_up and the residual adds
        after o and down; `h` is the residual stream, updated in place."""
        attn, mlp, cfg = self.self_attn, self.mlp, self.self_attn.cfg
        if not isinstance(attn.qkv_proj, nn.Linear):
            return self._forward_quantized_row(h, batch, rope, k_cache, v_cache, dependent_launch)
        rope_kv = triton_gemv.RopeKV(rope.cos, rope.sin, batch.positions, batch.slot_mapping,
                                     k_cache.view(-1, *k_cache.shape[2:]), v_cache.view(-1, *v_cache.shape[2:]),
                                     cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
        q = triton_gemv.linear(h, attn.qkv_proj.weight, norm_weight=self.input_layernorm.weight,
                               eps=self.input_layernorm.eps, rope=rope_kv, dependent_launch=dependent_launch)
        q = q.view(-1, cfg.num_attention_heads, cfg.head_dim)
        out = paged_attention(q, k_cache, v_cache, batch.block_tables, batch.context_lens, batch.attention,
                              attn.scale).reshape(-1, cfg.q_size)
        triton_gemv.linear(out, attn.o_proj.weight, residual=h, dependent_launch=dependent_launch)
        act = triton_gemv.linear(h, mlp.gate_up_proj.weight, norm_weight=self.post_attention_layernorm.weight,
                                 eps=self.post_attention_layernorm.eps, silu_mul=True,
                                 dependent_launch=dependent_launch)
        return triton_gemv.linear(act, mlp.down_proj.weight, residual=h, dependent_launch=dependent_launch)

    def _forward_quantized_row(self, h: torch.Tensor, batch: ForwardBatch, rope: RotaryEmbedding,
                               k_cache: torch.Tensor, v_cache: torch.Tensor, dependent_launch: bool) -> torch.Tensor:
        """`forward_streamed` for one row through quantized projections (`GpuQuantizedLinear.row`): the norms
        and SiLU·mul done where each product's input is prepared, the residual adds by o and down; RoPE with
        the K/V writes stays a kernel of its own."""
        attn, mlp = self.self_attn, self.mlp
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        pdl = dependent_launch
        qkv = attn.qkv_proj.row(h, norm_weight=norm1.weight, eps=norm1.eps, dependent_launch=pdl)
        out = attn.attend(qkv, batch, rope, k_cache, v_cache, fused=True, dependent_launch=pdl)
        attn.o_proj.row(out, residual=h, dependent_launch=pdl)
        gate_up = mlp.gate_up_proj.row(h, norm_weight=norm2.weight, eps=norm2.eps, dependent_launch=pdl)
        return mlp.down_proj.row(gate_up, silu_mul=True, residual=h, dependent_launch=pdl)


# HF checkpoint names of the projections that live inside a fused parameter: (fused name, slice index).
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # Made by whoever materialises the model (`build_model`), for its max positions: the model is constructed
        # on the meta device, where the tables would carry no values (and building them imports ~900 modules).
        self.rope: RotaryEmbedding | None = None
        self.kernels = PLAIN_KERNELS   # set once at setup (`use_kernels`), by the runner's fast-path choice

    @torch.no_grad()  # not inference_mode: torch.compile cannot trace through inference tensors
    def forward(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Run one step; returns float32 logits [N, vocab] for `batch.logits_indices`."""
        kernels = self.kernels
        head, weight = self._head()
        if kernels.streamed_rows and batch.num_tokens <= kernels.streamed_rows:
            # Decode-sized: bound by reading the weights, which the streamed kernels read once per step.
            h = self._embed(batch)
            for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
                h = layer.forward_streamed(h, batch, self.rope, k_cache, v_cache, kernels.dependent_launch)
            rows = batch.logits_rows(h)
            if head is None:
                return triton_gemv.linear(rows, weight, norm_weight=self.norm.weight, eps=self.norm.eps,
                                          out_dtype=torch.float32, dependent_launch=kernels.dependent_launch)
            if rows.shape[0] == 1:   # the row kernel, the final norm folded into its input's launch
                return head.row(rows.contiguous(), norm_weight=self.norm.weight, eps=self.norm.eps,
                                out_dtype=torch.float32, dependent_launch=kernels.dependent_launch)
            return head(self.norm(rows)).float()
        x, residual = self._embed(batch), None
        last = len(self.layers) - 1
        for i, (layer, (k_cache, v_cache)) in enumerate(zip(self.layers, kv_caches)):
            x, residual = layer(x, residual, batch, self.rope, k_cache, v_cache, kernels)
            if batch.between_layers is not None:   # after the last layer too: a CPU's wide head costs a few
                batch.between_layers(i == last)
        x, _ = self.norm(batch.logits_rows(x), batch.logits_rows(residual), fused=kernels.fused)
        if head is not None and (weight is None or not kernels.float_head_rows or x.shape[0] < kernels.float_head_rows):
            return head(x).float()
        return kernels.product(x, weight).float()

    def _head(self) -> tuple[nn.Module | None, torch.Tensor | None]:
        """The head kept quantized (or None), and the head's float weight where the model holds one (an untied
        float head, or a float embedding table it is tied to)."""
        head = self.lm_head if isinstance(self.lm_head, (GpuQuantizedLinear, QuantizedLinear)) else None
        if isinstance(self.lm_head, nn.Linear):
            return head, self.lm_head.weight
        tied = self.lm_head is None or self.cfg.tie_word_embeddings
        return head, self.embed_tokens.weight if tied and isinstance(self.embed_tokens, nn.Embedding) else None

    @torch.no_grad()
    def hidden_states(self, batch: ForwardBatch, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """The final normalised hidden state of every token of the batch [T, hidden] (for embeddings): the
        layers as a prefill runs them, without the LM head."""
        x, residual = self._embed(batch), None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, batch, self.rope, k_cache, v_cache, self.kernels)
        x, _ = self.norm(x, residual, fused=self.kernels.fused)
        return x

    def _embed(self, batch: ForwardBatch) -> torch.Tensor:
        if isinstance(self.embed_tokens, QuantizedEmbedding):
            return self.embed_tokens.lookup(batch.input_ids, batch.token_source, self.kernels.dependent_launch)
        if batch.token_source is None:
            return self.embed_tokens(batch.input_ids)
        from gllm.ops.triton_embedding import embed_tokens
        return embed_tokens(self.embed_tokens.weight, batch.input_ids, *batch.token_source,
                            dependent_launch=self.kernels.dependent_launch)

    def use_kernels(self, kernels: ModelKernels) -> None:
        """Run the layers with `kernels` (see `gllm.runner.fast_path`, which decides them once)."""
        if kernels.streamed_rows and not self.supports_streamed_kernels:
            raise ValueError("the weight-streaming kernels take projections without biases, all float or all "
                             "quantized")
        if kernels.streamed_rows > 1 and self.quantized_projections:
            raise ValueError("quantized projections stream one row at a time")
        self.kernels = kernels

    @property
    def supports_streamed_kernels(self) -> bool:
        """Decode steps through the weight-streaming path (`forward_streamed`): projections without biases,
        all float or all quantized (a file mixing both runs the fused path, whose products take either)."""
        return not (self.cfg.attention_bias or self.cfg.mlp_bias) and len(self._projection_kinds()) == 1

    @property
    def quantized_projections(self) -> bool:
        """Every decoder projection is kept quantized for the GPU kernels: their streamed path takes one row."""
        return self._projection_kinds() == {"quantized"}

    def _projection_kinds(self) -> set[str]:
        return {"float" if isinstance(m, nn.Linear) else "quantized" for layer in self.layers
                for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                          layer.mlp.down_proj)}

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...)."""
        params = dict(self.named_parameters())
        cfg = self.cfg
        split_sizes = {"self_attn.qkv_proj": [cfg.q_size, cfg.kv_size, cfg.kv_size],
                       "mlp.gate_up_proj": [cfg.intermediate_size, cfg.intermediate_size]}
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and (self.lm_head is None or self.cfg.tie_word_embeddings):
                continue  # tied checkpoints sometimes carry a copy
            target, part = name, None
            for hf_part, (fused, index) in _FUSED.items():
                if f".{hf_part}." in name:
                    target, part = name.replace(hf_part, fused), index
                    break
            if target not in params:
                raise ValueError(f"unexpected tensor {hf_name!r} in checkpoint")
            param = params[target]
            if part is not None:
                sizes = split_sizes[target.split(".", 2)[2].rsplit(".", 1)[0]]
                param = param.narrow(0, sum(sizes[:part]), sizes[part])
                loaded.add(f"{target}#{part}")
            else:
                loaded.add(target)
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(f"tensor {hf_name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(param.shape)}")
            with torch.no_grad():
                if hasattr(tensor, "copy_to"):   # still on disk (a loader's FileTensor): streamed in
                    tensor.copy_to(param)
                else:
                    param.copy_(tensor)
        missing = [n for n in self._expected_names() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Parameters under their HF checkpoint names, fused projections split back (the inverse of
        `load_weights`)."""
        cfg = self.cfg
        out: dict[str, torch.Tensor] = {}
        for name, param in self.named_parameters():
            if ".qkv_proj." in name:
                parts = param.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), parts):
                    out["model." + name.replace("qkv_proj", proj)] = part
            elif ".gate_up_proj." in name:
                for proj, part in zip(("gate_proj", "up_proj"), param.split(cfg.intermediate_size)):
                    out["model." + name.replace("gate_up_proj", proj)] = part
            else:
                out[name if name.startswith("lm_head") else "model." + name] = param
        return {k: v.detach().contiguous() for k, v in out.items()}

    def _expected_names(self) -> list[str]:
        names = []
        for name, _ in self.named_parameters():
            fused = name.split(".", 2)[2].rsplit(".", 1)[0] if name.startswith("layers.") else ""
            if fused == "self_attn.qkv_proj":
                names += [f"{name}#{i}" for i in range(3)]
            elif fused == "mlp.gate_up_proj":
                names += [f"{name}#{i}" for i in range(2)]
            else:
                names.append(name)
        return names
