"""Build a gllm `Tokenizer` from the `tokenizer.*` metadata of a GGUF file.

A GGUF carries no tokenizer.json; llama.cpp stores the pieces instead: the token strings, the BPE
merges ("a b"), a type per token, the special ids and a `pre` name that selects the pre-tokenizer
(the regexes that cut text into words before BPE). This module rebuilds a `tokenizers.Tokenizer`
that tokenizes the way llama.cpp does for that `pre`:

- `tokenizer.ggml.model` must be `gpt2` (byte-level BPE; Llama 3, SmolLM, Qwen...). SentencePiece
  (`llama`) and the others are refused with an error naming them.
- Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added
  tokens: both are matched whole in the text, never cut by BPE.
- `add_bos_token` / `add_eos_token` follow the file, else llama.cpp's default for the `pre`.
- The generation stops at the EOS id, the EOT/EOM ids when given, and (as llama.cpp does) at the
  control tokens whose text names an end of turn or text (`<|eot_id|>`, `<|im_end|>`, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from gllm.tokenizer.tokenizer import Tokenizer

# llama.cpp token types (llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# The pre-tokenizer regexes llama.cpp uses (llama-vocab.cpp). Several regexes run in sequence,
# each splitting the pieces the previous one left, keeping matches and the text between them.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")


class _Pre:
    """One llama.cpp pre-tokenizer family: its regexes and the vocabulary flags it implies."""

    def __init__(self, regexes: tuple[str, ...], *, add_bos: bool = False, ignore_merges: bool = False) -> None:
        self.regexes, self.add_bos, self.ignore_merges = regexes, add_bos, ignore_merges


_PRE_LLAMA3 = _Pre((_LLAMA3,), add_bos=True, ignore_merges=True)
_PRE_LLAMA3_REGEX_ONLY = _Pre((_LLAMA3,))      # llama.cpp gives dbrx/smaug-bpe the regex, not the flags
_PRE_SMOLLM = _Pre((r"\p{N}", _GPT2))          # every digit on its own, then GPT-2's regex
_PRE_GPT2 = _Pre((_GPT2,))
_PRE_QWEN2 = _Pre((_QWEN2,))

PRE_TOKENIZERS: dict[str, _Pre] = {
    # Llama 3.x ("llama-bpe" is what llama.cpp's converter writes for it) and its lookalikes.
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "falcon3", "pixtral"), _PRE_LLAMA3),
    **dict.fromkeys(("smaug-bpe", "dbrx"), _PRE_LLAMA3_REGEX_ONLY),
    # SmolLM / StarCoder style: digits split one by one.
    **dict.fromkeys(("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b"),
                    _PRE_SMOLLM),
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "mpt", "olmo", "jais"), _PRE_GPT2),
    **dict.fromkeys(("qwen2", "stablelm2", "deepseek-r1-qwen", "megrez"), _PRE_QWEN2),
    # What llama.cpp falls back to for a BPE vocabulary with no (or "default") pre-tokenizer.
    "default": _Pre(_DEFAULT),
}

# Control tokens llama.cpp treats as an end of generation whatever the EOS id says (llama-vocab.cpp).
_END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                            "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>")

_SPECIAL_ID_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id",
                    "unk_token": "tokenizer.ggml.unknown_token_id", "pad_token": "tokenizer.ggml.padding_token_id"}


def _metadata(source: Any) -> tuple[Mapping[str, Any], str]:
    """(metadata dict, description) from a path, a `gguf.GGUFReader` or a `GGUFFile`."""
    from gllm.formats.gguf import GGUFFile, gguf_file_from_reader, read_gguf_metadata

    if isinstance(source, GGUFFile):
        return source.metadata, str(source.path)
    if isinstance(source, (str, Path)):
        info = read_gguf_metadata(source)
        return info.metadata, str(info.path)
    if hasattr(source, "fields") and hasattr(source, "tensors"):  # a gguf.GGUFReader
        where = str(getattr(source.data, "filename", None) or "GGUF")
        return gguf_file_from_reader(source, where).metadata, where
    if isinstance(source, Mapping):
        return source, "GGUF metadata"
    raise TypeError(f"expected a GGUF path, gguf.GGUFReader or GGUFFile, got {type(source).__name__}")


def tokenizer_from_gguf(source: Any) -> Tokenizer:
    """A gllm `Tokenizer` from a GGUF file's metadata.

    ``source`` is a path, a `gguf.GGUFReader`, the `GGUFFile` that `load_gguf` returns, or the
    metadata dict itself. Raises ValueError naming the tokenizer model or pre-tokenizer when the
    file uses one gllm cannot build.
    """
    md, where = _metadata(source)
    model = md.get("tokenizer.ggml.model")
    if model is None:
        raise ValueError(f"{where!r}: the GGUF file has no tokenizer (tokenizer.ggml.model is missing)")
    if model != "gpt2":
        kind = {"llama": "SentencePiece", "bert": "WordPiece", "t5": "Unigram", "rwkv": "RWKV"}.get(model, "")
        raise ValueError(f"{where!r}: unsupported GGUF tokenizer model {model!r}{f' ({kind})' if kind else ''}; "
                         f"gllm builds byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2')")
    pre_name = md.get("tokenizer.ggml.pre") or "default"
    pre = PRE_TOKENIZERS.get(pre_name)
    if pre is None:
        raise ValueError(f"{where!r}: unsupported GGUF pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); "
                         f"gllm supports {', '.join(sorted(PRE_TOKENIZERS))}")
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ValueError(f"{where!r}: the GGUF tokenizer lacks tokenizer.ggml.tokens or tokenizer.ggml.merges")
    types = md.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{where!r}: {len(types)} token types for {len(tokens)} tokens")

    hf = build_bpe_tokenizer(tokens, merges, types, pre, where)

    def token_id(key: str) -> int | None:
        value = md.get(key)
        if value is None:
            return None
        if not 0 <= int(value) < len(tokens):
            raise ValueError(f"{where!r}: {key} = {value} is outside the vocabulary ({len(tokens)} tokens)")
        return int(value)

    bos = token_id("tokenizer.ggml.bos_token_id")
    eos = token_id("tokenizer.ggml.eos_token_id")
    eog = [eos] + [token_id(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    eog += [i for i, (text, kind) in enumerate(zip(tokens, types))
            if kind == TOKEN_CONTROL and text in _END_OF_GENERATION_TEXTS]
    eos_ids = [i for i in dict.fromkeys(eog) if i is not None]

    named = {name: tokens[i] for name, key in _SPECIAL_ID_KEYS.items() if (i := token_id(key)) is not None}
    add_bos = md.get("tokenizer.ggml.add_bos_token", pre.add_bos)
    add_eos = md.get("tokenizer.ggml.add_eos_token", False)
    return Tokenizer(hf, bos_token=bos, eos_tokens=eos_ids, chat_template=_chat_templates(md),
                     special_tokens=named, add_bos_token=bool(add_bos), add_eos_token=bool(add_eos))


def build_bpe_tokenizer(tokens: list[str], merges: list[str], types: list[int], pre: _Pre | str,
                        where: str = "GGUF") -> tokenizers.Tokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` from llama.cpp's vocabulary arrays."""
    if isinstance(pre, str):
        pre = PRE_TOKENIZERS[pre]
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a repeated string keeps its first id, as llama.cpp's lookup does
    pairs = []
    for merge in merges:
        # llama.cpp splits at the first space after the first character (a token may be " ").
        cut = merge.find(" ", 1)
        if cut < 0:
            raise ValueError(f"{where!r}: malformed BPE merge {merge!r} (expected 'left right')")
        pairs.append((merge[:cut], merge[cut + 1:]))
    try:
        bpe = models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # the Rust side raises a bare Exception (merge of an unknown token...)
        raise ValueError(f"{where!r}: cannot build the BPE tokenizer from the GGUF vocabulary: {exc}") from exc
    hf = tokenizers.Tokenizer(bpe)
    splits = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.regexes]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    # Control and user-defined tokens are matched whole before BPE sees the text (llama.cpp's
    # "special token partition"); control ones are special (skipped when decoding without them).
    added = [AddedToken(tok, special=kind == TOKEN_CONTROL, normalized=False)
             for tok, kind in zip(tokens, types)
             if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED) and vocab.get(tok) is not None and tok]
    hf.add_special_tokens([t for t in added if t.special])
    hf.add_tokens([t for t in added if not t.special])
    if hf.get_vocab_size(with_added_tokens=True) != len(vocab):
        raise ValueError(f"{where!r}: added tokens changed the vocabulary size "
                         f"({len(vocab)} -> {hf.get_vocab_size(with_added_tokens=True)})")
    return hf


def _chat_templates(md: Mapping[str, Any]) -> str | dict[str, str] | None:
    """`tokenizer.chat_template`, plus named ones (`tokenizer.chat_template.<name>`, listed in
    `tokenizer.chat_templates`) when the file has them."""
    default = md.get("tokenizer.chat_template")
    names = md.get("tokenizer.chat_templates") or []
    named = {n: md[f"tokenizer.chat_template.{n}"] for n in names if f"tokenizer.chat_template.{n}" in md}
    if not named:
        return default
    if default is not None:
        named = {"default": default, **named}
    return named
