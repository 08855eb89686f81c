"""gllm.sampling.grammar: constraints compiled through llguidance for gllm's tokenizers (a HF tokenizer.json and
a GGUF-built one), cached by content, their masks, and errors that name the field."""

from __future__ import annotations

import json

import pytest
import torch

from gllm.request_fields import FieldError
from gllm.sampling import Sampler, SampleRow, SamplingParams
from gllm.sampling.grammar import Grammars, unpack_masks
from gllm.tokenizer import Tokenizer
from gllm.tokenizer.gguf_tokenizer import tokenizer_from_gguf

SCHEMA = {"type": "object", "properties": {"action": {"enum": ["open_gate", "attack"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 9}},
          "required": ["action", "n"], "additionalProperties": False}


def grammars_for(tok: Tokenizer) -> Grammars:
    return Grammars(lambda: tok.hf_tokenizer.to_str(), tok.vocab_size, tok.eos_token_ids)


@pytest.fixture(scope="module")
def llama3(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    return tok, grammars_for(tok)


@pytest.fixture(scope="module")
def smollm(smollm2_gguf):
    tok = tokenizer_from_gguf(str(smollm2_gguf))
    return tok, grammars_for(tok)


def allowed(grammars: Grammars, constraint) -> set[int]:
    masks = grammars.fill_masks([constraint])
    shifts = torch.arange(32, dtype=torch.int32)
    return set(torch.nonzero(unpack_masks(masks, grammars.vocab_size, shifts)[0]).flatten().tolist())


def walk(tok: Tokenizer, grammars: Grammars, constraint, text: str) -> None:
    """Feed `text`'s tokens, each of which must be allowed by the mask before it."""
    for token in tok.encode(text, add_special_tokens=False):
        assert token in allowed(grammars, constraint), (text, tok.decode([token]))
        assert constraint.advance(token) is None


@pytest.mark.parametrize("which", ["llama3", "smollm"])
def test_schema_regex_grammar_and_choice_accept_their_language(which, request):
    tok, grammars = request.getfixturevalue(which)
    c = grammars.start("json_schema", json.dumps(SCHEMA))
    walk(tok, grammars, c, '{"action":"attack","n":7}')
    assert c.complete
    assert allowed(grammars, c) <= set(tok.eos_token_ids)            # only the end may follow
    first = allowed(grammars, grammars.start("json_schema", json.dumps(SCHEMA)))
    assert first and all(tok.decode([t]).startswith("{") for t in first)
    c = grammars.start("regex", "[a-c]{2}-[0-9]")
    walk(tok, grammars, c, "ab-4")
    assert c.complete
    c = grammars.start("grammar", 'start: "yes" | "no" " way"')        # Lark
    walk(tok, grammars, c, "no way")
    assert c.complete
    c = grammars.start("grammar", 'root ::= "go " [0-9]+')             # GBNF
    walk(tok, grammars, c, "go 12")
    assert not c.complete and set(tok.eos_token_ids) & allowed(grammars, c)   # more digits or the end
    c = grammars.start("choice", json.dumps(["north gate", "south gate"]))
    walk(tok, grammars, c, "south gate")
    assert c.complete


def test_a_token_outside_the_language_is_an_error(llama3):
    tok, grammars = llama3
    c = grammars.start("regex", "[0-9]+")
    letter = tok.encode("x", add_special_tokens=False)[0]
    assert letter not in allowed(grammars, c)
    assert "regex" in c.advance(letter)


@pytest.mark.parametrize("field, source, words", [
    ("regex", "[a-", "unclosed character class"),
    ("json_schema", '{"type": "frobnicate"}', "frobnicate"),
    ("json_schema", '{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}', "nowhere"),
    ("grammar", "start: undefined_rule", "undefined_rule"),
    ("grammar", "root ::= (", ""),
])
def test_an_invalid_constraint_is_a_field_error_naming_the_field(llama3, field, source, words):
    _, grammars = llama3
    with pytest.raises(FieldError) as err:
        grammars.start(field, source)
    assert err.value.field == field and err.value.code == "invalid" and words in str(err.value)


def test_compiled_constraints_are_cached_by_content_and_bounded(tokenizer_dir):
    tok = Tokenizer.from_dir(tokenizer_dir)
    grammars = Grammars(lambda: tok.hf_tokenizer.to_str(), tok.vocab_size, tok.eos_token_ids, cache_size=2)
    a, b = grammars.start("regex", "a+"), grammars.start("regex", "a+")
    assert grammars.compiled == 1 and a.matcher is not b.matcher        # one compile, separate states
    walk(tok, grammars, a, "aaa")
    assert allowed(grammars, b) == allowed(grammars, grammars.start("regex", "a+"))   # b untouched by a
    grammars.start("regex", "b+")
    grammars.start("regex", "c+")                                       # evicts "a+" (least recently used)
    grammars.start("regex", "a+")
    assert grammars.compiled == 4


def test_sampler_masks_only_the_constrained_rows_and_logprobs_stay_raw(llama3):
    tok, grammars = llama3
    sampler = Sampler(tok.vocab_size, "cpu")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, tok.vocab_size, generator=gen)
    c = grammars.start("regex", "[0-9]+")
    digits = allowed(grammars, c)
    greedy = SamplingParams(temperature=0, logprobs=3)
    free = sampler.sample(logits, [SampleRow(greedy, 1, 0, [1], []) for _ in range(3)])
    rows = [SampleRow(greedy, 1, 0, [1], []), SampleRow(greedy, 1, 0, [1], [], mask_row=0),
            SampleRow(SamplingParams(temperature=1.0, seed=3), 3, 0, [1], [], mask_row=0)]
    out = sampler.sample(logits, rows, masks=grammars.fill_masks([c]))
    assert out.token_ids[0] == free.token_ids[0]                      # the free row as if alone
    assert out.token_ids[1] in digits and out.token_ids[2] in digits
    assert out.token_ids[1] == max(digits, key=lambda t: logits[1, t].item())
    raw = torch.log_softmax(logits[1], -1)
    assert out.logprobs[1].top == free.logprobs[1].top                 # from the unfiltered distribution
    assert out.logprobs[1].logprob == pytest.approx(raw[out.token_ids[1]].item(), abs=1e-6)


def test_threads_get_their_own_originals_with_the_same_masks(tokenizer_dir):
    """With mask threads, requests take turns over one compiled original per thread (copies of one original
    share its lexer and would not compute in parallel); every copy allows the same tokens at the same place,
    and several rows' masks computed together equal each computed alone."""
    tok = Tokenizer.from_dir(tokenizer_dir)
    grammars = Grammars(lambda: tok.hf_tokenizer.to_str(), tok.vocab_size, tok.eos_token_ids, threads=3)
    source = json.dumps(SCHEMA)
    constraints = [grammars.start("json_schema", source) for _ in range(7)]
    assert grammars.compiled == 1
    assert len(grammars._cache[("json_schema", source)]._originals) == 3
    prefix = tok.encode('{"action":"open', add_special_tokens=False)
    for c in constraints:
        for token in prefix:
            assert c.advance(token) is None
    together = grammars.fill_masks(constraints)
    fresh = [grammars.start("json_schema", source) for _ in range(7)]
    for c in fresh:
        for token in prefix:
            assert c.advance(token) is None
        assert torch.equal(grammars.fill_masks([c])[0], together[0])
    assert all(torch.equal(row, together[0]) for row in together)


def test_length_slices_change_no_mask(llama3):
    """The slices only speed masks up: along random replies through bounded strings (every position up to the
    string's end), each mask equals the one llguidance computes with its default slices."""
    import random

    import llguidance
    tok, grammars = llama3
    schema = json.dumps({"type": "object", "properties": {"say": {"type": "string", "maxLength": 12},
                                                          "mood": {"enum": ["calm", "angry"]}},
                         "required": ["say", "mood"], "additionalProperties": False})
    plain = llguidance.LLTokenizer(tok.hf_tokenizer.to_str(), n_vocab=tok.vocab_size,
                                   eos_token=list(tok.eos_token_ids) or None)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    rng = random.Random(0)
    compared = 0
    for _ in range(3):
        ours, reference = grammars.start("json_schema", schema), llguidance.LLMatcher(plain, grammar, log_level=0)
        while not ours.complete:
            mask = grammars.fill_masks([ours])[0]
            want = torch.frombuffer(bytearray(reference.compute_bitmask()), dtype=torch.int32)
            assert torch.equal(mask, want[:mask.numel()])
            compared += 1
            token = rng.choice(sorted(allowed(grammars, ours)))
            assert ours.advance(token) is None and reference.consume_token(token)
    assert compared > 15


def test_a_mask_job_moves_the_grammars_on_then_computes_the_masks_and_signals_when_done(tokenizer_dir):
    """`start_masks` does on the mask thread what the engine thread did: it consumes the previous step's tokens
    (`advance` then returns the verdict it recorded, without touching the matcher) and computes the same masks
    as `fill_masks` would after the same tokens; a grammar that ended or failed at its token gets an all-ones
    row; `then` runs once the masks are written, and also when the job fails (whatever waits for it must never
    wait forever), a failure before the tokens leaves the grammars as they were."""
    import threading

    tok = Tokenizer.from_dir(tokenizer_dir)
    grammars = Grammars(lambda: tok.hf_tokenizer.to_str(), tok.vocab_size, tok.eos_token_ids, threads=2)
    prefix = tok.encode('{"action":"', add_special_tokens=False)
    opening, wrong, yes = (tok.encode(t, add_special_tokens=False)[0] for t in ("open", "x", "yes"))

    def fresh():
        rows = [grammars.start("json_schema", json.dumps(SCHEMA)) for _ in range(3)] + \
            [grammars.start("choice", json.dumps(["yes", "no"]))]
        for c in rows[:3]:
            for token in prefix:
                assert c.advance(token) is None
        return rows

    tokens = [opening, prefix[0], wrong, yes]   # row 1: '{' is a character of the string it is in
    try:
        reference = fresh()
        verdicts = [c.advance(t) for c, t in zip(reference, tokens)]
        assert verdicts[0] is None and verdicts[3] is None and "does not fit" in verdicts[2]
        going = [c.going for c in reference]
        assert going[0] and not going[2] and not going[3] and reference[3].complete
        want = grammars.fill_masks([c for c, g in zip(reference, going) if g])

        ours = fresh()
        done = []
        job = grammars.start_masks(ours, lambda: tokens, then=lambda: done.append(threading.current_thread().name))
        job.wait()
        assert job.advanced.is_set() and done and done[0].startswith("gllm-masks")
        assert torch.equal(job.masks[[i for i, g in enumerate(going) if g]], want)
        assert all(torch.all(job.masks[i] == -1) for i, g in enumerate(going) if not g)   # every token allowed
        assert [c.advance(t) for c, t in zip(ours, tokens)] == verdicts
        assert [c.complete for c in ours] == [c.complete for c in reference]
        with pytest.raises(RuntimeError, match="consumed"):   # a job's verdict is for its own token only
            job = grammars.start_masks(ours[:1], lambda: [opening], then=lambda: None)
            job.wait()
            ours[0].advance(wrong)

        def no_tokens():
            raise RuntimeError("the device failed")

        again = fresh()
        failed = []
        job = grammars.start_masks(again, no_tokens, then=lambda: failed.append(True))
        with pytest.raises(RuntimeError, match="the device failed"):
            job.wait()
        assert failed == [True] and job.advanced.is_set()
        assert [c.advance(t) for c, t in zip(again, tokens)] == verdicts   # consumed here, as if no job had run

        def broken(*args, **kwargs):
            raise RuntimeError("no masks today")

        grammars._fill = broken
        job = grammars.start_masks(fresh(), lambda: tokens, then=lambda: failed.append(True))
        with pytest.raises(RuntimeError, match="no masks today"):
            job.wait()
        grammars.settle()
        assert failed == [True, True]
    finally:
        grammars.close()
