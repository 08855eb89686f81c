"""`Tokenizer`: a `tokenizers.Tokenizer` plus the facts around it (BOS, EOS ids, chat template).

Encoding and decoding are the `tokenizers` library's own; this class adds what a runtime needs on
top: which ids end a generation, which are special, and how a conversation becomes prompt ids.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from gllm.tokenizer.chat_template import ChatTemplate, Message
from gllm.tokenizer.files import read_tokenizer_files

DEFAULT_TEMPLATE_NAME = "default"
TOOL_TEMPLATE_NAME = "tool_use"



def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, reversed: the byte each character of a token piece stands for
    (printable Latin-1 bytes stand for themselves, the other 68 bytes for characters from U+0100 on)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(others)})
    return table


BYTE_OF_CHAR = _byte_of_char()   # a constant table

class Tokenizer:
    """Text <-> token ids for one model.

    ``bos_token`` and ``eos_tokens`` accept token strings or ids. ``add_bos_token``/``add_eos_token``
    (e.g. from GGUF metadata) replace the post-processor of ``hf_tokenizer``, which this object owns
    from then on; left as None, the post-processor is kept as is. ``special_tokens``
    are the named tokens the chat template sees (``bos_token``, ``eos_token``, ``pad_token``...);
    by default the BOS and the first EOS. ``chat_template`` is one template or named templates
    (``"default"``, ``"tool_use"``, ...).
    """

    def __init__(
        self,
        hf_tokenizer: tokenizers.Tokenizer,
        *,
        bos_token: str | int | None = None,
        eos_tokens: Sequence[str | int] = (),
        chat_template: str | Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ) -> None:
        if not isinstance(hf_tokenizer, tokenizers.Tokenizer):
            raise TypeError(f"hf_tokenizer must be a tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}")
        if isinstance(eos_tokens, (str, int)):
            eos_tokens = [eos_tokens]
        self._hf = hf_tokenizer
        self._vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)
        self._bos_id = None if bos_token is None else self._resolve(bos_token, "bos_token")
        # dict.fromkeys keeps first-seen order while dropping repeats (eot_id listed twice, say).
        self._eos_ids = list(dict.fromkeys(self._resolve(tok, "eos_tokens") for tok in eos_tokens))

        if special_tokens is None:
            special_tokens = {}
            if self._bos_id is not None:
                special_tokens["bos_token"] = hf_tokenizer.id_to_token(self._bos_id)
            if self._eos_ids:
                special_tokens["eos_token"] = hf_tokenizer.id_to_token(self._eos_ids[0])
        self._named_tokens = dict(special_tokens)

        if add_bos_token is not None or add_eos_token is not None:
            self._set_post_processor(bool(add_bos_token), bool(add_eos_token))

        # What skip_special_tokens drops when decoding, plus BOS/EOS in case they are not marked special.
        special = {i for i, tok in hf_tokenizer.get_added_tokens_decoder().items() if tok.special}
        special.update(self._eos_ids)
        if self._bos_id is not None:
            special.add(self._bos_id)
        self._special_ids = frozenset(special)
        # Player text must never become control tokens: the special-token strings (longest first, as the
        # tokenizer matches them), found in messages and encoded there as text by `_text_hf`.
        added = hf_tokenizer.get_added_tokens_decoder()
        self._special_added_ids = frozenset(i for i, tok in added.items() if tok.special)
        specials = sorted((added[i].content for i in self._special_added_ids), key=len, reverse=True)
        self._special_pattern = re.compile("|".join(map(re.escape, specials))) if specials else None
        self._special_by_text = {added[i].content: i for i in self._special_added_ids}
        # Markers can be found by the pattern alone unless some special token eats spaces or needs word edges.
        self._plain_specials = not any(added[i].lstrip or added[i].rstrip or added[i].single_word
                                       for i in self._special_added_ids)

        self._templates = self._compile_templates(chat_template)

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json."""
        files = read_tokenizer_files(path)
        try:
            hf = tokenizers.Tokenizer.from_file(str(files.tokenizer_json))
        except Exception as exc:  # the Rust side raises a bare Exception on malformed files
            raise ValueError(f"cannot load {files.tokenizer_json}: {exc}") from exc
        named = files.named_tokens
        bos: str | int | None = named.get("bos_token", files.generation_bos_id)
        # The config's eos_token is what chat templates mean by EOS; generation_config adds the
        # other ids that end a turn (Llama 3: <|eot_id|>, <|end_of_text|>, <|eom_id|>).
        eos: list[str | int] = [named["eos_token"]] if "eos_token" in named else []
        eos.extend(files.generation_eos_ids)
        return cls(hf, bos_token=bos, eos_tokens=eos, chat_template=files.chat_template, special_tokens=named)

    # --- vocabulary -----------------------------------------------------------------------------

    @property
    def hf_tokenizer(self) -> tokenizers.Tokenizer:
        return self._hf

    @functools.cached_property
    def _text_hf(self) -> tokenizers.Tokenizer:
        """A twin of the tokenizer that encodes special-token strings as the text they are. It shares the
        model (the vocabulary and merges are not copied: about a millisecond, where a copy through JSON takes
        a second of held GIL) and has the same added tokens under the same ids."""
        hf = self._hf
        twin = tokenizers.Tokenizer(hf.model)
        for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder"):
            if getattr(hf, part) is not None:
                setattr(twin, part, getattr(hf, part))
        added = hf.get_added_tokens_decoder()
        twin.add_tokens([added[i] for i in sorted(added) if not added[i].special])
        twin.add_special_tokens([added[i] for i in sorted(added) if added[i].special])
        if any(twin.token_to_id(tok.content) != i for i, tok in added.items()):
            twin = tokenizers.Tokenizer.from_str(hf.to_str())   # ids interleaved with the model's: copy it all
        twin.encode_special_tokens = True
        return twin

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The longest token as the vocabulary spells it, in characters (byte-level BPE spells one byte per
        character, so it is never shorter than the text the token stands for): a text longer than n times
        this cannot fit in n tokens."""
        return max(map(len, self._hf.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (Llama 3: 128256)."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_id

    @property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a generation, without repeats, the config's eos_token first."""
        return list(self._eos_ids)

    @property
    def special_token_ids(self) -> frozenset[int]:
        return self._special_ids

    @property
    def special_tokens(self) -> dict[str, str]:
        """The named special tokens the chat template sees."""
        return dict(self._named_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The raw bytes a byte-level BPE token stands for (it may hold part of a UTF-8 character), or None
        for a token outside GPT-2's byte alphabet (special tokens, other vocabularies)."""
        piece = self._hf.id_to_token(token_id)
        if not piece or not all(ch in BYTE_OF_CHAR for ch in piece):
            return None
        return bytes(BYTE_OF_CHAR[ch] for ch in piece)

    # --- text -----------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True, *, special_tokens_as_text: bool = False) -> list[int]:
        """Token ids of ``text``; with ``add_special_tokens`` the post-processor adds BOS (Llama 3).

        Special-token strings in ``text`` (``<|eot_id|>``...) become their special ids, unless
        ``special_tokens_as_text``: then they are encoded as the plain text they are. The `tokenizers` call
        releases the GIL, so a long text does not hold up the engine thread."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        hf = self._text_hf if special_tokens_as_text else self._hf
        return hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The `tokenizers` decode, as is: no clean-up of spaces before punctuation."""
        return self._hf.decode(ids if isinstance(ids, list) else list(ids), skip_special_tokens=skip_special_tokens)

    # --- chat -----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def get_chat_template(self, name: str | None = None, *, tools: Any = None) -> ChatTemplate:
        """The template to use: ``name`` if given, else "tool_use" when tools are passed and the
        model has one, else the default."""
        if not self._templates:
            raise ValueError("this model has no chat template: pass a plain prompt, or give the tokenizer a "
                             "chat_template (tokenizer_config.json or chat_template.jinja)")
        if name is None:
            name = TOOL_TEMPLATE_NAME if tools is not None and TOOL_TEMPLATE_NAME in self._templates \
                else DEFAULT_TEMPLATE_NAME
        if name not in self._templates:
            raise ValueError(f"no chat template named {name!r}; available: {sorted(self._templates)}")
        return self._templates[name]

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Prompt text for ``messages``, as transformers' ``apply_chat_template(..., tokenize=False)``."""
        return self.get_chat_template(tools=extra.get("tools")).render(
            messages, add_generation_prompt=add_generation_prompt, **extra)

    def encode_chat(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                    **extra: Any) -> list[int]:
        """Prompt ids for ``messages``. The template writes BOS itself, so none is added here.

        Message text is text: a special-token string inside a message (a player typing ``<|eot_id|>``) is
        encoded as plain text, and only the template's own markers become special ids. Conversations without
        such strings are encoded exactly as before (the whole rendered prompt in one call)."""
        found = self._specials_in(messages)
        if not found:
            return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra),
                               add_special_tokens=False)
        # Render with every special string in the messages replaced by a private-use character that occurs
        # nowhere else, so the template's markers are the only special tokens left; then encode the text
        # between those markers with the special strings put back, as plain text.
        taken = {ch for text in self._strings_of(messages, extra) for ch in text}
        private_use = itertools.chain(range(0xF0000, 0xFFFFE), range(0x100000, 0x10FFFE))
        free = (chr(code) for code in private_use if chr(code) not in taken)
        stand_ins = dict(zip(found, free))
        if len(stand_ins) < len(found):
            raise ValueError("messages contain special-token strings and every supplementary private-use "
                             "character; cannot keep them apart")
        masked = [{k: self._special_pattern.sub(lambda m: stand_ins[m.group()], v) if isinstance(v, str) else v
                   for k, v in message.items()} if isinstance(message, Mapping) else message
                  for message in messages]
        text = self.apply_chat_template(masked, add_generation_prompt, **extra)
        restore = {ch: special for special, ch in stand_ins.items()}
        unmask = re.compile("|".join(map(re.escape, restore)))

        def as_text(part: str) -> list[int]:
            return self.encode(unmask.sub(lambda m: restore[m.group()], part), add_special_tokens=False,
                               special_tokens_as_text=True)

        ids: list[int] = []
        pos = 0
        for start, end, marker in self._markers(text):
            if start > pos:
                ids.extend(as_text(text[pos:start]))
            ids.append(marker)
            pos = end
        if pos < len(text):
            ids.extend(as_text(text[pos:]))
        return ids

    def _markers(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each special token the tokenizer finds in ``text``."""
        if self._plain_specials:
            return [(m.start(), m.end(), self._special_by_text[m.group()])
                    for m in self._special_pattern.finditer(text)]
        enc = self._hf.encode_batch([text], add_special_tokens=False)[0]
        return [(start, end, i) for i, (start, end) in zip(enc.ids, enc.offsets) if i in self._special_added_ids]

    def _specials_in(self, messages: Sequence[Message]) -> list[str]:
        """The distinct special-token strings inside the messages' string values, in order of appearance."""
        if self._special_pattern is None or isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
            return []                  # (not a conversation: validate_messages says so when rendering)
        found: dict[str, None] = {}
        for message in messages:
            if not isinstance(message, Mapping):
                continue               # validate_messages names the problem when rendering
            for value in message.values():
                if isinstance(value, str):
                    found.update(dict.fromkeys(self._special_pattern.findall(value)))
        return list(found)

    def _strings_of(self, messages: Sequence[Message], extra: Mapping[str, Any]) -> list[str]:
        strings = [v for m in messages if isinstance(m, Mapping) for v in m.values() if isinstance(v, str)]
        strings += [t.source for t in self._templates.values()] + list(self._named_tokens.values())
        return strings + [json.dumps(extra, default=str, ensure_ascii=False)]

    # --- internals ------------------------------------------------------------------------------

    def _resolve(self, token: str | int, what: str) -> int:
        if isinstance(token, bool) or not isinstance(token, (str, int)):
            raise TypeError(f"{what}: expected a token string or id, got {token!r}")
        if isinstance(token, str):
            token_id = self._hf.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{what}: token {token!r} is not in the vocabulary")
            return token_id
        if not 0 <= token < self._vocab_size:
            raise ValueError(f"{what}: id {token} is outside the vocabulary (size {self._vocab_size})")
        return token

    def _set_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        # An explicit add_bos_token/add_eos_token replaces whatever post-processor the tokenizer had,
        # as transformers' update_post_processor does; a missing BOS/EOS just isn't added.
        add_bos = add_bos and self._bos_id is not None
        add_eos = add_eos and bool(self._eos_ids)
        bos = self._hf.id_to_token(self._bos_id) if add_bos else None
        eos = self._hf.id_to_token(self._eos_ids[0]) if add_eos else None
        single = " ".join(([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else []))
        pair = " ".join([single] + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else []))
        special = ([(bos, self._bos_id)] if bos else []) + ([(eos, self._eos_ids[0])] if eos else [])
        self._hf.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    def _compile_templates(self, source: str | Mapping[str, str] | None) -> dict[str, ChatTemplate]:
        if source is None:
            return {}
        named = {DEFAULT_TEMPLATE_NAME: source} if isinstance(source, str) else dict(source)
        return {name: ChatTemplate(text, self._named_tokens) for name, text in named.items()}

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self._vocab_size}, bos={self._bos_id}, eos={self._eos_ids}, "
                f"templates={sorted(self._templates)})")
