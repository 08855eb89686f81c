"""Write a random-weight Llama 3.x model folder in a real model's exact shape (1B, 3B, 8B), for benchmarks
that start `gllm serve --model DIR` on a machine without a model hub (the GPU variant of bench_frame).
Speed does not depend on weight values; the tokenizer is the real Llama 3 one.

    python tools/make_random_model.py --shape 1b --tokenizer .fixtures/tokenizer-llama3 --out /tmp/llama-1b
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import model_config, random_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b")
    parser.add_argument("--tokenizer", required=True, help="folder with the Llama 3 tokenizer.json")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    out = Path(args.out)
    if (out / "model.safetensors").exists():
        print(f"{out} exists")
        return
    cfg = model_config(args.shape)
    model = random_model(cfg, 4096)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to("cpu") for name, t in model.hf_state_dict().items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(args.tokenizer) / name, out / name)
    del model
    torch.cuda.empty_cache()
    print(f"wrote {out} ({sum(t.nbytes for t in tensors.values()) / 2**30:.2f} GiB)")


if __name__ == "__main__":
    main()
