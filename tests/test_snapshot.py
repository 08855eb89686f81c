"""KV session snapshots (gllm.kv.snapshot, LLMEngine.snapshot/restore): a conversation saved from one engine and
restored into a fresh one continues token for token; foreign, damaged or oversized blobs are typed errors and
the engine serves on; every block comes back."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.kv import snapshot as S

HISTORY = ("Guard: Halt! Who goes there?\nPlayer: A traveller from the south, looking for the smith.\n"
           "Guard: The smith? Brann works by the river gate, past the tannery. ") * 3
FOLLOW_UP = "\nPlayer: And what does he charge for a sword?\nGuard:"


# GLLM_TEST_DEVICE=cuda runs this file on the GPU (the payload is checked and written there).
DEVICE = os.environ.get("GLLM_TEST_DEVICE", "cpu")


def engine(folder, device: str = DEVICE, **kw) -> LLMEngine:
    params = dict(block_size=16, max_batch_size=4, max_seq_len=512, cpu_threads=1, dtype="float32",
                  overlap_steps=False)
    params.update(kw)
    return LLMEngine(folder, GeneratorParams(**params), device=device)


def greedy(ids: list[int], n: int = 24, **kw) -> GenerationRequest:
    return GenerationRequest(prompt_token_ids=ids, max_new_tokens=n, temperature=0, ignore_eos=True,
                             cache_result=False, **kw)


def talk(eng: LLMEngine, **snapshot_kw) -> tuple[list[int], list[int], list[int], bytes]:
    """The NPC's first line, saved, then the player's follow-up: (first request's ids + output, follow-up ids,
    the follow-up's greedy continuation on this uninterrupted engine, the snapshot taken between the two)."""
    prompt = eng.tokenizer.encode(HISTORY)
    first = eng.generate(greedy(prompt, request_id="npc-1"))[0]
    blob = eng.snapshot("npc-1", **snapshot_kw)
    history = prompt + first.tokens
    follow = history + eng.tokenizer.encode(FOLLOW_UP, add_special_tokens=False)
    return history, follow, eng.generate(greedy(follow))[0].tokens, blob


def assert_pool_full(eng: LLMEngine) -> None:
    stats = eng.stats()
    assert stats["kv_free_blocks"] == stats["kv_total_blocks"]
    assert stats["running"] == stats["waiting"] == 0


@pytest.mark.parametrize("overlap", [False, True], ids=["lockstep", "overlap"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_restored_session_continues_token_identically(llama32_dir, block_size, overlap):
    with engine(llama32_dir, block_size=block_size, overlap_steps=overlap) as first:
        history, follow, expected, blob = talk(first)
        # By token ids (the follow-up has cached one more token of the history by now): the same KV bytes.
        again = first.snapshot(history[:len(history) - 1])
        assert again == blob
        assert_pool_full(first)
    n = LLMEngine.snapshot_tokens(blob)
    # The finished request's last token has no KV; whole blocks of the rest are saved.
    assert n == (len(history) - 1) // block_size * block_size and n > 0
    with engine(llama32_dir, block_size=block_size, overlap_steps=overlap) as second:
        info = second.restore(blob)
        assert info.tokens == n and info.new_blocks == n // block_size
        assert_pool_full(second)     # restored blocks are cached, not held
        result = second.generate(greedy(follow))[0]
        assert result.usage.cached_tokens == n
        assert result.tokens == expected
        assert second.restore(blob).new_blocks == 0    # already cached: nothing written again
        assert_pool_full(second)
    with engine(llama32_dir, block_size=block_size, overlap_steps=overlap) as cold:   # the control: no restore
        assert cold.generate(greedy(follow))[0].usage.cached_tokens == 0


def test_a_snapshot_restores_into_another_block_size(llama32_dir):
    with engine(llama32_dir, block_size=4) as first:
        _, follow, expected, blob = talk(first)
    with engine(llama32_dir, block_size=16) as second:
        info = second.restore(blob)
        assert info.tokens == LLMEngine.snapshot_tokens(blob) // 16 * 16
        result = second.generate(greedy(follow))[0]
        assert result.usage.cached_tokens == info.tokens and result.tokens == expected


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_int8_encoding_is_at_most_055_of_raw_and_keeps_the_greedy_continuation(llama32_dir, llama31_dir, dtype):
    for folder in (llama32_dir, llama31_dir):
        with engine(folder, dtype=dtype) as first:
            _, follow, expected, small = talk(first, encoding="int8")
            raw = first.snapshot(follow[:LLMEngine.snapshot_tokens(small)])
        assert len(small) <= 0.55 * len(raw)
        with engine(folder, dtype=dtype) as second:
            second.restore(small)
            result = second.generate(greedy(follow))[0]
            assert result.usage.cached_tokens == LLMEngine.snapshot_tokens(small)
            assert result.tokens == expected
            assert_pool_full(second)


def test_int8_rounding_error_is_within_the_stated_tolerance():
    torch.manual_seed(0)
    layers = [(torch.randn(40, 2, 16) * 300, torch.randn(40, 2, 16) * 1e-6) for _ in range(2)]
    identity = S.SnapshotIdentity("m", "t", "float32", 2, 2, 16)
    snap = S.decode(S.encode(identity, list(range(40)), layers, 16, "int8"), identity, max_tokens=100)
    back = snap.dense()
    assert back.shape == (4, 40, 2, 16)
    for i, x in enumerate(t for pair in layers for t in pair):
        bound = 1.19 * x.abs().amax(dim=-1, keepdim=True) / 254
        assert ((x - back[i]).abs() <= bound + 1e-12).all()


def test_raw_snapshot_size_is_the_kv_bytes_plus_ids_header_and_checksum(llama32_dir):
    with engine(llama32_dir) as eng:
        blob = talk(eng)[3]
        n = LLMEngine.snapshot_tokens(blob)
        per_token = 2 * eng.model_config.num_hidden_layers * eng.model_config.num_key_value_heads \
            * eng.model_config.head_dim * 4
        overhead = len(blob) - n * per_token
        assert 4 * n < overhead <= 4 * n + 512


def fails(eng: LLMEngine, blob, error: type[S.SnapshotError]) -> None:
    with pytest.raises(error) as info:
        eng.restore(blob)
    assert isinstance(info.value, ValueError) and info.value.field == "snapshot"


def test_foreign_damaged_and_oversized_blobs_are_typed_errors_and_the_engine_serves_on(llama32_dir, llama31_dir,
                                                                                       tmp_path):
    with engine(llama32_dir) as first:
        _, follow, expected, blob = talk(first)
    with engine(llama31_dir) as other:
        foreign_model = talk(other)[3]
    # The same weights under another chat template: another tokenizer digest.
    retemplated = tmp_path / "retemplated"
    shutil.copytree(llama32_dir, retemplated)
    config = json.loads((retemplated / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
    (retemplated / "tokenizer_config.json").write_text(json.dumps(config))
    with engine(retemplated) as re_eng:
        foreign_tokenizer = talk(re_eng)[3]
    with engine(llama32_dir, dtype="float16") as half:
        foreign_dtype = talk(half)[3]

    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x10
    header_flip = bytearray(blob)
    header_flip[20] ^= 0x01
    with engine(llama32_dir, max_seq_len=64, kv_cache_tokens=64) as small, engine(llama32_dir) as eng:
        fails(eng, foreign_model, S.SnapshotMismatch)
        fails(eng, foreign_tokenizer, S.SnapshotMismatch)
        fails(eng, foreign_dtype, S.SnapshotMismatch)
        fails(eng, blob[:-1], S.SnapshotTruncated)
        fails(eng, blob[: len(blob) // 3], S.SnapshotTruncated)
        fails(eng, blob[:10], S.SnapshotTruncated)
        fails(eng, bytes(flipped), S.SnapshotCorrupt)
        fails(eng, bytes(header_flip), S.SnapshotError)
        fails(eng, blob + b"\0", S.SnapshotCorrupt)
        fails(eng, b"not a snapshot at all", S.SnapshotCorrupt)
        fails(eng, b"", S.SnapshotCorrupt)
        fails(small, blob, S.SnapshotTooLarge)            # more tokens than its max_seq_len
        with pytest.raises(S.SnapshotError):
            eng.snapshot("no-such-request")
        assert_pool_full(eng)
        assert_pool_full(small)
        eng.restore(blob)                                  # and it still serves, right
        assert eng.generate(greedy(follow))[0].tokens == expected
        assert_pool_full(eng)


def test_restore_refuses_what_the_free_blocks_cannot_hold(llama32_dir):
    with engine(llama32_dir) as first:
        blob = talk(first)[3]
    n = LLMEngine.snapshot_tokens(blob)
    with engine(llama32_dir, kv_cache_tokens=n + 16, max_seq_len=n + 16) as eng:
        holder = eng.submit(GenerationRequest(prompt_token_ids=[7] * 40, max_new_tokens=n, temperature=0,
                                              ignore_eos=True, max_tokens_per_s=20))
        while eng.stats()["kv_free_blocks"] == eng.stats()["kv_total_blocks"]:
            pass
        fails(eng, blob, S.SnapshotTooLarge)
        eng.cancel(holder.request_id)
        holder.result(timeout=60)
        assert eng.restore(blob).tokens == n
        assert_pool_full(eng)


def test_header_and_format_version_are_checked():
    identity = S.SnapshotIdentity("m", "t", "float32", 1, 1, 4)
    blob = S.encode(identity, [1, 2, 3, 4], [(torch.ones(4, 1, 4), torch.zeros(4, 1, 4))], 4)
    header, _ = S.read_header(blob)
    assert header["format"] == S.FORMAT_VERSION and header["tokens"] == 4 and header["encoding"] == "raw"
    assert S.decode(blob, identity, max_tokens=4).token_ids == [1, 2, 3, 4]
    with pytest.raises(S.SnapshotTooLarge):
        S.decode(blob, identity, max_tokens=3)
    with pytest.raises(S.SnapshotTooLarge):
        S.decode(blob, identity, max_tokens=4, max_bytes=len(blob) - 1)
    with pytest.raises(S.SnapshotMismatch):
        S.decode(blob, S.SnapshotIdentity("m", "t", "float32", 1, 1, 8), max_tokens=4)
    future = blob.replace(b'"format":2', b'"format":9')
    with pytest.raises(S.SnapshotMismatch, match="format 9"):
        S.decode(future, identity, max_tokens=4)


def test_payload_checksum_is_the_stated_weighted_sum_and_sees_any_one_bit_flip():
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 8 * 40, dtype=np.uint8)
    words = [int(w) for w in data.view("<i8")]
    want = sum((2 * i + 1) * w for i, w in enumerate(words)) % 2**64   # Python integers: no wrapping involved
    assert S.payload_checksum(torch.from_numpy(data.copy())) == want
    for bit in rng.choice(8 * data.size, 50, replace=False):
        flipped = data.copy()
        flipped[bit // 8] ^= 1 << (bit % 8)
        assert S.payload_checksum(torch.from_numpy(flipped)) != want


def test_the_payload_starts_8_aligned_and_any_changed_payload_byte_is_corrupt():
    identity = S.SnapshotIdentity("m", "t", "float32", 1, 1, 4)
    for n in (1, 3, 4, 7):
        blob = S.encode(identity, list(range(n)), [(torch.randn(n, 1, 4), torch.randn(n, 1, 4))], 4, "int8")
        header, head_len = S.read_header(blob)
        assert (len(S.MAGIC) + 4 + head_len + 4 * n) % 8 == 0
        assert S.decode(blob, identity, max_tokens=8).token_ids == list(range(n))
        start = len(S.MAGIC) + 4 + head_len + 4 * n
        for at in range(start, len(blob) - 40):
            damaged = bytearray(blob)
            damaged[at] ^= 0x80
            with pytest.raises(S.SnapshotCorrupt):
                S.decode(bytes(damaged), identity, max_tokens=8)


def test_a_snapshot_made_on_the_cpu_restores_on_this_device_and_back(llama32_dir):
    """The checksum is computed where the KV lives: a CPU blob checks on the GPU, a GPU blob on the CPU."""
    with engine(llama32_dir, device="cpu") as cpu_engine:
        _, follow, _, cpu_blob = talk(cpu_engine, encoding="int8")
    with engine(llama32_dir) as eng:
        assert eng.restore(cpu_blob).tokens == LLMEngine.snapshot_tokens(cpu_blob)
        assert eng.generate(greedy(follow))[0].usage.cached_tokens == LLMEngine.snapshot_tokens(cpu_blob)
        device_blob = talk(eng, encoding="int8")[3]
    with engine(llama32_dir, device="cpu") as cpu_engine:
        assert cpu_engine.restore(device_blob).tokens == LLMEngine.snapshot_tokens(device_blob)


def test_raw_payload_decodes_to_the_exact_kv():
    layers = [(torch.randn(5, 2, 8), torch.randn(5, 2, 8)) for _ in range(3)]
    identity = S.SnapshotIdentity("m", "t", "float32", 3, 2, 8)
    snap = S.decode(S.encode(identity, list(range(5)), layers, 4), identity, max_tokens=5)
    assert torch.equal(snap.dense(), torch.stack([t for pair in layers for t in pair]))


def test_the_uploader_puts_payloads_larger_than_its_ring_on_the_device_byte_for_byte():
    """More pieces than ring slots, a short last piece, and a second upload reusing slots whose copies may still
    be in flight."""
    uploader = S.PayloadUploader(DEVICE, threads=2)
    try:
        rng = np.random.default_rng(0)
        for size in (5 * S.PayloadUploader.PIECE + 3, 2 * S.PayloadUploader.PIECE + 5):
            data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
            out = uploader.upload(memoryview(data))
            assert out.device.type == torch.device(DEVICE).type and out.numel() == size + -size % 8
            assert out[:size].cpu().numpy().tobytes() == data and not out[size:].any()
    finally:
        uploader.close()
