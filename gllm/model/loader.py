"""Load a Llama 3.x model from a HF-format folder (config.json + single or sharded safetensors)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import safe_open

from gllm.model.config import ModelConfig, parse_dtype
from gllm.model.llama import LlamaForCausalLM
from gllm.model.rope import RotaryEmbedding

# Seam for weight-only quantization (a later issue): sees each HF-named tensor before it lands.
WeightTransform = Callable[[str, torch.Tensor], torch.Tensor]


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({folder / f for f in weight_map.values()})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    for f in files:
        if not f.exists():
            raise FileNotFoundError(f"shard {f.name} named in model.safetensors.index.json is missing from {folder}")
    return files


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def with_progress(items: Iterator, total: int, label: str, show: bool) -> Iterator:
    """A tqdm bar on stderr over a tensor stream (nothing when `show` is false, or when stderr is not a
    terminal: a bar redrawn with carriage returns runs into the next line of a captured log)."""
    if not show or not sys.stderr.isatty():
        return items
    from tqdm import tqdm
    return iter(tqdm(items, total=total, desc=label, unit="tensor", leave=False))


def load_hf_folder(folder: str | Path, *, dtype: str | torch.dtype, device: str | torch.device,
                   max_positions: int, weight_transform: WeightTransform | None = None,
                   progress: bool = False) -> tuple[LlamaForCausalLM, ModelConfig]:
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{folder} has no config.json (expected a HF-format model folder)")
    cfg = ModelConfig.from_json(config_path)
    gen_cfg = folder / "generation_config.json"
    if gen_cfg.exists():
        eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if eos is not None:
            extra = tuple(eos) if isinstance(eos, list) else (int(eos),)
            cfg = _with_eos(cfg, extra)
    files = safetensors_files(folder)
    total = 0
    if progress:
        for path in files:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                total += len(list(f.keys()))
    weights = with_progress(iter_safetensors(files), total, "loading weights", progress)
    if weight_transform is not None:
        weights = ((name, weight_transform(name, t)) for name, t in weights)
    return build_model(cfg, weights, dtype=dtype, device=device, max_positions=max_positions), cfg


def build_model(cfg: ModelConfig, weights: Iterator[tuple[str, torch.Tensor]], *, dtype: str | torch.dtype,
                device: str | torch.device, max_positions: int) -> LlamaForCausalLM:
    """Allocate the model directly on `device` in `dtype` and stream the weights into it."""
    torch_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, max_positions)
    model = model.to_empty(device=device).to(torch_dtype)
    # Meta tensors carry no values: rebuild the cos/sin tables, kept in float32 whatever the dtype.
    model.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions).to(device)
    model.load_weights(weights)
    return model.eval().requires_grad_(False)


def _with_eos(cfg: ModelConfig, extra: tuple[int, ...]) -> ModelConfig:
    merged = tuple(dict.fromkeys(cfg.eos_token_ids + extra))
    return replace(cfg, eos_token_ids=merged)

