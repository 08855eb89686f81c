"""Model sources: HF folders, HF cache ids, known names, conversion round trips."""

from __future__ import annotations

import shutil

import pytest
import torch

from gllm.engine.loading import find_in_hf_cache, resolve_model
from gllm.model import load_hf_folder


def test_hf_state_dict_round_trips_through_load_weights(llama31_dir):
    model, cfg = load_hf_folder(llama31_dir, dtype="float32", device="cpu", max_positions=64)
    state = model.hf_state_dict()
    assert "model.layers.0.self_attn.q_proj.weight" in state and "lm_head.weight" in state
    again, _ = load_hf_folder(llama31_dir, dtype="float32", device="cpu", max_positions=64)
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    again.load_weights(state.items())
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


def test_hf_cache_id_resolves_offline(tmp_path, monkeypatch, llama32_dir):
    repo = tmp_path / "hub" / "models--npc-lab--tiny-llama"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(llama32_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_in_hf_cache("npc-lab/tiny-llama") == snapshot
    source = resolve_model("npc-lab/tiny-llama")
    assert source.kind == "hf-folder" and source.path == snapshot
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resolve_model("npc-lab/not-there")


def test_unknown_sources_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="known name"):
        resolve_model(str(tmp_path / "nothing-here"))
    text = tmp_path / "weights.bin"
    text.write_bytes(b"x")
    with pytest.raises(ValueError, match=".gguf"):
        resolve_model(str(text))
