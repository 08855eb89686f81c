"""Time one sample of a batch (`Sampler.launch` to its tokens on the host) for the common sampling settings.

    python tools/bench_sampler.py [--rows 8] [--vocab 49152] [--device cpu] [--threads 2] [--repeats 100]

Logits are random normals scaled so that a row at T = 0.7 has a few thousand tokens within the race's margin
of its best (the default model's real logits had ~3,900): the race's contenders, which set the CPU's cost.
Prints the median time per sample and the contenders per row; compare checkouts by running each in turn.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gllm.sampling.noise import RACE_MARGIN
from gllm.sampling.params import SamplingParams
from gllm.sampling.sampler import Sampler, SampleRow

SETTINGS = {"temperature 0.7": SamplingParams(temperature=0.7),
            "top_p 0.9": SamplingParams(temperature=0.7, top_p=0.9),
            "top_k 40": SamplingParams(temperature=0.7, top_k=40),
            "top_k 40, top_p 0.9": SamplingParams(temperature=0.7, top_k=40, top_p=0.9),
            "min_p 0.05": SamplingParams(temperature=0.7, min_p=0.05),
            "greedy": SamplingParams(temperature=0.0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=49152, help="the default model's")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch's CPU threads")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--scale", type=float, default=5.0, help="the logits' standard deviation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sampler = Sampler(args.vocab, args.device)
    logits = (torch.randn(args.rows, args.vocab, generator=torch.Generator().manual_seed(1)) * args.scale).to(args.device)
    contenders = (logits >= logits.amax(-1, keepdim=True) - RACE_MARGIN * 0.7).sum().item() / args.rows
    print(f"{args.rows} rows of {args.vocab} on {args.device}, {contenders:.0f} contenders a row at T = 0.7; "
          f"median of {args.repeats} samples:")
    for name, params in SETTINGS.items():
        rows = [SampleRow(params, seed=i, step=3, prompt_ids=[1], output_ids=[2]) for i in range(args.rows)]
        for _ in range(3):
            sampler.launch(logits, rows).result()
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            sampler.launch(logits, rows).result()
            times.append(time.perf_counter() - t)
        print(f"  {name:<22} {1000 * statistics.median(times):7.2f} ms")


if __name__ == "__main__":
    main()
