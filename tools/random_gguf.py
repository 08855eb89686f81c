"""Write a Llama GGUF with random weights in a chosen shape and type mix, the tokenizer (and chat template) taken
from another GGUF: for timing formats whose rows must be whole 256-weight super-blocks (the K-quants), which
the default model's 576-wide rows are not. Speed does not depend on the weights' values; the text it writes
is noise.

    python tools/random_gguf.py OUT.gguf TYPE [--tokenizer-from SRC.gguf] [--hidden 1024] [--ffn 2816]
                                [--layers 16] [--heads 16] [--kv-heads 4]

TYPE is a projection type (Q4_0 ... Q8_0, Q4_K, Q5_K, Q6_K, F16) or Q4_K_M (llama.cpp's mix: Q4_K, with
attn_v and ffn_down at Q6_K). The embeddings are written as Q8_0, tied to the output head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kquants  # noqa: E402
from requant_gguf import encode  # noqa: E402

_TOKENIZER_KEYS = ("tokenizer.", "general.name")


def projection_type(part: str, mix: str) -> str:
    if mix == "Q4_K_M":
        return "Q6_K" if part in ("attn_v", "ffn_down") else "Q4_K"
    return mix


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("type")
    parser.add_argument("--tokenizer-from", default=None, help="default: the default model's GGUF")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tokenizer_from is None:
        from gllm.engine.catalog import DEFAULT_MODEL, fetch_known_model
        args.tokenizer_from = str(fetch_known_model(DEFAULT_MODEL))

    source = gguf.GGUFReader(args.tokenizer_from)
    vocab = len(source.fields["tokenizer.ggml.tokens"].contents())
    w = gguf.GGUFWriter(args.out, "llama")
    for field in source.fields.values():
        if field.name.startswith(_TOKENIZER_KEYS):
            vtype = field.types[0]
            sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    h, head_dim = args.hidden, args.hidden // args.heads
    w.add_block_count(args.layers)
    w.add_context_length(4096)
    w.add_embedding_length(h)
    w.add_feed_forward_length(args.ffn)
    w.add_head_count(args.heads)
    w.add_head_count_kv(args.kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)

    rng = np.random.default_rng(args.seed)

    def add(name: str, shape: tuple[int, ...], type_name: str) -> None:
        values = (rng.standard_normal(shape, dtype=np.float32) * 0.02)
        if type_name == "F32":
            data = 1 + values
        elif type_name == "F16":
            data = values.astype(np.float16)
        else:
            data = encode(values, type_name)
        q = getattr(gguf.GGMLQuantizationType, type_name)
        w.add_tensor(f"{name}.weight", data, raw_dtype=q if data.dtype == np.uint8 else None)

    kv = head_dim * args.kv_heads
    shapes = {"attn_q": (h, h), "attn_k": (kv, h), "attn_v": (kv, h), "attn_output": (h, h),
              "ffn_gate": (args.ffn, h), "ffn_up": (args.ffn, h), "ffn_down": (h, args.ffn)}
    add("token_embd", (vocab, h), "Q8_0")
    for i in range(args.layers):
        add(f"blk.{i}.attn_norm", (h,), "F32")
        add(f"blk.{i}.ffn_norm", (h,), "F32")
        for part, shape in shapes.items():
            kind = projection_type(part, args.type)
            if kind in kquants.TYPES and shape[1] % kquants.QK_K:
                raise SystemExit(f"{part}: rows of {shape[1]} are not whole 256-weight super-blocks")
            add(f"blk.{i}.{part}", shape, kind)
    add("output_norm", (h,), "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


if __name__ == "__main__":
    main()
