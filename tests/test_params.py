"""gllm.engine.params: GeneratorParams refuses values it cannot use, naming the field."""

from __future__ import annotations

import pytest

from gllm.engine import GeneratorParams


@pytest.mark.parametrize("field", ["cpu_threads", "grammar_threads"])
@pytest.mark.parametrize("value", [0, -2, 1.5, "4"])
def test_thread_counts_must_be_positive_integers(field, value):
    with pytest.raises(ValueError, match=field):
        GeneratorParams(**{field: value})


def test_thread_counts_default_to_the_engine_choice_and_accept_positive_integers():
    assert GeneratorParams().grammar_threads is None
    assert GeneratorParams(grammar_threads=3, cpu_threads=2).grammar_threads == 3
