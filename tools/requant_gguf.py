"""Write a copy of a GGUF with its decoder projections (and optionally the embeddings) re-encoded in another type,
from the `gguf` package's dequantized values: for benchmarking gllm on every type it keeps quantized, on one
model. Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 are encoded by gguf; Q4_K / Q5_K / Q6_K by tools/kquants.py (plain
min-max, so a K-quant made here is a little less accurate than llama.cpp's; speed does not depend on it).
"Q4_K_M" is llama.cpp's mix: Q4_K, with attn_v and ffn_down at Q6_K. Rows that are not whole 256-weight
super-blocks take llama.cpp's fallbacks (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0).

    python tools/requant_gguf.py SRC.gguf OUT.gguf TYPE [--embeddings TYPE]

The result is a requantization of already quantized weights: use it for speed and bytes, not for quality.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kquants  # noqa: E402

_PROJECTIONS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def target_type(name: str, mix: str, embeddings: str | None) -> str | None:
    """The type `name` is written in, or None to copy it as it is."""
    if name == "token_embd.weight":
        return embeddings
    parts = name.split(".")
    if len(parts) != 4 or parts[2] not in _PROJECTIONS:
        return None
    if mix == "Q4_K_M":
        return "Q6_K" if parts[2] in ("attn_v", "ffn_down") else "Q4_K"
    return mix


# llama.cpp's own fallbacks for a K-quant whose rows are not whole 256-weight super-blocks (SmolLM2's 576)
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def encode(values: np.ndarray, type_name: str) -> np.ndarray:
    if type_name in kquants.TYPES:
        return kquants.encode(values, type_name)
    return gguf.quants.quantize(values, getattr(gguf.GGMLQuantizationType, type_name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("type", choices=("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "Q4_K_M"))
    parser.add_argument("--embeddings", default=None, help="re-encode token_embd too (default: copied)")
    args = parser.parse_args()

    reader = gguf.GGUFReader(args.src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(args.out, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue     # the container's own fields; the writer adds the architecture itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        kind = target_type(t.name, args.type, args.embeddings)
        if kind is None:
            data, qtype = np.asarray(t.data), t.tensor_type
        else:
            values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
            if shape[-1] % kquants.QK_K:
                kind = FALLBACK.get(kind, kind)
            data, qtype = encode(values, kind), getattr(gguf.GGMLQuantizationType, kind)
        # block data is uint8 rows, from which the writer derives the element shape
        writer.add_tensor(t.name, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    main()
