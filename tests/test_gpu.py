"""The GPU fast path: Triton paged decode attention, CUDA-graph decode, bf16 agreement.

Skipped without CUDA (CI has none); `tools/gpu_check.sh` runs this file, the engine tests on
CUDA and the benchmarks on a GPU machine in one go.
"""

from __future__ import annotations

import pytest
import torch

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine

from helpers import hf_greedy, hf_logits

if not torch.cuda.is_available():
    pytest.skip("no CUDA device: the GPU fast path is tested by tools/gpu_check.sh on a GPU machine",
                allow_module_level=True)

triton = pytest.importorskip("triton", reason="Triton is not installed")
from gllm.ops.triton_attention import DecodeAttentionWorkspace, paged_decode_attention  # noqa: E402

PROMPT = "The blacksmith looked up from the anvil and said"


def reference_attention(q, k_cache, v_cache, tables, ctx_lens, scale):
    out = []
    for b in range(q.shape[0]):
        n = int(ctx_lens[b])
        blocks = tables[b, : (n + k_cache.shape[1] - 1) // k_cache.shape[1]].long()
        k = k_cache[blocks].flatten(0, 1)[:n].double()            # [n, Hkv, D]
        v = v_cache[blocks].flatten(0, 1)[:n].double()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("hd,nhd->hn", q[b].double(), k) * scale
        out.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block_size,heads,kv_heads,head_dim", [(16, 32, 8, 64), (16, 24, 8, 128), (1, 4, 2, 16),
                                                                 (32, 9, 3, 64)])
@pytest.mark.parametrize("splits", [1, 4, 16])
def test_triton_decode_attention_matches_reference(dtype, block_size, heads, kv_heads, head_dim, splits):
    torch.manual_seed(block_size * heads + splits)
    batch, width = 5, 80 // block_size + 8
    num_blocks = batch * width + 7
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(batch, heads, head_dim, device="cuda", dtype=dtype)
    ctx = torch.tensor([1, 7, 64, 33, 80 if block_size > 1 else 40], dtype=torch.int32, device="cuda")
    tables = torch.randperm(num_blocks, device="cuda")[: batch * width].view(batch, width).to(torch.int32)
    ws = DecodeAttentionWorkspace(batch, heads, head_dim, splits, torch.device("cuda"))
    scale = head_dim ** -0.5
    got = paged_decode_attention(q, k_cache, v_cache, tables, ctx, scale, ws).double()
    ref = reference_attention(q, k_cache, v_cache, tables, ctx, scale)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel


def cuda_engine(folder, **kw) -> LLMEngine:
    params = dict(block_size=16, max_batch_size=8, max_seq_len=512, dtype="float32",
                  result_cache_entries=0)   # computed, never answered from the result cache
    params.update(kw)
    return LLMEngine(folder, GeneratorParams(**params), device="cuda")


def test_graph_and_eager_paths_give_identical_tokens_and_match_transformers(llama32_dir, llama31_dir):
    torch.backends.cuda.matmul.allow_tf32 = False
    for folder in (llama32_dir, llama31_dir):
        reqs = [GenerationRequest(prompt=PROMPT * (i + 1), max_new_tokens=32, temperature=0, ignore_eos=True)
                for i in range(3)]
        with cuda_engine(folder) as graphed, cuda_engine(folder, cuda_graphs=False) as eager:
            assert graphed.runner.graph_decoder is not None and eager.runner.graph_decoder is None
            a = graphed.generate(reqs)
            b = eager.generate(reqs)
            assert [r.tokens for r in a] == [r.tokens for r in b]
            for req, r in zip(reqs, a):
                assert r.tokens == hf_greedy(folder, graphed.tokenizer.encode(req.prompt), 32)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="programmatic dependent launch needs compute capability 9.0+")
def test_dependent_launch_gives_the_same_tokens_and_logprobs(llama32_dir):
    """Decode kernels that start before the previous one ends (PDL) wait for it before reading: batches of 1, 3
    (FMA kernels) and 6 (tensor-core kernels), graphed and eager, give the bits of ordinary launches."""
    for graphs in (True, False):
        with cuda_engine(llama32_dir, dtype="bfloat16", cuda_graphs=graphs) as pdl, \
                cuda_engine(llama32_dir, dtype="bfloat16", cuda_graphs=graphs, dependent_launch=False) as plain:
            assert pdl.model.kernels.dependent_launch and not plain.model.kernels.dependent_launch
            for n in (1, 3, 6):
                reqs = [GenerationRequest(prompt=PROMPT * (i + 1), max_new_tokens=24, temperature=0, logprobs=2,
                                          ignore_eos=True) for i in range(n)]
                for a, b in zip(pdl.generate(reqs), plain.generate(reqs)):
                    assert a.tokens == b.tokens
                    assert [(lp.logprob, lp.top) for lp in a.logprobs] == [(lp.logprob, lp.top) for lp in b.logprobs]


def test_float32_logits_match_transformers_on_cuda(llama31_dir):
    """Logprobs of the chosen tokens are log_softmax of the logits: compare them within 1e-3."""
    torch.backends.cuda.matmul.allow_tf32 = False
    with cuda_engine(llama31_dir) as eng:
        r = eng.generate([GenerationRequest(prompt=PROMPT, max_new_tokens=24, temperature=0, logprobs=5,
                                            ignore_eos=True)])[0]
        ids = eng.tokenizer.encode(PROMPT)
    ref = torch.log_softmax(hf_logits(llama31_dir, ids + r.tokens), -1)[len(ids) - 1:-1]
    for step, lp in enumerate(r.logprobs):
        assert abs(lp.logprob - ref[step, lp.token_id].item()) < 1e-3
        for token, value in lp.top:
            assert abs(value - ref[step, token].item()) < 1e-3


def test_bf16_teacher_forced_top1_agreement(llama32_dir):
    """Feed transformers-bf16's own greedy continuation to gllm-bf16: top-1 agrees on >= 99% of 256 steps."""
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(llama32_dir, dtype=torch.bfloat16).cuda().eval()
    with cuda_engine(llama32_dir, dtype="bfloat16") as eng:
        ids = eng.tokenizer.encode(PROMPT)
        with torch.no_grad():
            seq = hf.generate(torch.tensor([ids], device="cuda"), max_new_tokens=256, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0].tolist()
            hf_top = hf(torch.tensor([seq], device="cuda")).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
        # gllm computes logits for every continuation position by decoding the same tokens one by one.
        ours = []

        def record(token_ids, logits):
            ours.append(int(logits.argmax()))
            forced = torch.full_like(logits, float("-inf"))
            forced[seq[len(token_ids)]] = 0.0
            return forced

        eng.generate([GenerationRequest(prompt_token_ids=ids, max_new_tokens=256, temperature=0,
                                        logits_processor=record, ignore_eos=True)])
    agree = sum(a == b for a, b in zip(ours, hf_top)) / len(hf_top)
    assert len(ours) == 256 and agree >= 0.99, agree


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_match_the_torch_path(dtype):
    from gllm.model.config import RopeConfig
    from gllm.model.llama import RMSNorm
    from gllm.model.rope import RotaryEmbedding
    from gllm.ops import triton_fused, write_kv
    torch.manual_seed(0)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    x = torch.randn(37, 576, device="cuda", dtype=dtype)
    res = torch.randn_like(x)
    norm = RMSNorm(576, 1e-5).cuda().to(dtype)
    norm.weight.data.normal_()
    want_out, want_res = norm(x, res.clone())   # the plain path (fused=False)
    got_res = res.clone()
    got_out = triton_fused.rms_norm(x, norm.weight, 1e-5, got_res)
    torch.testing.assert_close(got_res, want_res, rtol=0, atol=0)          # the sum is rounded identically
    torch.testing.assert_close(got_out, want_out, **tol)
    torch.testing.assert_close(triton_fused.rms_norm(x, norm.weight, 1e-5), norm(x), **tol)

    gate_up = torch.randn(37, 2 * 1536, device="cuda", dtype=dtype)
    gate, up = gate_up.split(1536, -1)
    torch.testing.assert_close(triton_fused.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up, **tol)

    rope = RotaryEmbedding(RopeConfig(theta=500000.0, rope_type="llama3", factor=32.0), 64, 4096).cuda()
    qkv = torch.randn(37, (9 + 2 * 3) * 64, device="cuda", dtype=dtype)
    q, k, v = qkv.split([9 * 64, 3 * 64, 3 * 64], -1)
    q, k, v = q.view(37, 9, 64), k.view(37, 3, 64), v.view(37, 3, 64)
    positions = torch.randint(0, 4000, (37,), device="cuda")
    slots = torch.randperm(20 * 16, device="cuda")[:37]
    caches = [torch.zeros(20, 16, 3, 64, device="cuda", dtype=dtype) for _ in range(4)]
    want_q, want_k = rope(positions, q, k)
    write_kv(caches[0], caches[1], want_k, v, slots)
    q_inplace = q.clone()
    triton_fused.rope_and_write_kv(q_inplace, k, v, rope.cos, rope.sin, positions, slots, caches[2], caches[3])
    torch.testing.assert_close(q_inplace, want_q, **tol)
    torch.testing.assert_close(caches[2], caches[0], **tol)
    torch.testing.assert_close(caches[3], caches[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_mixed_prefill_and_decode_attention_matches_torch_path(dtype):
    """One eager step holding a fresh prompt, a chunk over a cached prefix and two decodes."""
    from gllm.ops.attention import MixedKernelPlan, SdpaPlan, paged_attention
    torch.manual_seed(1)
    heads, kv_heads, dim, bs = 8, 2, 64, 16
    k_cache = torch.randn(64, bs, kv_heads, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q_lens, ctx_lens = [100, 37, 1, 1], [100, 170, 55, 9]
    tables = torch.randperm(64, device="cuda")[: 4 * 12].view(4, 12)
    q = torch.randn(sum(q_lens), heads, dim, device="cuda", dtype=dtype)

    ctx = torch.tensor(ctx_lens, device="cuda")
    want = paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, ctx, SdpaPlan(q_lens, ctx_lens),
                           dim ** -0.5)
    plan = MixedKernelPlan.build(q_lens, ctx_lens, tables, ctx, heads, kv_heads, dim)
    got = paged_attention(q, k_cache, v_cache, tables, ctx, plan, dim ** -0.5).double()
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < (1e-5 if dtype == torch.float32 else 1e-2), rel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_attention_split_over_keys_matches_reference(dtype):
    """Short chunks over long cached prefixes split each tile's keys over programs; every split count gives
    the reference, including splits that some rows cannot see (all their keys lie past the row's position)."""
    import dataclasses

    from gllm.ops.attention import PrefillKernelPlan, SdpaPlan, paged_attention
    from gllm.ops.triton_prefill import PrefillPlan, prefill_partials
    torch.manual_seed(2)
    heads, kv_heads, dim, bs = 8, 2, 64, 16
    k_cache = torch.randn(200, bs, kv_heads, dim, device="cuda", dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q_lens, ctx_lens = [20, 5, 70], [900, 300, 70]
    tables = torch.randperm(200, device="cuda")[: 3 * 60].view(3, 60).to(torch.int32)
    q = torch.randn(sum(q_lens), heads, dim, device="cuda", dtype=dtype)
    ctx = torch.tensor(ctx_lens, device="cuda")
    want = paged_attention(q.double(), k_cache.double(), v_cache.double(), tables, ctx, SdpaPlan(q_lens, ctx_lens),
                           dim ** -0.5)
    plan = PrefillPlan.build([0, 1, 2], [0, 20, 25], q_lens, ctx_lens, heads, dim, torch.device("cuda"))
    assert plan.num_splits > 1    # 4 tiles x 8 heads over 900 keys: the GPU wants more programs
    for splits in (1, 2, 4, 8):
        split_plan = PrefillKernelPlan(dataclasses.replace(plan, num_splits=splits, partials=prefill_partials(
            plan.num_tiles, heads, dim, splits, torch.device("cuda"))))
        got = paged_attention(q, k_cache, v_cache, tables, ctx, split_plan, dim ** -0.5).double()
        rel = ((got - want).norm() / want.norm()).item()
        assert rel < (1e-5 if dtype == torch.float32 else 1e-2), (splits, rel)


def test_prefill_graphs_give_the_eager_tokens_for_chunked_cached_and_batched_prompts(llama32_dir):
    """Prefill-only steps replay captured graphs (padded token counts, several chunks, cached prefixes, later
    chunks of a long prompt); tokens and logprobs equal the all-eager engine's."""
    torch.backends.cuda.matmul.allow_tf32 = False
    story = " ".join([PROMPT] * 12)
    first = [GenerationRequest(prompt=story + f" and then {w}", max_new_tokens=8, temperature=0, ignore_eos=True,
                               logprobs=2) for w in ("left", "stayed", "sang")]
    again = [GenerationRequest(prompt=story + f" until {w}", max_new_tokens=8, temperature=0, ignore_eos=True,
                               logprobs=2) for w in ("dawn", "noon")]
    with cuda_engine(llama32_dir, max_step_tokens=96) as graphed, \
            cuda_engine(llama32_dir, max_step_tokens=96, cuda_graphs=False) as eager:
        prefill = graphed.runner.prefill_graphs
        assert prefill is not None and eager.runner.prefill_graphs is None
        assert prefill.token_sizes == [16, 32, 64, 96]
        results, replays = {}, []
        for name, eng in (("graphed", graphed), ("eager", eager)):
            a = eng.generate(first)       # 3 x ~125 tokens in 96-token steps: the first two steps are prefill-only
            replays.append(prefill.num_replays)
            b = eng.generate(again)       # both prompts' uncached tails in one prefill-only step
            replays.append(prefill.num_replays)
            assert all(r.usage.cached_tokens > 0 for r in b)
            results[name] = [(r.tokens, [lp.logprob for lp in r.logprobs]) for r in a + b]
        assert replays[0] >= 2 and replays[1] > replays[0] and replays[2] == replays[3] == replays[1]
        for (tokens_g, lps_g), (tokens_e, lps_e) in zip(results["graphed"], results["eager"]):
            assert tokens_g == tokens_e
            assert lps_g == pytest.approx(lps_e, abs=1e-4)
    with cuda_engine(llama32_dir, prefill_graph_tokens=0) as no_prefill_graphs:
        assert no_prefill_graphs.runner.prefill_graphs is None
        assert no_prefill_graphs.runner.graph_decoder is not None


def test_triton_argmax_matches_torch_with_ties_and_masked_rows():
    from gllm.sampling.triton_argmax import argmax
    torch.manual_seed(0)
    for rows, vocab in ((1, 128256), (3, 1000), (70, 4096 * 3 + 17)):
        logits = torch.randn(rows, vocab + 5, device="cuda")[:, :vocab]   # a padded view, as the sampler passes
        logits[0, [7, vocab - 1]] = 1e4                                     # a tie: the smaller index wins
        if rows > 2:
            logits[1] = float("-inf")                                      # a fully masked row gives 0
            logits[2, vocab - 3:] = 50.0                                   # a tie at the far end
        got = argmax(logits)
        assert got.dtype == torch.int64
        assert torch.equal(got, logits.argmax(dim=-1)), (rows, vocab)
    out = torch.full((5,), -7, dtype=torch.int64, device="cuda")
    logits = torch.randn(3, 128256, device="cuda")
    assert argmax(logits, out=out[:3]).data_ptr() == out.data_ptr()
    assert out[:3].tolist() == logits.argmax(dim=-1).tolist() and out[3:].tolist() == [-7, -7]
    with pytest.raises(ValueError, match="out must be"):
        argmax(logits, out=out[:2])


@pytest.mark.parametrize("dependent_launch", [False, True])
def test_embed_tokens_takes_gathered_rows_from_the_source_and_the_others_from_input_ids(dependent_launch):
    from gllm.ops.triton_embedding import embed_tokens
    if dependent_launch and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs compute capability 9.0+")
    weight = torch.randn(200, 2050, device="cuda", dtype=torch.bfloat16)
    source = torch.tensor([100, 101, 102, 103], device="cuda")
    ids = torch.tensor([5, 6, 7, 8, 9], device="cuda")
    got = embed_tokens(weight, ids, torch.tensor([2, -1, 0, 2, -1], device="cuda"), source, dependent_launch)
    assert torch.equal(got, weight[[102, 6, 100, 102, 9]])
    with pytest.raises(ValueError, match="gather_rows"):
        embed_tokens(weight, ids, torch.tensor([0], device="cuda"), source)


def test_graph_greedy_tokens_and_run_ahead_inputs_match_eager_for_mixed_sampling(llama32_dir):
    """Decode graphs end with the greedy argmax into the buffer the next graph gathers its inputs from. Mixed
    batches take that path partly (greedy rows beside seeded sampled rows, rows leaving at different lengths),
    or not at all (a penalty: no run-ahead; all rows sampled: the sampler's tokens copied in); graphed and
    eager engines give the same tokens either way."""
    def requests(with_penalty: bool) -> list[GenerationRequest]:
        reqs = [GenerationRequest(prompt=PROMPT * (i + 1), max_new_tokens=10 + 4 * i, ignore_eos=True,
                                  temperature=0 if i % 2 == 0 else 0.8, seed=i, logprobs=1 if i == 1 else None)
                for i in range(5)]
        if with_penalty:
            reqs.append(GenerationRequest(prompt=PROMPT, max_new_tokens=12, temperature=0, ignore_eos=True,
                                          repetition_penalty=1.3))
        return reqs

    all_sampled = [GenerationRequest(prompt=PROMPT * (i + 1), max_new_tokens=12, temperature=0.7, seed=10 + i,
                                     ignore_eos=True) for i in range(3)]
    with cuda_engine(llama32_dir) as graphed, cuda_engine(llama32_dir, cuda_graphs=False) as eager:
        for reqs in (requests(False), requests(True), all_sampled, requests(False)[:1]):
            a, b = graphed.generate(reqs), eager.generate(reqs)
            assert [r.tokens for r in a] == [r.tokens for r in b]
        assert graphed.num_steps_ahead > 0


def test_fused_race_gives_the_torch_race_tokens_with_masks_greedy_rows_and_ties():
    """The kernel computes the same float32 scores as the torch formula (IEEE division, libdevice log): the same
    tokens, for sampled and greedy rows, masked or not, on a padded view and a vocabulary no chunk divides."""
    from gllm.sampling.grammar import unpack_masks
    from gllm.sampling.noise import NoiseTable, row_key
    from gllm.sampling.triton_race import race
    torch.manual_seed(0)
    for rows, vocab in ((1, 128256), (16, 128256), (7, 4096 * 2 + 45)):
        noise = NoiseTable(vocab, "cuda")
        logits = (torch.randn(rows, vocab + 3, device="cuda") * 4)[:, :vocab]
        temps = torch.tensor([[0.8, 1.0, 0.0, 1.7, 0.3][i % 5] for i in range(rows)], device="cuda")
        for step in range(6):
            keys = torch.tensor([row_key(1000 + i, step) for i in range(rows)], device="cuda")
            kernel_keys = keys.to(torch.int32) if step % 2 else keys   # the sampler passes int32 words
            words = (vocab + 31) // 32
            masks = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, device="cuda")
            masks[2] = 0                      # nothing allowed: token 0, as an argmax over -inf gives
            mask_rows = torch.tensor([[-1, 0, 1, 2][i % 4] for i in range(rows)], dtype=torch.int32, device="cuda")
            allowed = unpack_masks(masks, vocab, torch.arange(32, dtype=torch.int32, device="cuda"))
            scores = torch.where(temps[:, None] > 0, logits / temps.clamp_min(1e-30)[:, None]
                                 - noise.exponential(keys).log(), logits)
            for with_masks in (False, True):
                want = scores.clone()
                if with_masks:
                    has = mask_rows >= 0
                    want[has] = want[has].masked_fill(~allowed[mask_rows[has].long()], float("-inf"))
                got = race(logits, temps, kernel_keys, noise.token_hash, masks if with_masks else None,
                           mask_rows if with_masks else None)
                assert got.tolist() == want.argmax(-1).tolist(), (rows, vocab, step, with_masks)


def test_cuda_sampler_draws_the_cpu_sampler_tokens_for_masked_mixed_batches():
    """The fused path (CUDA) and the torch path (CPU) draw the same tokens: seeded noise depends only on (seed,
    step, token), and masks, greedy rows and temperatures mean the same on both."""
    from gllm.sampling.params import SamplingParams
    from gllm.sampling.sampler import Sampler, SampleRow
    vocab = 128256
    cpu, gpu = Sampler(vocab, "cpu"), Sampler(vocab, "cuda")
    assert gpu._fused_race is not None
    torch.manual_seed(1)
    words = (vocab + 31) // 32
    masks = torch.randint(-2**31, 2**31 - 1, (2, words), dtype=torch.int32)
    masks[1, 100:] = 0                       # a narrow mask: only tokens below 3,200
    for step in range(8):
        logits = torch.randn(6, vocab) * 3
        params = [SamplingParams(temperature=t) for t in (0.8, 0.0, 1.2, 0.0, 0.6, 1.0)]
        mask_rows = [0, 1, None, 0, 1, None]
        rows = [SampleRow(p, 50 + i, step, [1], [], mask_row=m) for i, (p, m) in enumerate(zip(params, mask_rows))]
        want = cpu.sample(logits, rows, masks).token_ids
        got = gpu.sample(logits.cuda(), rows, masks).token_ids
        assert got == want, step
        free = [SampleRow(p, 50 + i, step, [1], []) for i, p in enumerate(params)]
        assert gpu.sample(logits.cuda(), free).token_ids == cpu.sample(logits, free).token_ids
