"""Sampling: parameters, the vectorized sampler, seeded noise, stop conditions."""

from gllm.sampling.params import SamplingParams
from gllm.sampling.sampler import PendingSample, SampleOutput, Sampler, SampleRow, TokenLogprobs
from gllm.sampling.stop import StopChecker, StopResult

__all__ = ["PendingSample", "SampleOutput", "SampleRow", "Sampler", "SamplingParams", "StopChecker", "StopResult",
           "TokenLogprobs"]
