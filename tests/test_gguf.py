"""GGUF loading against transformers on real inputs.

- The real default model (SmolLM2-135M-Instruct, Q4_1/Q8_0/F32): logits and greedy tokens against
  `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, the tokenizer against transformers'.
- A GGUF the test writes itself with `gguf.GGUFWriter` from the tiny random Llama 3.2 fixture, the
  way llama.cpp's converter does (Q/K rows permuted, llama3 rope as `rope_freqs.weight`, Q8_0 and
  F16 tensors, Llama 3 tokenizer metadata): against transformers and the original tokenizer.
- Errors: a missing file, a truncated file, a non-llama architecture, an unsupported tokenizer.
"""

from __future__ import annotations

import json
import math
import random
import unicodedata
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gllm.formats.gguf import FastGGUFReader, read_gguf_metadata
from gllm.model.gguf_loader import load_gguf, unpermute_qk
from gllm.model.rope import rope_inv_freq
from gllm.tokenizer import Tokenizer
from gllm.tokenizer.gguf_tokenizer import tokenizer_from_gguf

from helpers import Stepper, hf_model

MAX_POSITIONS = 512
MESSAGES = [
    {"role": "system", "content": "You are Mara, the blacksmith of Eldham. Answer in character, briefly."},
    {"role": "user", "content": "Good morning! My sword cracked fighting wolves near the old mill. "
                                "Can you mend it before tonight's festival?"},
]


def _fast_gguf_reader(monkeypatch) -> None:
    """Let transformers' GGUF loading use the reader gllm uses (the same parser over a plain
    ndarray view of the memory map instead of numpy.memmap slices): same values, ~3x faster."""
    monkeypatch.setattr(gguf, "GGUFReader", FastGGUFReader)


@pytest.fixture(scope="module")
def monkeymodule():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# --- the real SmolLM2 GGUF --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    model, cfg, info = load_gguf(smollm2_gguf, dtype=torch.float32, device="cpu", max_positions=MAX_POSITIONS)
    return model, cfg, tokenizer_from_gguf(info)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_gguf, monkeymodule):
    from transformers import AutoModelForCausalLM

    _fast_gguf_reader(monkeymodule)
    return AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def smollm2_hf_tokenizer(smollm2_gguf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)


def test_smollm2_config(smollm2):
    _, cfg, tok = smollm2
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.head_dim, cfg.intermediate_size) == (49152, 64, 1536)
    assert cfg.tie_word_embeddings and cfg.rope.rope_type == "default" and cfg.rope.theta == 100000.0
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == (2,)
    assert tok.bos_token_id == 1 and tok.eos_token_ids[0] == 2 and tok.id_to_token(2) == "<|im_end|>"
    assert tok.encode("hi") == tok.encode("hi", add_special_tokens=False)  # add_bos_token is false


def test_smollm2_logits_and_greedy_match_transformers(smollm2, smollm2_hf, smollm2_hf_tokenizer):
    model, _, tok = smollm2
    prompt_text = tok.apply_chat_template(MESSAGES)
    assert prompt_text == smollm2_hf_tokenizer.apply_chat_template(MESSAGES, tokenize=False,
                                                                   add_generation_prompt=True)
    ids = tok.encode_chat(MESSAGES)
    assert 45 <= len(ids) <= 70
    stepper = Stepper(model, block_size=16)
    got = stepper.feed(ids)
    with torch.no_grad():
        ref = smollm2_hf(torch.tensor([ids])).logits[0].float()
    diff = (got - ref).abs().max().item()
    print(f"SmolLM2 GGUF prefill over {len(ids)} tokens: max |logit diff| = {diff:.3g}")
    assert diff <= 1e-3

    n = 48
    with torch.no_grad():
        out = smollm2_hf.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                  pad_token_id=0, top_k=None, top_p=None, temperature=None)
    expected = out[0, len(ids):].tolist()
    tokens = [int(got[-1].argmax())]
    while len(tokens) < n:
        tokens.append(int(stepper.feed([tokens[-1]])[-1].argmax()))
    assert tokens == expected
    assert tok.decode(tokens).strip()


# --- tokenizer corpus -------------------------------------------------------------------------------

HAND_WRITTEN = [
    "", " ", "  ", "\t", "\n", "\n\n", "\r\n", " \n ", "\n\n\n\n", "   leading", "trailing   ", "a  b   c    d",
    "tab\there", "tabs\t\t\tand  spaces \t mixed", "line one\nline two\n\nline four", "windows\r\nnewlines\r\n",
    "Hello world!", "Hello, World! How are you?", "it's I'm we're they've he'll she'd", "IT'S I'M WE'RE THEY'VE",
    "1", "12", "123", "1234", "12345", "3.14159", "1,000,000", "2024-06-01", "0x1F600", "1e-10", "-42",
    "Call 555-0199 or +44 20 7946 0958", "99 bottles of beer", "Version 1.2.3-rc4", "2**10 = 1024",
    "1234567890123456789012345678901234567890", "Room 101, floor 7",
    "def f(x):\n    return x * 2\n", "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "if __name__ == \"__main__\":\n\tmain()", "SELECT * FROM users WHERE id = 42;", "<div class=\"npc\">Hi</div>",
    "x => x.map((y) => y + 1)", "#include <stdio.h>\nint main() { printf(\"%d\\n\", 7); }",
    "// comment\n/* block */", "a_b-c.d/e\\f", "~!@#$%^&*()_+`-={}|[]\\:\";'<>?,./",
    "😀", "👍🏽", "👨‍👩‍👧‍👦", "🎉🎉🎉 party", "I ❤️ NY", "♠♥♦♣", "→ ← ↑ ↓",
    "日本語のテキストです。", "中文文本，包括标点。", "한국어 텍스트", "Привет, мир!", "Γειά σου Κόσμε",
    "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया", "ภาษาไทย", "Café déjà vu, naïve façade, Ærø, Øresund",
    "Ünïcödé wïth äccents: àéîõü ÀÉÎÕÜ ñ ß ç", "Zürich–Genève — «quoted»", "non\u00a0breaking\u00a0space",
    "zero\u200bwidth", "combining e\u0301 vs é", "ﬁ ligature", "ｆｕｌｌｗｉｄｔｈ", "½ ¼ ¾ ² ³ ٣ ४ Ⅷ",
    "The wizard said: \"You shall not pass!\"", "...", "!!!???", "----", "====", "'quoted' \"double\"",
    "ALL CAPS SHOUTING", "camelCaseIdentifier", "snake_case_identifier", "kebab-case-identifier",
    "https://example.com/path?q=1&r=2#frag", "user@example.com",
]


def build_corpus(special_tokens: list[str]) -> list[str]:
    """The hand-written strings, chat-formatted text with the model's special tokens, and seeded
    random mixtures of words, numbers, punctuation, whitespace runs and non-Latin scripts."""
    rng = random.Random(1234)
    words = ["the", "blacksmith", "forge", "Eldham", "sword", "wolves", "festival", "quest", "gold", "don't",
             "She'll", "HP", "XP", "naïve", "café", "über", "東京", "дракон", "λόγος", "🐉", "⚔️", "🔥"]
    pieces = words + ["42", "007", "3.5", "1000000", "1,234", " ", "  ", "\t", "\n", "\n\n", "\r\n", "   ",
                      ".", ",", "!", "?", "...", "--", "()", "{}", "[x]", "<>", "'s", "'LL", "#", "$", "%"]
    corpus = list(HAND_WRITTEN)
    for tok in special_tokens:
        corpus += [tok, f"{tok}text{tok}", f" {tok} ", f"before{tok}\nafter"]
    for _ in range(150):
        n = rng.randint(1, 14)
        corpus.append("".join(rng.choice(pieces) + (" " if rng.random() < 0.5 else "") for _ in range(n)))
    for _ in range(20):
        corpus.append(" " * rng.randint(1, 9) + "\n" * rng.randint(0, 3) + "\t" * rng.randint(0, 2)
                      + str(rng.randint(0, 10 ** rng.randint(1, 15))) + " " * rng.randint(0, 4))
    return corpus


def chat_strings(tok: Tokenizer) -> list[str]:
    convs = [MESSAGES, [{"role": "user", "content": "Where is the inn?"}],
             [{"role": "user", "content": "Sell me 3 potions."}, {"role": "assistant", "content": "30 gold."},
              {"role": "user", "content": "Deal!\n\nHere:  💰💰💰"}]]
    return [tok.apply_chat_template(c, add_generation_prompt=g) for c in convs for g in (True, False)]


def has_numeric(text: str) -> bool:
    return any(unicodedata.category(c).startswith("N") for c in text)


def test_smollm2_runs_on_its_own_q4_1_blocks_without_a_copy_on_disk(smollm2, smollm2_gguf, tmp_path, monkeypatch):
    """The default model kept in its Q4_1 blocks: a 300-token prefill in float32 (the wide products: weights
    dequantized from the blocks; torch's int4 kernel in float32 is unvectorized and takes ~45 s) gives the
    logits of the model dequantized by gguf within float32 rounding; through the engine (the int4 kernel,
    bfloat16 products), the same 16 greedy tokens as that model; and the engine writes nothing to gllm's
    cache."""
    from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
    from gllm.formats.gguf_quants import PLANE_TYPES
    from gllm.model.quantized import QuantizedLinear
    reference, _, tok = smollm2
    kept = load_gguf(smollm2_gguf, dtype=torch.float32, device="cpu", max_positions=MAX_POSITIONS,
                     keep_types=PLANE_TYPES, compute_dtype=torch.float32)[0]
    assert sum(isinstance(m, QuantizedLinear) for m in kept.layers.modules()) == 4 * 30
    assert isinstance(kept.lm_head, QuantizedLinear) and kept.lm_head.scheme == "Q8_0"   # the tied head too
    ids = tok.encode_chat(MESSAGES)
    long = (ids * 6)[:300]
    got, want = Stepper(kept, 16).feed(long), Stepper(reference, 16).feed(long)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()

    stepper, greedy = Stepper(reference, 16), []
    logits = stepper.feed(ids)
    for _ in range(16):
        greedy.append(int(logits[-1].argmax()))
        logits = stepper.feed(greedy[-1:])
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("GLLM_HOME", str(home))
    params = GeneratorParams(max_seq_len=256, max_batch_size=1, dtype="float32")
    with LLMEngine(str(smollm2_gguf), params, device="cpu") as eng:
        assert eng.weight_format.startswith("120 Q4_1 projections (GGUF blocks kept as they are)")
        request = GenerationRequest(prompt_token_ids=ids, max_new_tokens=16, temperature=0, ignore_eos=True)
        assert eng.generate([request])[0].tokens == greedy
    assert not any(home.rglob("*"))


def test_loading_the_default_model_holds_little_beyond_its_weights(smollm2_gguf):
    """In a fresh process, loading the default model's GGUF in its blocks: the peak resident memory grows by at
    most its weights, the file's size (its pages are read) and 96 MB (it grew by ~570 MB before the loader
    gave back what each tensor's decoding freed: ~290 now against 175 MB of weights and a 98 MB file); the
    file's pages are out of the resident set afterwards; and sympy (which torch's meta-device paths import with
    ~900 other modules, ~75 MB) was never imported."""
    import json
    import subprocess
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    code = (
        "import json, sys, torch\n"
        "from gllm.formats.gguf_quants import PLANE_TYPES\n"
        "from gllm.model.gguf_loader import load_gguf\n"
        "from gllm.model.quantized import weight_bytes\n"
        "def status(key):\n"
        "    return next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith(key + ':'))\n"
        "before = status('VmRSS')\n"
        "model = load_gguf(sys.argv[1], dtype=torch.bfloat16, device='cpu', max_positions=1024,\n"
        "                  keep_types=PLANE_TYPES, compute_dtype=torch.bfloat16)[0]\n"
        "print(json.dumps([status('VmHWM') - before, weight_bytes(model), status('RssFile'),\n"
        "                  'sympy' in sys.modules]))\n")
    out = subprocess.run([sys.executable, "-c", code, str(smollm2_gguf)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    grown, weights, file_resident, sympy = json.loads(out.stdout.strip().splitlines()[-1])
    size = smollm2_gguf.stat().st_size
    assert grown <= weights + size + (96 << 20), (grown >> 20, weights >> 20, size >> 20)
    assert not sympy
    assert file_resident < 2 * size     # the libraries' pages, not the file's as well (98 MB)


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_hf_tokenizer):
    """Same ids as transformers' GGUF tokenizer, and decoding gives the text back.

    One known difference: llama.cpp's `smollm` pre-tokenizer (like SmolLM2's own tokenizer.json,
    `Digits(individual_digits=True)` before `ByteLevel`) cuts the text before and after every
    numeric character first; transformers' GGUF tokenizer skips that step. So `"\\r\\n 007"` is
    `\\r\\n␠|0|0|7` in llama.cpp and `\\r\\n|␠|0|0|7` in transformers, and `½`/`²`/`٣` merge
    differently. Text with no numeric character must give identical ids; every text must give
    the ids of the original layout: transformers' vocabulary and merges with the digit split put back.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import pre_tokenizers

    _, _, tok = smollm2
    ref = smollm2_hf_tokenizer
    specials = ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]
    corpus = build_corpus(specials) + chat_strings(tok)
    assert len(corpus) >= 200
    original = HFTokenizer.from_str(ref.backend_tokenizer.to_str())
    original.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    differs = []
    for text in corpus:
        ids = tok.encode(text)
        assert ids == original.encode(text).ids, text
        if ids != ref.encode(text, add_special_tokens=True):
            differs.append(text)
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False,
                                                                        clean_up_tokenization_spaces=False)
    assert not [t for t in differs if not has_numeric(t)]
    print(f"SmolLM2 tokenizer: {len(corpus)} strings, {len(corpus) - len(differs)} identical to transformers, "
          f"{len(differs)} differ only by smollm's digit split")
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.encode("forge\r\n 007") == original.encode("forge\r\n 007").ids


# --- a GGUF written by the test from the tiny random Llama 3.2 model ---------------------------------


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's rotate-half halves."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's rope_freqs for rope_type llama3: one divisor per frequency."""
    base, factor = rope["rope_theta"], rope["factor"]
    low, high, old_len = rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"]
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out.append(1.0)
        elif wavelen > old_len / low:
            out.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def llama3_vocab(tokenizer_dir: Path) -> tuple[list[str], list[int], list[str]]:
    """Tokens, token types and merges as llama.cpp's converter writes them (get_vocab_base)."""
    data = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    added = {t["id"]: t for t in data["added_tokens"]}
    size = max(list(vocab.values()) + list(added)) + 1
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    return tokens, [int(t) for t in types], merges


# Which tensors the written file stores in which type (norms are F32, as llama.cpp keeps them).
TENSOR_TYPES = {"token_embd": "Q8_0", "attn_q": "Q8_0", "attn_k": "F16", "attn_v": "Q8_0", "attn_output": "F16",
                "ffn_gate": "Q8_0", "ffn_up": "F16", "ffn_down": "Q8_0"}


def write_llama3_gguf(path: Path, model_dir: Path, tokenizer_dir: Path, *, arch: str = "llama") -> Path:
    cfg = json.loads((model_dir / "config.json").read_text())
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    state = load_file(str(model_dir / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["head_dim"]
    tokens, types, merges = llama3_vocab(tokenizer_dir)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny-llama32-test")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(cfg["vocab_size"])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index(tok_cfg["bos_token"]))
    w.add_eos_token_id(tokens.index(tok_cfg["eos_token"]))
    w.add_add_bos_token(True)
    w.add_chat_template(tok_cfg["chat_template"])

    def add(name: str, t: torch.Tensor, qtype: str) -> None:
        arr = t.float().numpy()
        q = getattr(gguf.GGMLQuantizationType, qtype)
        # Block-quantized data is uint8 rows; the writer derives the element shape from raw_dtype.
        data = gguf.quants.quantize(arr, q)
        w.add_tensor(name, data, raw_dtype=q if data.dtype == np.uint8 else None)

    w_names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
               "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
    add("rope_freqs.weight", torch.from_numpy(llama3_rope_factors(cfg["rope_parameters"], head_dim)), "F32")
    add("token_embd.weight", state["model.embed_tokens.weight"], TENSOR_TYPES["token_embd"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", state[p + "input_layernorm.weight"], "F32")
        add(f"blk.{i}.ffn_norm.weight", state[p + "post_attention_layernorm.weight"], "F32")
        for hf_name, g_name in w_names.items():
            part = "self_attn" if hf_name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            t = state[f"{p}{part}.{hf_name}.weight"]
            if hf_name == "q_proj":
                t = llama_cpp_permute(t, heads)
            elif hf_name == "k_proj":
                t = llama_cpp_permute(t, kv_heads)
            add(f"blk.{i}.{g_name}.weight", t, TENSOR_TYPES[g_name])
    add("output_norm.weight", state["model.norm.weight"], "F32")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def llama3_gguf(tmp_path_factory, llama32_dir, tokenizer_dir) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    return write_llama3_gguf(folder / "tiny-llama32-q8_0.gguf", llama32_dir, tokenizer_dir)


@pytest.fixture(scope="module")
def llama3_gllm(llama3_gguf):
    return load_gguf(llama3_gguf, dtype=torch.float32, device="cpu", max_positions=MAX_POSITIONS)


@pytest.fixture(scope="module")
def llama3_hf(llama3_gguf, llama32_dir, monkeymodule):
    from transformers import AutoModelForCausalLM

    _fast_gguf_reader(monkeymodule)
    path = llama3_gguf
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    # transformers reads no rope scaling from a llama GGUF (it skips rope_freqs.weight), so it would
    # run Llama 3.2 with plain RoPE. Give it the frequencies transformers itself computes for the
    # original config; everything else it takes from the file.
    reference = hf_model(llama32_dir).model.rotary_emb
    model.model.rotary_emb.inv_freq.copy_(reference.inv_freq)
    model.model.rotary_emb.original_inv_freq.copy_(reference.original_inv_freq)
    return model


def test_written_gguf_config_and_weights(llama3_gllm, llama32_dir):
    model, cfg, info = llama3_gllm
    original = json.loads((llama32_dir / "config.json").read_text())
    assert set(info.type_counts()) == {"Q8_0", "F16", "F32"}
    assert cfg.vocab_size == 128256 and cfg.head_dim == 16 and cfg.tie_word_embeddings
    rope = original["rope_parameters"]
    assert (cfg.rope.rope_type, cfg.rope.theta, cfg.rope.factor) == ("llama3", rope["rope_theta"], rope["factor"])
    assert (cfg.rope.low_freq_factor, cfg.rope.high_freq_factor, cfg.rope.original_max_position_embeddings) == \
        (rope["low_freq_factor"], rope["high_freq_factor"], rope["original_max_position_embeddings"])
    ref_rope = hf_model(llama32_dir).model.rotary_emb.inv_freq
    assert torch.allclose(rope_inv_freq(cfg.rope, cfg.head_dim), ref_rope.float(), rtol=0, atol=1e-12)
    assert cfg.bos_token_id == 128000 and cfg.eos_token_ids == (128009,)

    # Q/K rows are back in HF order: F16-stored k_proj equals the original to F16 precision, and
    # the Q8_0-stored q_proj to Q8_0 precision; left permuted they would be off by the weights' size.
    state = load_file(str(llama32_dir / "model.safetensors"))
    q_size, kv_size = cfg.q_size, cfg.kv_size
    qkv = model.layers[1].self_attn.qkv_proj.weight
    q_ref, k_ref = state["model.layers.1.self_attn.q_proj.weight"], state["model.layers.1.self_attn.k_proj.weight"]
    assert (qkv[q_size:q_size + kv_size] - k_ref).abs().max() < 1e-3
    assert (qkv[:q_size] - q_ref).abs().max() < q_ref.abs().max() / 100
    assert (qkv[:q_size] - llama_cpp_permute(q_ref, 4)).abs().max() > q_ref.abs().max() / 10
    assert np.array_equal(unpermute_qk(llama_cpp_permute(q_ref, 4).numpy(), 4), q_ref.numpy())


def test_written_gguf_matches_transformers(llama3_gllm, llama3_hf):
    model, _, _ = llama3_gllm
    prompt = [128000, 9906, 1070, 11, 1268, 527, 499, 3815, 3432, 30, 358, 1097, 7060, 13, 578, 4062, 14198,
              39935, 35308, 927, 279, 16053, 5679, 13] * 2
    n = 24
    with torch.no_grad():
        out = llama3_hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, top_k=None, top_p=None, temperature=None)[0].tolist()
        ref = llama3_hf(torch.tensor([out])).logits[0].float()
    continuation = out[len(prompt):]
    stepper = Stepper(model, block_size=16)
    got = [stepper.feed(prompt)] + [stepper.feed([t]) for t in continuation]
    got = torch.cat(got)
    diff = (got - ref).abs().max().item()
    print(f"written Llama 3 GGUF (Q8_0/F16): max |logit diff| = {diff:.3g}")
    assert diff <= 1e-3
    assert got[len(prompt) - 1:-1].argmax(-1).tolist() == continuation


def test_written_gguf_tokenizer_matches_llama3(llama3_gllm, tokenizer_dir):
    tok = tokenizer_from_gguf(llama3_gllm[2])  # the file info load_gguf returned: no second parse
    original = Tokenizer.from_dir(tokenizer_dir)
    assert tok.vocab_size == original.vocab_size == 128256
    assert tok.bos_token_id == 128000
    # EOS first, then the control tokens llama.cpp also ends a generation on; this tokenizer is
    # Llama 3.0's, where 128008 is a reserved token rather than <|eom_id|>.
    assert tok.eos_token_ids[0] == 128009 and set(tok.eos_token_ids) == {128001, 128009}
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                "<|reserved_special_token_7|>"]
    corpus = build_corpus(specials) + chat_strings(original)
    assert len(corpus) >= 200
    for text in corpus:
        ids = tok.encode(text)
        assert ids == original.encode(text), text
        assert ids[0] == 128000  # add_bos_token
        assert tok.encode(text, add_special_tokens=False) == original.encode(text, add_special_tokens=False)
        assert tok.decode(ids[1:], skip_special_tokens=False) == text
    assert tok.apply_chat_template(MESSAGES) == original.apply_chat_template(MESSAGES)
    assert tok.encode_chat(MESSAGES) == original.encode_chat(MESSAGES)


# --- errors ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    path = tmp_path / "nope.gguf"
    with pytest.raises(FileNotFoundError, match=r"GGUF file .*nope\.gguf.* not found"):
        load_gguf(path, dtype="float32", device="cpu", max_positions=16)
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        tokenizer_from_gguf(path)


def _tiny_gguf(path: Path, arch: str = "llama", tokenizer_model: str = "gpt2", pre: str = "llama-bpe",
               qtypes: dict[str, str] | None = None) -> Path:
    """A complete one-layer llama GGUF with a 6-token vocabulary (random weights, F32 unless
    ``qtypes`` maps a tensor to another GGML type)."""
    rng = np.random.default_rng(0)
    hidden, ffn, vocab = 32, 64, 6
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(["a", "b", "ab", "Ġ", "<s>", "</s>"])
    w.add_token_types([1, 1, 1, 1, 3, 3])
    w.add_token_merges(["a b"])
    w.add_bos_token_id(4)
    w.add_eos_token_id(5)
    shapes = {"token_embd": (vocab, hidden), "output_norm": (hidden,), "blk.0.attn_norm": (hidden,),
              "blk.0.ffn_norm": (hidden,), "blk.0.attn_q": (hidden, hidden), "blk.0.attn_k": (16, hidden),
              "blk.0.attn_v": (16, hidden), "blk.0.attn_output": (hidden, hidden), "blk.0.ffn_gate": (ffn, hidden),
              "blk.0.ffn_up": (ffn, hidden), "blk.0.ffn_down": (hidden, ffn)}
    for name, shape in shapes.items():
        q = getattr(gguf.GGMLQuantizationType, (qtypes or {}).get(name, "F32"))
        data = gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), q)
        w.add_tensor(f"{name}.weight", data, raw_dtype=q if data.dtype == np.uint8 else None)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_tiny_gguf_loads(tmp_path):
    qtypes = {"token_embd": "BF16", "blk.0.attn_q": "Q4_0", "blk.0.attn_k": "Q5_1", "blk.0.attn_v": "Q4_1",
              "blk.0.ffn_up": "Q5_0", "blk.0.ffn_down": "F16", "blk.0.attn_output": "Q8_0"}
    path = _tiny_gguf(tmp_path / "tiny.gguf", qtypes=qtypes)
    model, cfg, info = load_gguf(path, dtype="float32", device="cpu", max_positions=16)
    assert (cfg.vocab_size, cfg.head_dim, cfg.num_key_value_heads, cfg.tie_word_embeddings) == (6, 16, 1, True)
    assert info.type_counts() == {"F32": 4, "BF16": 1, "Q4_0": 1, "Q5_1": 1, "Q4_1": 1, "Q5_0": 1, "F16": 1, "Q8_0": 1}
    # Each type lands in HF layout with gguf's own dequantized values (Q/K also un-permuted).
    reader = gguf.GGUFReader(path)
    stored = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert np.array_equal(model.embed_tokens.weight.numpy(), stored["token_embd.weight"])
    assert np.array_equal(attn.qkv_proj.weight[:32].numpy(), unpermute_qk(stored["blk.0.attn_q.weight"], 2))
    assert np.array_equal(attn.qkv_proj.weight[32:48].numpy(), unpermute_qk(stored["blk.0.attn_k.weight"], 1))
    assert np.array_equal(attn.qkv_proj.weight[48:].numpy(), stored["blk.0.attn_v.weight"])
    assert np.array_equal(mlp.gate_up_proj.weight[64:].numpy(), stored["blk.0.ffn_up.weight"])
    assert np.array_equal(mlp.down_proj.weight.numpy(), stored["blk.0.ffn_down.weight"])
    assert np.array_equal(attn.o_proj.weight.numpy(), stored["blk.0.attn_output.weight"])
    del reader
    model16, _, _ = load_gguf(path, dtype="bfloat16", device="cpu", max_positions=16)
    assert model16.embed_tokens.weight.dtype == torch.bfloat16
    tok = tokenizer_from_gguf(info)
    assert tok.encode("ab") == [4, 2] and tok.decode([4, 2, 0, 5]) == "aba"  # llama-bpe adds BOS by default
    assert tok.eos_token_ids == [5] and tok.special_tokens == {"bos_token": "<s>", "eos_token": "</s>"}


@pytest.mark.parametrize("keep", [0.5, 0.999, 100])
def test_truncated_file(tmp_path, keep):
    data = _tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[:int(len(data) * keep)] if keep < 1 else data[:keep])
    with pytest.raises(ValueError, match=r"cut\.gguf' is not a valid GGUF file \(truncated\?\)"):
        load_gguf(path, dtype="float32", device="cpu", max_positions=16)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is a text file, not a model\n" * 10)
    with pytest.raises(ValueError, match=r"is not a valid GGUF file.*magic"):
        read_gguf_metadata(path)


def test_other_architecture(tmp_path):
    path = _tiny_gguf(tmp_path / "qwen.gguf", "qwen2")
    with pytest.raises(ValueError, match=r"GGUF architecture 'qwen2' is not supported"):
        load_gguf(path, dtype="float32", device="cpu", max_positions=16)


def test_unsupported_tokenizers(tmp_path):
    with pytest.raises(ValueError, match=r"unsupported GGUF tokenizer model 'llama' \(SentencePiece\)"):
        tokenizer_from_gguf(_tiny_gguf(tmp_path / "spm.gguf", tokenizer_model="llama"))
    with pytest.raises(ValueError, match=r"unsupported GGUF pre-tokenizer 'klingon'"):
        tokenizer_from_gguf(_tiny_gguf(tmp_path / "pre.gguf", pre="klingon"))


def test_unsupported_tensor_type_and_rope(tmp_path):
    from gllm.model.gguf_loader import llama3_rope_from_freq_factors

    with pytest.raises(ValueError, match="does not follow Llama 3's RoPE frequency scaling"):
        llama3_rope_from_freq_factors(np.array([1.0, 3.0, 2.0, 1.5]), 10000.0, 8, 8192, "x.gguf")
    # A tensor type gguf cannot dequantize: rewrite one tensor's type id in the file.
    path = _tiny_gguf(tmp_path / "i32.gguf")
    reader = gguf.GGUFReader(path)
    field = next(t.field for t in reader.tensors if t.name == "output_norm.weight")
    type_offset = field.offset + sum(p.nbytes for p in field.parts[:4])
    del reader
    data = bytearray(path.read_bytes())
    assert int.from_bytes(data[type_offset:type_offset + 4], "little") == gguf.GGMLQuantizationType.F32
    data[type_offset:type_offset + 4] = int(gguf.GGMLQuantizationType.I32).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"'output_norm.weight' has GGML type I32.*unsupported tensor type"):
        load_gguf(path, dtype="float32", device="cpu", max_positions=16)


@pytest.mark.parametrize("pre", ["default", "gpt-2", "smollm", "llama-bpe", "qwen2", "dbrx", ""])
def test_pre_tokenizer_variants_build(tmp_path, pre):
    """Every supported `pre` compiles; reader, file info and metadata dict are all accepted."""
    path = _tiny_gguf(tmp_path / "pre.gguf", pre=pre)
    info = read_gguf_metadata(path)
    for source in (path, str(path), info, info.metadata, gguf.GGUFReader(path)):
        tok = tokenizer_from_gguf(source)
        bos = [4] if pre in ("llama-bpe",) else []  # llama.cpp adds BOS by default only for llama3-style
        assert tok.encode("ab ab") == bos + [2, 3, 2]
        assert tok.decode(tok.encode("ab ab")) == "ab ab"
