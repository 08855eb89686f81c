"""Tokenization for gllm: the `tokenizers` wrapper, chat templates and streaming detokenization."""

from gllm.tokenizer.chat_template import ChatTemplate, ChatTemplateError
from gllm.tokenizer.detokenizer import IncrementalDetokenizer
from gllm.tokenizer.tokenizer import Tokenizer

__all__ = ["ChatTemplate", "ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]
