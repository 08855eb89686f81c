"""Sampling: parameters, the vectorized sampler, seeded noise, stop conditions."""

from gllm.sampling.params import MAX_LOGPROBS, SamplingParams
from gllm.sampling.sampler import PendingSample, SampleOutput, SampleRow, Sampler, TokenLogprobs
from gllm.sampling.stop import StopChecker, StopResult

__all__ = ["MAX_LOGPROBS", "PendingSample", "SampleOutput", "SampleRow", "Sampler", "SamplingParams", "StopChecker", "StopResult",
           "TokenLogprobs"]
