"""Decode-sized matmuls on the GPU: F.linear (cuBLAS) against gllm/ops/triton_gemv.py.

For the Llama-3.2-1B / 3B / Llama-3.1-8B projection shapes at a few rows, each version runs as
CALLS back-to-back calls captured in one CUDA graph (median over replays, CUDA events); weights
rotate over enough copies that L2 never holds them, as in a real forward pass. Printed: µs per
call, weight GB/s, and that as a share of a device-to-device copy measured in the same run. Then
a whole 1B decode step's matmul chain (16 layers + lm_head, attention left out), unfused against
fused. `--sweep` instead times candidate launch configs per shape, to tune `default_config`.

    python3 tools/bench_gemv.py [--rows 1,4,16] [--sweep] [--out results.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gpu import copy_bandwidth  # noqa: E402

import gllm.model  # noqa: E402,F401  (gllm.ops cannot be the first gllm package imported: import cycle)
from gllm.ops import triton_fused, triton_gemv  # noqa: E402
from gllm.ops.triton_gemv import GemvConfig  # noqa: E402

# name -> (hidden, intermediate, q + 2 kv columns, layers)
MODELS = {"1b": (2048, 8192, 3072, 16), "3b": (3072, 8192, 5120, 28), "8b": (4096, 14336, 6144, 32)}
VOCAB = 128256
CALLS = 50
REPLAYS = 20
L2_FLUSH_BYTES = 256 * 1024**2   # weight copies per shape add up to at least this (H100 L2: 50 MB)
DTYPE = torch.bfloat16
EPS = 1e-5


def shapes(model: str) -> list[tuple[str, int, int, bool]]:
    """(projection, N, K, silu_mul) for one model."""
    hidden, inter, qkv, _ = MODELS[model]
    return [("qkv", qkv, hidden, False), ("o", hidden, hidden, False), ("gate_up", 2 * inter, hidden, True),
            ("down", hidden, inter, False), ("lm_head", VOCAB, hidden, False)]


def graph_time(step: Callable[[int], object], calls: int = CALLS, replays: int = REPLAYS) -> float:
    """Seconds per call of step(0..calls-1), captured back to back in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):   # compile, autotune cuBLAS and allocate before capture
        for i in range(min(calls, 3)):
            step(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            step(i)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000 / calls)
    del graph
    return statistics.median(times)


def weight_copies(n: int, k: int) -> list[torch.Tensor]:
    count = max(1, min(CALLS, -(-L2_FLUSH_BYTES // (n * k * 2))))
    first = torch.randn(n, k, device="cuda", dtype=DTYPE) / k ** 0.5
    return [first] + [first.clone() for _ in range(count - 1)]


def max_err(config: GemvConfig | None, x: torch.Tensor, w: torch.Tensor, silu: bool) -> float:
    """Largest |triton - unfused| over the output, relative to the output's largest magnitude."""
    ref = F.linear(x, w)
    if silu:
        ref = triton_fused.silu_and_mul(ref)
    got = triton_gemv.linear(x, w, silu_mul=silu, config=config)
    return ((got.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def bench_shape(n: int, k: int, m: int, silu: bool, config: GemvConfig | None) -> tuple[float, float, float]:
    """(F.linear s/call, triton s/call, relative max error) for one shape; F.linear includes silu_mul
    for gate_up so that both sides produce the same output."""
    ws = weight_copies(n, k)
    x = torch.randn(m, k, device="cuda", dtype=DTYPE)
    err = max_err(config, x, ws[0], silu)

    def ref_step(i: int):
        y = F.linear(x, ws[i % len(ws)])
        return triton_fused.silu_and_mul(y) if silu else y

    t_ref = graph_time(ref_step)
    t_tri = graph_time(lambda i: triton_gemv.linear(x, ws[i % len(ws)], silu_mul=silu, config=config))
    return t_ref, t_tri, err


def run_shapes(rows: list[int], bandwidth: float, results: dict) -> None:
    print(f"\n{'shape':<14}{'N x K':>14}{'M':>4} | {'F.linear µs':>11}{'GB/s':>7}{'%copy':>6} | "
          f"{'triton µs':>9}{'GB/s':>7}{'%copy':>6} | {'speedup':>7}{'max err':>9}")
    for model, m in itertools.product(MODELS, rows):
        for name, n, k, silu in shapes(model):
            t_ref, t_tri, err = bench_shape(n, k, m, silu, None)
            gb = n * k * 2 / 1e9
            print(f"{model + ' ' + name:<14}{f'{n}x{k}':>14}{m:>4} | {t_ref * 1e6:>11.1f}{gb / t_ref:>7.0f}"
                  f"{100 * gb * 1e9 / t_ref / bandwidth:>6.0f} | {t_tri * 1e6:>9.1f}{gb / t_tri:>7.0f}"
                  f"{100 * gb * 1e9 / t_tri / bandwidth:>6.0f} | {t_ref / t_tri:>7.2f}{err:>9.1e}", flush=True)
            results["shapes"].append(dict(model=model, proj=name, n=n, k=k, m=m, flinear_s=t_ref, triton_s=t_tri,
                                          max_rel_err=err))


def run_chain(model: str, m: int, bandwidth: float, results: dict, variants: list | None = None) -> None:
    """One decode step's matmuls, norms and residual adds (no attention: o_proj reads the q slice)."""
    hidden, inter, qkv_n, layers = MODELS[model]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, device="cuda", generator=gen) * scale).to(DTYPE)

    per_layer = [dict(qkv=rand(qkv_n, hidden, scale=hidden ** -0.5), o=rand(hidden, hidden, scale=hidden ** -0.5),
                      gu=rand(2 * inter, hidden, scale=hidden ** -0.5), down=rand(hidden, inter, scale=inter ** -0.5),
                      n1=1 + 0.1 * rand(hidden), n2=1 + 0.1 * rand(hidden)) for _ in range(layers)]
    lm_head, final_norm = rand(VOCAB, hidden, scale=hidden ** -0.5), 1 + 0.1 * rand(hidden)
    start = rand(m, hidden)
    residual = torch.empty_like(start)
    weight_bytes = sum(t.numel() * 2 for lw in per_layer for t in lw.values()) + lm_head.numel() * 2

    def unfused() -> torch.Tensor:   # today's fused-kernel path: add+norm kernel, cuBLAS, silu_mul kernel
        x = start
        res = residual
        res.zero_()
        for lw in per_layer:
            h = triton_fused.rms_norm(x, lw["n1"], EPS, res)
            x = F.linear(F.linear(h, lw["qkv"])[:, :hidden], lw["o"])
            h = triton_fused.rms_norm(x, lw["n2"], EPS, res)
            x = F.linear(triton_fused.silu_and_mul(F.linear(h, lw["gu"])), lw["down"])
        return F.linear(triton_fused.rms_norm(x, final_norm, EPS, res), lm_head).float()

    def fused(pdl: bool = False, configs: dict | None = None) -> torch.Tensor:
        """`configs`: launch shapes by projection name (default_config for the others)."""
        cfg = dict(configs or {})
        kw = dict(dependent_launch=pdl)
        residual.copy_(start)
        for lw in per_layer:
            qkv = triton_gemv.linear(residual, lw["qkv"], norm_weight=lw["n1"], eps=EPS, config=cfg.get("qkv"), **kw)
            triton_gemv.linear(qkv[:, :hidden], lw["o"], residual=residual, config=cfg.get("o"), **kw)
            h = triton_gemv.linear(residual, lw["gu"], norm_weight=lw["n2"], eps=EPS, silu_mul=True,
                                   config=cfg.get("gate_up"), **kw)
            triton_gemv.linear(h, lw["down"], residual=residual, config=cfg.get("down"), **kw)
        return triton_gemv.linear(residual, lm_head, norm_weight=final_norm, eps=EPS, out_dtype=torch.float32,
                                  config=cfg.get("lm_head"), **kw)

    if variants:   # launch-shape experiments: each variant's chain time, nothing else
        for label, pdl, configs in variants:
            t = graph_time(lambda i: fused(pdl, configs), calls=1, replays=20)
            print(f"  {label:40s} {t * 1e3:.3f} ms  ({weight_bytes / bandwidth / t:.0%} of floor speed)", flush=True)
            results["chain"].append(dict(model=model, m=m, variant=label, fused_s=t))
        return

    def rms(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight.float()

    def reference() -> torch.Tensor:   # the same chain in float32, nothing rounded on the way
        res = start.float()
        for lw in per_layer:
            res = res + F.linear(F.linear(rms(res, lw["n1"]), lw["qkv"].float())[:, :hidden], lw["o"].float())
            gate, up = F.linear(rms(res, lw["n2"]), lw["gu"].float()).chunk(2, dim=-1)
            res = res + F.linear(F.silu(gate) * up, lw["down"].float())
        return F.linear(rms(res, final_norm), lm_head.float())

    ref = reference()
    a, b = unfused(), fused()
    err_a, err_b = (((t - ref).norm() / ref.norm()).item() for t in (a, b))
    t_unfused = graph_time(lambda i: unfused(), calls=1, replays=20)
    t_fused = graph_time(lambda i: fused(), calls=1, replays=20)
    floor = weight_bytes / bandwidth   # reading the weights once at the copy's byte rate
    print(f"\n{model} decode matmul chain, M={m}: {layers} layers + lm_head, {weight_bytes / 1e9:.2f} GB of weights, "
          f"floor at copy bandwidth {floor * 1e3:.3f} ms")
    print(f"  unfused (rms_norm + F.linear + silu_and_mul): {t_unfused * 1e3:.3f} ms "
          f"({floor / t_unfused:.0%} of floor speed); logits vs a float32 chain: rel err {err_a:.1e}")
    print(f"  fused   (triton_gemv only)                  : {t_fused * 1e3:.3f} ms "
          f"({floor / t_fused:.0%} of floor speed); logits vs a float32 chain: rel err {err_b:.1e}; "
          f"{t_unfused / t_fused:.2f}x faster")
    results["chain"].append(dict(model=model, m=m, unfused_s=t_unfused, fused_s=t_fused, floor_s=floor,
                                 unfused_rel_err=err_a, fused_rel_err=err_b))


def sweep_candidates(m: int) -> list[GemvConfig]:
    """Configs worth timing for m rows: no thread left without a 16-byte load, no register blow-up.
    (On an H100, num_stages made no difference to the FMA kernel, so only 1 is tried there.)"""
    out = []
    if m <= 4:
        for bn, bk, warps in itertools.product([1, 2, 4, 8, 16], [256, 512, 1024, 2048], [4, 8]):
            if bn * bk >= 8 * 32 * warps and m * bn * bk <= 128 * 32 * warps:
                out.append(GemvConfig(bn, bk, warps, 1))
    if m >= 2:
        for bn, bk, warps, stages in itertools.product([16, 32], [128, 256, 512], [4, 8], [2, 3, 4, 6]):
            if stages * (16 + bn) * bk * 2 <= 160 * 1024 and bn * bk >= 8 * 32 * warps:
                out.append(GemvConfig(bn, bk, warps, stages, dot=True))
    return out


def fused_kwargs(proj: str, m: int, n: int, k: int) -> dict:
    """The epilogue and prologue each projection gets in a fused decode step."""
    if proj.endswith(("o", "down")):
        return dict(residual=torch.randn(m, n, device="cuda", dtype=DTYPE))
    norm = dict(norm_weight=(1 + 0.1 * torch.randn(k, device="cuda")).to(DTYPE), eps=EPS)
    if proj.endswith("gate_up"):
        return dict(norm, silu_mul=True)
    if proj.endswith("lm_head"):
        return dict(norm, out_dtype=torch.float32)
    return norm


def unfused_chain(x: torch.Tensor, w: torch.Tensor, kw: dict) -> torch.Tensor:
    """What `triton_gemv.linear(x, w, **kw)` replaces, with the existing kernels."""
    if "norm_weight" in kw:
        x = triton_fused.rms_norm(x, kw["norm_weight"], kw["eps"])
    y = F.linear(x, w)
    if kw.get("silu_mul"):
        y = triton_fused.silu_and_mul(y)
    if "residual" in kw:
        y = y + kw["residual"]
    return y.to(kw.get("out_dtype", y.dtype))


def run_sweep(rows: list[int], bandwidth: float, results: dict, budget_s: float) -> None:
    """Time every candidate config on the 1B projections (with the prologue and epilogue each gets in
    the fused chain) and the 8B down projection; print the best few."""
    began = time.monotonic()
    todo = [s for s in shapes("1b")] + [("8b down", 4096, 14336, False)]
    for m in rows:
        for name, n, k, silu in todo:
            ws = weight_copies(n, k)
            x = torch.randn(m, k, device="cuda", dtype=DTYPE)
            kw = fused_kwargs(name, m, n, k)
            ref = unfused_chain(x, ws[0], kw).float()
            gb = n * k * 2 / 1e9
            t_ref = graph_time(lambda i: unfused_chain(x, ws[i % len(ws)], kw), replays=10)
            timed = []
            default = triton_gemv.default_config(m, n // 2 if silu else n, k, silu, norm="norm_weight" in kw,
                                                 smem_bytes=triton_gemv.shared_memory_bytes(x.device))
            pristine = kw["residual"].clone() if "residual" in kw else None   # timing adds into kw's
            for cfg in [default] + [c for c in sweep_candidates(m) if c != default]:
                if time.monotonic() - began > budget_s:
                    break
                try:
                    once = dict(kw, residual=pristine.clone()) if pristine is not None else kw
                    got = triton_gemv.linear(x, ws[0], config=cfg, **once).float()
                    err = ((got - ref).abs().max() / ref.abs().max()).item()
                    t = graph_time(lambda i: triton_gemv.linear(x, ws[i % len(ws)], config=cfg, **kw), replays=10)
                except Exception as exc:   # noqa: BLE001 - a config the compiler rejects is skipped
                    print(f"  {cfg}: {type(exc).__name__}: {str(exc)[:100]}")
                    continue
                timed.append((t, cfg, err))
                results["sweep"].append(dict(proj=name, n=n, k=k, m=m, config=list(cfg), s=t, err=err))
            timed.sort(key=lambda r: r[0])
            default_time = next((t for t, c, _ in timed if c == default), float("nan"))
            print(f"{name:<10}{n:>7}x{k:<6}M={m:<3} unfused {t_ref * 1e6:7.1f} µs "
                  f"({gb * 1e9 / t_ref / bandwidth:4.0%})  default {default_time * 1e6:7.1f} µs", flush=True)
            for t, cfg, err in timed[:4]:
                print(f"    {t * 1e6:7.1f} µs ({gb * 1e9 / t / bandwidth:4.0%}) err {err:.0e}  {tuple(cfg)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1,4,16", help="comma-separated row counts M (<= 16)")
    parser.add_argument("--sweep", action="store_true", help="time candidate configs instead")
    parser.add_argument("--sweep-budget", type=float, default=480.0, help="seconds the sweep may take")
    parser.add_argument("--chain-variants", action="store_true",
                        help="time the 1B chain with and without dependent launch, under a few launch shapes")
    parser.add_argument("--out", help="write all numbers here as JSON")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)")
    results: dict = dict(device=torch.cuda.get_device_name(), copy_bandwidth=bandwidth, shapes=[], chain=[], sweep=[])
    if args.sweep:
        run_sweep(rows, bandwidth, results, args.sweep_budget)
    elif args.chain_variants:
        pdl = torch.cuda.get_device_capability()[0] >= 9
        G = GemvConfig
        variants = [("default", False, None), ("default + PDL", pdl, None)]
        for label, configs in [
                ("K=2048 in one step", dict(qkv=G(4, 2048, 4, 1), o=G(4, 2048, 4, 1), gate_up=G(2, 2048, 4, 1),
                                            lm_head=G(4, 2048, 4, 1))),
                ("K=2048 in one step, 8 warps", dict(qkv=G(4, 2048, 8, 1), o=G(4, 2048, 8, 1),
                                                     gate_up=G(2, 2048, 8, 1), lm_head=G(4, 2048, 8, 1))),
                ("down 2 columns", dict(down=G(2, 1024, 4, 1))),
                ("down 2048-wide steps", dict(down=G(4, 2048, 4, 1))),
                ("o 2 columns", dict(o=G(2, 1024, 4, 1))),
                ("qkv 2 columns", dict(qkv=G(2, 1024, 4, 1)))]:
            variants += [(label, False, configs), (label + " + PDL", pdl, configs)]
        run_chain("1b", 1, bandwidth, results, variants)
    else:
        run_shapes(rows, bandwidth, results)
        run_chain("1b", 1, bandwidth, results)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
