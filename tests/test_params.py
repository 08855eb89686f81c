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


def test_engine_flags_become_params():
    """The server's engine flags (`gllm serve`, the bridge and HTTP front ends) fill the same fields."""
    import argparse

    from gllm.engine.params import SERVER_COMPUTE_NICE
    from gllm.frontend.engine_flags import add_engine_arguments, generator_params
    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    params = generator_params(parser.parse_args(["--grammar-threads", "3", "--compute-idle", "--cpu-threads", "2"]))
    assert (params.grammar_threads, params.compute_idle, params.cpu_threads) == (3, True, 2)
    assert params.compute_nice == SERVER_COMPUTE_NICE
    defaults = generator_params(parser.parse_args([]))
    assert defaults.grammar_threads is None and defaults.compute_idle is False
    with pytest.raises(SystemExit):
        parser.parse_args(["--grammar-threads", "0"])


@pytest.mark.parametrize("value", [-1, 1.5, "4", None])
def test_mask_gate_rows_is_a_count(value):
    with pytest.raises(ValueError, match="mask_gate_rows"):
        GeneratorParams(mask_gate_rows=value)
    assert GeneratorParams(mask_gate_rows=0).mask_gate_rows == 0
