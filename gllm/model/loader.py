"""Load a Llama 3.x model from a HF-format folder (config.json + single or sharded safetensors)."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

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


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def safetensors_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, the header's tensor entries) of a .safetensors file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return 8 + size, header


@dataclass(frozen=True)
class FileTensor:
    """A tensor still in its .safetensors file. `copy_to` streams it into a parameter in chunks with plain file
    reads, so a load holds no second copy of the weights: the safetensors library memory-maps the file, and
    every page it reads stays resident (counted in RSS) until the file is closed, which doubled the peak
    memory of a load (more when the parameters are narrower than the file's float32)."""
    path: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    CHUNK_BYTES = 8 << 20

    def load(self) -> torch.Tensor:
        out = torch.empty(self.shape, dtype=self.dtype)
        with open(self.path, "rb") as f:
            self._read(f, self.offset, out)
        return out

    def copy_to(self, out: torch.Tensor) -> None:
        if len(self.shape) < 2 or self.nbytes <= self.CHUNK_BYTES:
            out.copy_(self.load())
            return
        row_bytes = self.nbytes // self.shape[0]
        rows = max(1, self.CHUNK_BYTES // row_bytes)
        buffer = torch.empty((rows, *self.shape[1:]), dtype=self.dtype)
        with open(self.path, "rb") as f:
            for start in range(0, self.shape[0], rows):
                part = buffer[: min(rows, self.shape[0] - start)]
                self._read(f, self.offset + start * row_bytes, part)
                out[start:start + len(part)].copy_(part)

    def _read(self, f, offset: int, out: torch.Tensor) -> None:
        raw = out.reshape(-1).view(torch.uint8).numpy()
        f.seek(offset)
        if f.readinto(raw) != raw.nbytes:
            raise ValueError(f"{self.path.name}: a tensor is truncated")


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, FileTensor]]:
    for path in files:
        base, header = safetensors_header(path)
        for name, info in header.items():
            start, end = info["data_offsets"]
            tensor = FileTensor(path, base + start, end - start, tuple(info["shape"]),
                                _SAFETENSORS_DTYPES[info["dtype"]])
            if tensor.nbytes != math.prod(tensor.shape) * torch.empty((), dtype=tensor.dtype).element_size():
                raise ValueError(f"{path.name}: tensor {name!r} has {tensor.nbytes} bytes for shape {tensor.shape}")
            yield name, tensor


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
        total = sum(len(safetensors_header(path)[1]) for path in files)
    weights = with_progress(iter_safetensors(files), total, "loading weights", progress)
    if weight_transform is not None:
        weights = ((name, weight_transform(name, t.load())) for name, t in weights)
    return build_model(cfg, weights, dtype=dtype, device=device, max_positions=max_positions), cfg


def build_model(cfg: ModelConfig, weights: Iterator[tuple[str, torch.Tensor]], *, dtype: str | torch.dtype,
                device: str | torch.device, max_positions: int,
                prepare: Callable[[LlamaForCausalLM], None] | None = None) -> LlamaForCausalLM:
    """Allocate the model directly on `device` in `dtype` and stream the weights into it. `prepare` may swap
    modules (quantized projections, built from their own data) before anything is allocated: the weights then
    need not hold the swapped modules' parameters."""
    torch_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    if prepare is not None:
        prepare(model)
    model = _materialize(model, torch.device(device), torch_dtype).to(torch_dtype)
    # The cos/sin tables, kept in float32 whatever the dtype.
    model.rope = RotaryEmbedding(cfg.rope, cfg.head_dim, max_positions).to(device)
    model.load_weights(weights)
    return model.eval().requires_grad_(False)


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """`model.to_empty(device)` with floating tensors made in `dtype`: what is still on the meta device gets
    uninitialised memory (the weights fill it). Not `to_empty` itself, which goes through torch's Python
    reference ops and imports ~900 modules (sympy among them, ~75 MB for the process's life)."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                empty = torch.empty(param.shape, device=device,
                                    dtype=dtype if param.is_floating_point() else param.dtype)
                setattr(module, name, nn.Parameter(empty, requires_grad=param.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            if buffer.is_meta:
                setattr(module, name, torch.empty(buffer.shape, device=device,
                                                  dtype=dtype if buffer.is_floating_point() else buffer.dtype))
    return model


def _with_eos(cfg: ModelConfig, extra: tuple[int, ...]) -> ModelConfig:
    merged = tuple(dict.fromkeys(cfg.eos_token_ids + extra))
    return replace(cfg, eos_token_ids=merged)

