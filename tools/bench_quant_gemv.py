"""Decode-sized matmuls over 4- to 8-bit weights on the GPU: gllm/ops/triton_quant_gemv.py against a bfloat16
F.linear (cuBLAS) of the same shape, measured the same way as tools/bench_gemv.py (CALLS calls in one CUDA graph,
weights rotated over enough copies that L2 never holds them).

Printed per shape (Llama-3.2-1B and Llama-3.1-8B projections) and row count: µs per call, the bytes read (codes,
scales, offsets) per second and as a share of a device-to-device copy, and the speed-up over bfloat16; with
`--dequant-dense` also the way more rows than `MAX_ROWS` go (dequantize the weight, then a bfloat16 matmul),
which is how the table times those row counts.
`--sweep` also times a few launch configs per shape and row count and prints the best.

    python3 tools/bench_quant_gemv.py [--rows 1,4] [--models 1b,8b] [--sweep] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gemv import CALLS, L2_FLUSH_BYTES, graph_time, shapes  # noqa: E402
from bench_gpu import copy_bandwidth  # noqa: E402

import gllm.model  # noqa: E402,F401  (gllm.ops cannot be the first gllm package imported: import cycle)
from gllm.ops import quant_layout as L  # noqa: E402
from gllm.ops import triton_quant_gemv as Q  # noqa: E402

FORMATS = {"int4 g32": lambda w: L.quantize(w, 4, 32, False), "int8 g32": lambda w: L.quantize(w, 8, 32, True),
           "q4_k": lambda w: L.quantize_k(w, "q4_k"), "q6_k": lambda w: L.quantize_k(w, "q6_k")}
SWEEP = [Q.QuantGemvConfig(b, bk, w, s) for b, bk, w, s in   # one row: (row quads, block_k, warps, stages)
         [(1, 2048, 2, 3), (1, 4096, 4, 2), (1, 2048, 4, 3), (2, 2048, 4, 3), (1, 1024, 2, 3), (2, 1024, 2, 3),
          (4, 1024, 4, 2), (1, 4096, 8, 2), (1, 512, 1, 4), (2, 512, 2, 4), (1, 1024, 1, 4), (2, 1024, 1, 4),
          (4, 512, 2, 4), (2, 2048, 2, 3), (4, 1024, 2, 3), (1, 2048, 1, 3)]]
ROWS_SWEEP = [Q.QuantGemvConfig(b, bk, w, s) for b, bk, w, s in   # several rows: (output rows, block_k, ...)
              [(64, 256, 4, 3), (32, 256, 4, 3), (64, 512, 4, 3), (128, 256, 8, 3), (32, 512, 4, 3),
               (16, 512, 4, 4), (64, 128, 4, 4), (128, 128, 4, 3)]]


def copies(w: L.QuantWeight) -> list[L.QuantWeight]:
    count = max(1, min(CALLS, -(-L2_FLUSH_BYTES // w.nbytes)))
    return [w] + [w._with(tuple(None if t is None else t.clone() for t in w._tensors()), w.out_features)
                  for _ in range(count - 1)]


def dense_time(dense: torch.Tensor, x: torch.Tensor) -> float:
    n, k = dense.shape
    ws = [dense] + [dense.clone() for _ in range(max(1, min(CALLS, -(-L2_FLUSH_BYTES // (n * k * 2)))) - 1)]
    return graph_time(lambda i: F.linear(x, ws[i % len(ws)]))


def quant_time(w: L.QuantWeight, x: torch.Tensor, config: Q.QuantGemvConfig | None = None) -> float:
    ws = copies(w)
    return graph_time(lambda i: Q.quant_gemv(x, ws[i % len(ws)], config))


def dequant_dense_time(w: L.QuantWeight, x: torch.Tensor) -> float:
    """The other way to a wide product: dequantize the whole weight, then a bfloat16 matmul."""
    ws = copies(w)
    return graph_time(lambda i: F.linear(x, Q.dequantize_dense(ws[i % len(ws)], x.dtype)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4")
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"of {', '.join(FORMATS)}")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-format", default="int4 g32")
    parser.add_argument("--dequant-dense", action="store_true", help="also time dequantizing the weight and a "
                        "bfloat16 matmul (what more than MAX_ROWS rows take)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    formats = {name: FORMATS[name] for name in args.formats.split(",")}
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    results: dict = {"copy_bandwidth": bandwidth, "shapes": [], "sweep": []}
    print(f"{'shape':<14}{'N x K':>14}{'M':>3} | {'bf16 µs':>8}{'%copy':>6} | " + " | ".join(
        f"{name + ' µs':>12}{'%copy':>6}{'x bf16':>7}{'err':>8}" for name in formats))
    for model, m in itertools.product(args.models.split(","), rows):
        for proj, n, k, _ in shapes(model):
            dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = dense_time(dense, x)
            line = f"{model + ' ' + proj:<14}{f'{n}x{k}':>14}{m:>3} | {t_bf16 * 1e6:>8.1f}" \
                   f"{100 * n * k * 2 / t_bf16 / bandwidth:>6.0f}"
            row = dict(model=model, proj=proj, n=n, k=k, m=m, bf16_s=t_bf16)
            for name, quantize in formats.items():
                w = quantize(dense)
                want = (x.float() @ L.dequantize(w).T)
                fused = m <= Q.MAX_ROWS    # more rows: the product as a model takes it, dequantize + matmul
                got = Q.quant_gemv(x, w) if fused else F.linear(x, Q.dequantize_dense(w, x.dtype))
                err = ((got.float() - want).abs().max() / want.abs().max()).item()
                t = quant_time(w, x) if fused else dequant_dense_time(w, x)
                line += f" | {t * 1e6:>12.1f}{100 * w.nbytes / t / bandwidth:>6.0f}{t_bf16 / t:>7.2f}{err:>8.1e}"
                row[name] = dict(seconds=t, bytes=w.nbytes, max_rel_err=err, fused=fused)
                if args.dequant_dense and fused:
                    t_dd = dequant_dense_time(w, x)
                    line += f" (dequant+bf16 {t_dd * 1e6:.1f} = {t_bf16 / t_dd:.2f}x)"
                    row[name]["dequant_dense_seconds"] = t_dd
            print(line, flush=True)
            results["shapes"].append(row)
    if args.sweep:
        for m in rows:
            configs = SWEEP if m == 1 else ROWS_SWEEP
            print(f"\nsweep, {m} row(s), {args.sweep_format}: µs per config ({'row quads' if m == 1 else 'output rows'}, "
                  "block_k, warps, stages)")
            for model in args.models.split(","):
                for proj, n, k, _ in shapes(model):
                    w = FORMATS[args.sweep_format](torch.randn(n, k, device="cuda") / k ** 0.5)
                    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                    timings = []
                    for config in configs:
                        try:
                            timings.append((quant_time(w, x, config), config))
                        except Exception as exc:   # a config the compiler refuses (registers, shared memory)
                            print(f"  {config}: {type(exc).__name__}")
                    best = min(timings, key=lambda tc: tc[0])
                    print(f"{model + ' ' + proj:<14} " + "  ".join(f"{tuple(c)}={t * 1e6:.1f}" for t, c in timings)
                          + f"  best {tuple(best[1])} ({100 * w.nbytes / best[0] / bandwidth:.0f}% copy)", flush=True)
                    results["sweep"].append(dict(model=model, proj=proj, n=n, k=k, m=m,
                                                 timings=[(t, list(c)) for t, c in timings]))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
