"""gllm.sampling: filters, seeded noise, penalties, logprobs, parameter validation, stop conditions."""

from __future__ import annotations

import math

import pytest
import torch

from gllm.sampling import Sampler, SampleRow, SamplingParams, StopChecker

VOCAB = 50


def rows(params: SamplingParams, n: int, seed: int = 1, step: int = 0, prompt=(1, 2), output=()):
    return [SampleRow(params, seed, step, list(prompt), list(output)) for _ in range(n)]


@pytest.fixture(scope="module")
def sampler():
    return Sampler(VOCAB, "cpu")


def logits_row(seed=0) -> torch.Tensor:
    return torch.randn(VOCAB, generator=torch.Generator().manual_seed(seed)) * 2


def draw(sampler, logits, params, n=4000, seed=3):
    """n independent draws: one row per step of the same request."""
    batch = logits.expand(n, -1).contiguous()
    return torch.tensor(sampler.sample(batch, [SampleRow(params, seed, i, [1], []) for i in range(n)]).token_ids)


def test_greedy_is_argmax(sampler):
    logits = torch.stack([logits_row(i) for i in range(5)])
    out = sampler.sample(logits, rows(SamplingParams(temperature=0), 5))
    assert out.token_ids == logits.argmax(-1).tolist()


def test_samples_follow_the_distribution(sampler):
    logits = logits_row(1)
    tokens = draw(sampler, logits, SamplingParams(temperature=1.0), n=20000)
    expected = logits.softmax(-1)
    observed = torch.bincount(tokens, minlength=VOCAB).float() / len(tokens)
    top = expected.topk(5).indices
    # Each of the five likeliest tokens within 4 standard errors of its probability.
    se = (expected[top] * (1 - expected[top]) / len(tokens)).sqrt()
    assert ((observed[top] - expected[top]).abs() <= 4 * se).all(), (observed[top], expected[top])


def test_temperature_sharpens(sampler):
    logits = logits_row(2)
    hot = draw(sampler, logits, SamplingParams(temperature=2.0))
    cold = draw(sampler, logits, SamplingParams(temperature=0.3))
    best = logits.argmax().item()
    assert (cold == best).float().mean() > (hot == best).float().mean()


def test_top_k_top_p_min_p_restrict_support(sampler):
    logits = logits_row(3)
    probs = logits.softmax(-1)
    order = probs.argsort(descending=True)
    k_tokens = set(draw(sampler, logits, SamplingParams(top_k=3)).tolist())
    assert k_tokens == set(order[:3].tolist())
    # top_p: the smallest head whose mass reaches p.
    cum = probs[order].cumsum(0)
    head = int((cum < 0.6).sum().item()) + 1
    p_tokens = set(draw(sampler, logits, SamplingParams(top_p=0.6)).tolist())
    assert p_tokens == set(order[:head].tolist())
    m_tokens = set(draw(sampler, logits, SamplingParams(min_p=0.2)).tolist())
    assert m_tokens == set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    both = set(draw(sampler, logits, SamplingParams(top_k=2, top_p=0.99)).tolist())
    assert both == set(order[:2].tolist())


def test_seeded_row_does_not_depend_on_its_batch(sampler):
    logits = logits_row(4)
    params = SamplingParams(temperature=1.5, top_p=0.9, seed=1234)
    alone = sampler.sample(logits[None], [SampleRow(params, 1234, 7, [1], [])]).token_ids[0]
    others = torch.stack([logits_row(i) for i in range(10, 16)])
    batch = torch.cat([others[:3], logits[None], others[3:]])
    mixed = [SampleRow(SamplingParams(temperature=0.7, top_k=5), 99 + i, i, [1], []) for i in range(6)]
    out = sampler.sample(batch, mixed[:3] + [SampleRow(params, 1234, 7, [1], [])] + mixed[3:])
    assert out.token_ids[3] == alone
    seeds = {sampler.sample(logits[None], [SampleRow(params, s, 7, [1], [])]).token_ids[0] for s in range(40)}
    assert len(seeds) > 3                          # different seeds differ


def test_repetition_penalty_matches_transformers(sampler):
    from transformers import RepetitionPenaltyLogitsProcessor
    logits = torch.stack([logits_row(5), logits_row(6)])
    prompt, output = [1, 4, 9], [4, 17, 17]
    params = SamplingParams(temperature=0, repetition_penalty=1.3)
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([prompt + output] * 2), logits.clone())
    got = sampler._apply_penalties(logits, rows(params, 2, prompt=prompt, output=output))
    assert torch.allclose(got, ref)


def test_presence_and_frequency_penalties(sampler):
    logits = logits_row(7)[None]
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = sampler._apply_penalties(logits, rows(params, 1, prompt=[3], output=[8, 8, 9]))
    want = logits.clone()
    want[0, 8] -= 0.5 + 2 * 0.25
    want[0, 9] -= 0.5 + 0.25
    assert torch.allclose(got, want)              # the prompt token 3 is not penalised


def test_logprobs_are_raw_log_softmax_top_n_sorted(sampler):
    logits = torch.stack([logits_row(8), logits_row(9)])
    params = SamplingParams(temperature=0.5, top_k=3, logprobs=4, seed=5)
    out = sampler.sample(logits, rows(params, 2))
    ref = torch.log_softmax(logits, -1)
    for i, lp in enumerate(out.logprobs):
        assert lp.token_id == out.token_ids[i]
        assert math.isclose(lp.logprob, ref[i, lp.token_id].item(), abs_tol=1e-6)
        values = [v for _, v in lp.top]
        assert [t for t, _ in lp.top] == ref[i].topk(4).indices.tolist() and values == sorted(values, reverse=True)
    out = sampler.sample(logits, rows(SamplingParams(temperature=0), 2))
    assert out.logprobs == [None, None]


@pytest.mark.parametrize("field,value", [
    ("max_new_tokens", 0), ("max_new_tokens", -3), ("temperature", -0.1), ("temperature", float("nan")),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -1), ("min_p", 2.0), ("logprobs", 21), ("seed", -1),
    ("presence_penalty", 3.0), ("repetition_penalty", 0.0),
])
def test_bad_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_checker():
    stop = StopChecker({2}, ("STOP", "\n\n"), max_new_tokens=3)
    assert stop.check_token(2, 1).finish_reason == "stop"
    assert stop.check_token(5, 3).finish_reason == "length"
    assert not stop.check_token(5, 1).finished
    assert stop.find_stop_string("hello ST", 2) is None
    assert stop.find_stop_string("hello STOP", 2) == 6
    assert stop.find_stop_string("a\n\nb", 1) == 1
    assert stop.safe_length("hello ST") == 6       # "ST" might begin "STOP": held back
    assert stop.safe_length("hello\n") == 5
    assert stop.safe_length("hello") == 5
    assert StopChecker(set(), (), 5).safe_length("abc") == 3


@pytest.mark.parametrize("filters", [{}, {"top_k": 20}, {"min_p": 0.001}, {"top_p": 0.8}, {"top_p": 0.999},
                                     {"top_k": 20, "top_p": 0.7, "min_p": 0.01}, {"top_k": 30, "top_p": 0.95}])
def test_race_over_contenders_equals_race_over_whole_vocabulary(sampler, filters):
    """The CPU's race over the contenders that the filters keep (sorting those alone) draws what a race over
    the whole vocabulary, filtered with a full sort, draws."""
    from gllm.sampling.noise import row_key
    logits = torch.stack([logits_row(i) * 8 for i in range(6)])    # wide spread: many non-contenders
    temps = [1.0, 0.7, 1.5, 0.3, 2.0, 1.0]
    for step in range(20):
        rows = [SampleRow(SamplingParams(temperature=temps[i], **filters), 77 + i, step, [1], []) for i in range(6)]
        got = sampler.sample(logits, rows).token_ids
        keys = torch.tensor([row_key(77 + i, step) for i in range(6)])
        scaled = logits / torch.tensor(temps)[:, None]
        if filters.get("top_k"):
            kth = scaled.topk(filters["top_k"], dim=-1).values[:, -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if filters.get("top_p"):
            ordered, ids = scaled.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            past_mass = probs.cumsum(-1) - probs > filters["top_p"]
            beyond = torch.zeros_like(ordered, dtype=torch.bool).scatter(1, ids, past_mass)
            scaled = scaled.masked_fill(beyond, float("-inf"))
        if filters.get("min_p"):
            probs = scaled.softmax(-1)
            scaled = scaled.masked_fill(probs < filters["min_p"] * probs.max(-1, keepdim=True).values, float("-inf"))
        full = (scaled - sampler.noise.exponential(keys).log()).argmax(-1).tolist()
        assert got == full


def _broken(params: SamplingParams, **values) -> SamplingParams:
    """Params whose values slipped past validation (as a caller building SamplingParams by hand could)."""
    for name, value in values.items():
        object.__setattr__(params, name, value)
    return params


@pytest.mark.parametrize("broken", [dict(temperature="hot"), dict(top_p="all"), dict(min_p=[1])])
def test_a_row_that_breaks_sampling_fails_alone(sampler, broken):
    logits = torch.stack([logits_row(i) for i in range(4)])
    params = [SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0),
              _broken(SamplingParams(temperature=0.8, top_p=0.9), **broken), SamplingParams(temperature=0.7, min_p=0.1)]
    batch = [SampleRow(p, seed=11 + i, step=0, prompt_ids=[1], output_ids=[]) for i, p in enumerate(params)]
    out = sampler.sample(logits, batch)
    assert out.errors[2] is not None and "sampling failed" in out.errors[2]
    assert [e is None for e in out.errors] == [True, True, False, True]
    for i in (0, 1, 3):   # the others get exactly what they get alone
        assert out.token_ids[i] == sampler.sample(logits[i:i + 1], [batch[i]]).token_ids[0]


def test_top_k_beyond_the_vocabulary_means_off(sampler):
    logits = logits_row(4)[None]
    off = sampler.sample(logits, rows(SamplingParams(temperature=1.0, top_k=0), 1, seed=9)).token_ids
    assert sampler.sample(logits, rows(SamplingParams(temperature=1.0, top_k=2**31 - 1), 1, seed=9)).token_ids == off
    huge = _broken(SamplingParams(temperature=1.0), top_k=2**70)
    assert sampler.sample(logits, rows(huge, 1, seed=9)).token_ids == off
