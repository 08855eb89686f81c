"""Structured output in the engine, on the tiny random-weight model (whose free output is noise): JSON-schema,
regex, grammar and choice outputs always parse; greedy constrained output is the same in lock-step and
overlapped steps and in any batch; free requests batched with constrained ones get exactly their own tokens;
a bad constraint is a field error before any compute, and the engine serves on."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.request_fields import FieldError

SCHEMAS = {
    "nested": {"type": "object", "properties": {
        "npc": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                 "mood": {"enum": ["calm", "angry", "afraid"]}},
                "required": ["name", "mood"], "additionalProperties": False},
        "hp": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["npc", "hp"], "additionalProperties": False},
    "array": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"enum": ["sword", "shield", "torch"]}, "minItems": 1, "maxItems": 3},
        "gold": {"type": "integer", "minimum": -5, "maximum": 5000}},
        "required": ["items"], "additionalProperties": False},
    "numbers": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10},
        "y": {"type": "integer", "exclusiveMinimum": 0, "maximum": 3},
        "ok": {"type": "boolean"}},
        "required": ["x", "y", "ok"], "additionalProperties": False},
    "optional": {"type": "object", "properties": {
        "action": {"enum": ["open_gate", "attack", "flee", "talk"]},
        "target": {"type": ["string", "null"], "maxLength": 8},
        "say": {"type": "string", "maxLength": 16}},
        "required": ["action"], "additionalProperties": False},
    "top-level-array": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 6},
                        "minItems": 2, "maxItems": 4},
}
PROMPT = "The guard decides:"

# GLLM_TEST_DEVICE=cuda runs this file on the GPU (masks applied by the fused sampling kernel there).
DEVICE = os.environ.get("GLLM_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module", params=[False, True], ids=["lockstep", "overlap"])
def eng(llama32_dir, request):
    e = LLMEngine(llama32_dir, GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=512, cpu_threads=2,
                                               dtype="float32", overlap_steps=request.param), device=DEVICE)
    yield e
    e.close()


def finished_clean(eng: LLMEngine) -> None:
    assert eng.block_manager.num_free_blocks == eng.block_manager.num_blocks
    assert not eng._states


@pytest.mark.parametrize("name", SCHEMAS)
def test_twenty_seeded_samples_of_each_schema_parse_and_validate(eng, name):
    schema = SCHEMAS[name]
    reqs = [GenerationRequest(prompt=PROMPT, json_schema=schema, max_new_tokens=200, seed=seed, temperature=1.0)
            for seed in range(20)]
    for r in eng.generate(reqs):
        assert r.finish_reason == "stop", (r.finish_reason, r.text)
        jsonschema.validate(json.loads(r.text), schema)
    finished_clean(eng)


def test_a_schema_as_json_text_is_the_same_schema(eng):
    schema = SCHEMAS["optional"]
    as_dict, as_text = eng.generate([GenerationRequest(prompt=PROMPT, json_schema=s, max_new_tokens=100, seed=4)
                                     for s in (schema, json.dumps(schema))])
    assert as_dict.text == as_text.text and as_dict.tokens == as_text.tokens


def test_regex_grammar_and_choice_outputs_match(eng):
    regex = r"(north|south) gate, [0-9]{1,3} steps"
    lark = 'start: greet " " name "!"\ngreet: "Hail" | "Halt"\nname: /[A-Z][a-z]{2,6}/'
    gbnf = 'root ::= "give " num " " item\nnum ::= [1-9] [0-9]?\nitem ::= "apples" | "arrows"'
    choices = ["open the gate", "stay closed", "call the captain"]
    reqs = ([GenerationRequest(prompt=PROMPT, regex=regex, max_new_tokens=40, seed=s) for s in range(20)]
            + [GenerationRequest(prompt=PROMPT, grammar=lark, max_new_tokens=40, seed=s) for s in range(10)]
            + [GenerationRequest(prompt=PROMPT, grammar=gbnf, max_new_tokens=40, seed=s) for s in range(10)]
            + [GenerationRequest(prompt=PROMPT, choice=choices, max_new_tokens=40, seed=s, temperature=3)
                  for s in range(20)])
    results = eng.generate(reqs)
    assert all(r.finish_reason == "stop" for r in results), [(r.finish_reason, r.text) for r in results]
    assert all(re.fullmatch(regex, r.text) for r in results[:20])
    assert all(re.fullmatch(r"(Hail|Halt) [A-Z][a-z]{2,6}!", r.text) for r in results[20:30])
    assert all(re.fullmatch(r"give [1-9][0-9]? (apples|arrows)", r.text) for r in results[30:40])
    assert all(r.text in choices for r in results[40:])
    assert len({r.text for r in results[40:]}) > 1                   # seeds still choose (a peaked model: hot)


def test_greedy_constrained_output_is_the_same_in_any_batch_and_either_step_mode(llama32_dir):
    ahead = []

    def run(overlap: bool, batch: list[GenerationRequest]) -> list[list[int]]:
        e = LLMEngine(llama32_dir, GeneratorParams(block_size=16, max_batch_size=8, max_seq_len=512, cpu_threads=2,
                                                   dtype="float32", overlap_steps=overlap), device=DEVICE)
        try:
            return [r.tokens for r in e.generate(batch)]
        finally:
            ahead.append(e.num_steps_ahead)
            e.close()

    def constrained():
        return [GenerationRequest(prompt=PROMPT, json_schema=SCHEMAS["nested"], max_new_tokens=80, temperature=0),
                GenerationRequest(prompt="Two words:", regex="[a-z]+ [a-z]+", max_new_tokens=30, temperature=0)]

    def free():
        return [GenerationRequest(prompt=f"Free text {i}", max_new_tokens=24, temperature=0, ignore_eos=True)
                for i in range(3)]

    want = run(False, constrained())
    assert run(True, constrained()) == want
    assert ahead == [0, ahead[1]] and ahead[1] > 20   # constrained rows run ahead too (sampled once masks are in)
    mixed = free()[:2] + constrained() + free()[2:]
    for overlap in (False, True):
        assert run(overlap, mixed)[2:4] == want


def test_free_requests_beside_constrained_ones_get_exactly_their_own_tokens(eng):
    free = [GenerationRequest(prompt="The smith said", max_new_tokens=30, temperature=0, ignore_eos=True),
            GenerationRequest(prompt="The priest said", max_new_tokens=30, temperature=0.9, top_p=0.9, seed=11,
                              ignore_eos=True, logprobs=2)]
    alone = eng.generate(free)
    constrained = [GenerationRequest(prompt=PROMPT, json_schema=SCHEMAS["array"], max_new_tokens=60, seed=s)
                   for s in range(4)]
    mixed = eng.generate([constrained[0], free[0], constrained[1], constrained[2], free[1], constrained[3]])
    for a, b in zip(alone, [mixed[1], mixed[4]]):
        assert a.tokens == b.tokens and a.text == b.text
    for a, b in zip(alone[1].logprobs, mixed[4].logprobs):   # (a batch's sums round differently: 1e-4)
        assert [t for t, _ in a.top] == [t for t, _ in b.top]
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)


def test_logprobs_of_a_constrained_request_come_from_the_unfiltered_distribution(eng):
    free, constrained = eng.generate([
        GenerationRequest(prompt=PROMPT, max_new_tokens=1, temperature=0, logprobs=5, ignore_eos=True),
        GenerationRequest(prompt=PROMPT, regex="[0-9]{4}", max_new_tokens=8, temperature=0, logprobs=5)])
    first, raw = constrained.logprobs[0], free.logprobs[0]            # the same raw top 5 at the first token
    assert [t for t, _ in first.top] == [t for t, _ in raw.top]
    assert [v for _, v in first.top] == pytest.approx([v for _, v in raw.top], abs=1e-4)
    assert first.token_id not in [t for t, _ in raw.top] and first.logprob < raw.top[-1][1]   # not renormalised
    assert re.fullmatch("[0-9]{4}", constrained.text)


def test_a_complete_grammar_ends_with_stop_and_its_last_text(eng):
    r = eng.generate(GenerationRequest(prompt=PROMPT, choice=["yes"], max_new_tokens=50, temperature=0))[0]
    assert (r.finish_reason, r.text) == ("stop", "yes")
    assert len(r.tokens) == len(eng.tokenizer.encode("yes", add_special_tokens=False))   # no extra step for EOS
    long = eng.generate(GenerationRequest(prompt=PROMPT, choice=["open the north gate"], max_new_tokens=50,
                                          temperature=0))[0]
    exact = eng.generate(GenerationRequest(prompt=PROMPT, choice=["open the north gate"],
                                           max_new_tokens=len(long.tokens), temperature=0))[0]
    assert (exact.finish_reason, exact.text) == ("stop", "open the north gate")   # complete at the limit: stop
    r = eng.generate(GenerationRequest(prompt=PROMPT, regex="[a-z]{30}", max_new_tokens=3, temperature=0))[0]
    assert r.finish_reason == "length" and re.fullmatch("[a-z]+", r.text)


def test_streamed_text_of_a_constrained_request_adds_up_to_its_result(eng):
    import asyncio

    async def collect():
        parts, result = [], None
        async for ev in eng.stream(GenerationRequest(prompt=PROMPT, json_schema=SCHEMAS["optional"],
                                                     max_new_tokens=100, seed=9)):
            parts.append(ev.text)
            result = ev.result or result
        return "".join(parts), result

    text, result = asyncio.run(collect())
    assert text == result.text and result.finish_reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMAS["optional"])


@pytest.mark.parametrize("kwargs, field, code", [
    (dict(json_schema={"type": "frobnicate"}), "json_schema", "invalid"),
    (dict(json_schema="{not json"), "json_schema", "wrong_type"),
    (dict(json_schema=[1, 2]), "json_schema", "wrong_type"),
    (dict(regex="(unclosed"), "regex", "invalid"),
    (dict(regex=""), "regex", "out_of_range"),
    (dict(grammar="start: nowhere"), "grammar", "invalid"),
    (dict(choice=[""]), "choice", "out_of_range"),
    (dict(choice="yes"), "choice", "wrong_type"),
    (dict(regex="a", choice=["a"]), "choice", "conflict"),
    (dict(json_schema={"type": "object"}, grammar='start: "x"'), "grammar", "conflict"),
])
def test_a_bad_constraint_is_refused_naming_its_field_and_the_engine_serves_on(eng, kwargs, field, code):
    steps = eng.num_steps
    with pytest.raises(FieldError) as err:
        eng.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=4, **kwargs))
    assert (err.value.field, err.value.code) == (field, code)
    assert eng.num_steps == steps                                       # refused before any compute
    ok = eng.generate(GenerationRequest(prompt=PROMPT, choice=["fine"], max_new_tokens=4))[0]
    assert ok.text == "fine"
    finished_clean(eng)


def test_compiled_constraints_are_reused_across_requests(eng):
    schema = {"type": "object", "properties": {"z": {"enum": [1, 2]}}, "required": ["z"],
              "additionalProperties": False}
    before = eng.grammars.compiled
    eng.generate([GenerationRequest(prompt=PROMPT, json_schema=schema, max_new_tokens=20, seed=s) for s in range(5)])
    assert eng.grammars.compiled == before + 1


def test_a_failure_computing_masks_fails_only_the_constrained_rows(eng):
    free = GenerationRequest(prompt="The smith said", max_new_tokens=12, temperature=0, ignore_eos=True)
    alone = eng.generate(free)[0]
    fill, calls = eng.grammars._fill, []

    def broken(constraints, masks, rows=None):   # the third step's masks fail (on CUDA: on the mask thread)
        calls.append(len(constraints))
        if len(calls) >= 3:
            raise RuntimeError("mask buffer lost")
        fill(constraints, masks, rows=rows)

    eng.grammars._fill = broken
    try:
        bad, ok = eng.generate([GenerationRequest(prompt=PROMPT, regex="[a-z]+", max_new_tokens=8, ignore_eos=True),
                                GenerationRequest(prompt="The smith said", max_new_tokens=12, temperature=0,
                                                  ignore_eos=True)])
    finally:
        del eng.grammars._fill
    # On CUDA the next step's mask job is queued before this failure is known, so it may run (and fail) too.
    assert len(calls) >= 3 and bad.finish_reason == "error" and "mask buffer lost" in bad.error
    assert len(bad.tokens) == 2
    assert ok.finish_reason == "length" and ok.tokens == alone.tokens
    finished_clean(eng)


def test_the_npc_actions_example_parses_every_reply_on_the_default_model(smollm2_gguf):
    example = Path(__file__).resolve().parent.parent / "examples" / "python" / "npc_actions.py"
    proc = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4/4 replies parsed" in proc.stdout and proc.stdout.count("[game] ") == 4, proc.stdout


def test_prepare_builds_the_token_index_once_and_requests_use_it(llama32_dir):
    """`prepare_structured_output` takes the one-off index build off the first constrained request's thread."""
    with LLMEngine(llama32_dir, GeneratorParams(block_size=16, max_batch_size=2, max_seq_len=256, cpu_threads=1,
                                                dtype="float32"), device=DEVICE) as e:
        assert not e.grammars.prepared
        assert e.prepare_structured_output() > 0 and e.grammars.prepared
        index = e.grammars.tokenizer
        assert e.prepare_structured_output() == 0.0
        out = e.generate(GenerationRequest(prompt=PROMPT, max_new_tokens=8, seed=1, choice=["open", "shut"]))[0]
        assert out.text in ("open", "shut") and e.grammars.tokenizer is index
