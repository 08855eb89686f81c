"""Streaming detokenization: turn generated ids into text deltas as they arrive.

Byte-level BPE tokens may end in the middle of a UTF-8 character, and decoders such as
SentencePiece's strip a leading space only at the start of a decode, so decoding token by token is
wrong. As vLLM does, each step decodes a short window of recent tokens twice, ``ids[prefix:read]``
(text already emitted) and ``ids[prefix:]``, and emits the difference once it no longer ends in
U+FFFD. The window restarts after every emission, so the cost per call stays constant however long
the sequence grows.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

REPLACEMENT_CHAR = "\ufffd"


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Per-request text stream. ``add`` returns the new text; the deltas join to the full decode.

    Call ``finish()`` when the request ends to flush text held back (a trailing incomplete UTF-8
    sequence, which the full decode renders as U+FFFD).
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0   # start of the decode window
        self._read_offset = 0     # ids before this are already in the emitted text
        self._prefix_text = ""    # decode(ids[prefix_offset:read_offset])
        self._text = ""
        self._finished = False

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return self._text

    def add(self, token_ids: Iterable[int]) -> str:
        """Take the next generated ids (one or a chunk); return the text they complete, maybe ""."""
        if self._finished:
            raise RuntimeError("IncrementalDetokenizer.add() after finish()")
        self._ids.extend(map(int, token_ids))
        new_text = self._decode(self._ids[self._prefix_offset:])
        # Hold back while the window ends in U+FFFD: the next token may complete the character.
        # Also wait while nothing new appeared (e.g. skipped special tokens): moving the window onto
        # tokens that decode to nothing would let a decoder's start-of-text rule hit later text.
        if new_text.endswith(REPLACEMENT_CHAR) or len(new_text) <= len(self._prefix_text):
            return ""
        delta = self._delta(new_text)
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        return self._emit(delta)

    def finish(self) -> str:
        """Flush whatever is held back; afterwards ``text`` equals the full decode of all ids."""
        if self._finished:
            return ""
        self._finished = True
        delta = self._delta(self._decode(self._ids[self._prefix_offset:]))
        self._prefix_offset = self._read_offset = len(self._ids)
        self._prefix_text = ""
        return self._emit(delta)

    def _delta(self, new_text: str) -> str:
        if new_text.startswith(self._prefix_text):
            return new_text[len(self._prefix_text):]
        # A decoder whose output for the window is not prefix-stable: fall back to the full decode
        # (costly but exact). Byte-level BPE and SentencePiece never get here.
        full = self._decode(self._ids)
        emitted = self.text
        if not full.startswith(emitted):
            raise RuntimeError("detokenizer emitted text that the full decode no longer starts with")
        return full[len(emitted):]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _emit(self, delta: str) -> str:
        self._text += delta   # one C-level copy of at most a few KB: cheap next to a model step
        return delta
