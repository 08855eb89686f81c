"""Chat templates: the jinja2 programs in tokenizer_config.json that turn messages into a prompt.

Rendering must match transformers' ``apply_chat_template(..., tokenize=False)`` byte for byte, since
the models were trained on exactly that text. So the environment is set up the way transformers sets
it up (sandboxed, ``trim_blocks``, ``lstrip_blocks``, loop controls, a ``tojson`` that keeps unicode,
``raise_exception``, ``strftime_now``) and receives the same variables.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

Message = Mapping[str, Any]


class ChatTemplateError(ValueError):
    """A chat template refused the conversation (``raise_exception``) or failed to render."""


def _raise_exception(message: str) -> None:
    # Templates call this to reject conversations they cannot format (e.g. roles out of order).
    raise ChatTemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's own tojson HTML-escapes and cannot indent; templates (tool schemas) expect plain json.dumps.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    # Llama 3.1+ templates put today's date in the system prompt.
    return datetime.now().strftime(fmt)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    # Stands in for the builtin `dict` global so a template cannot reach the type object itself.
    return dict(*args, **kwargs)


class _GuardedNamespace(jinja2.utils.Namespace):
    """`namespace()` that refuses underscore-prefixed names, which could reach Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - same trick as jinja2's Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _GuardedNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _GuardedNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed in a chat template")


def _environment() -> ImmutableSandboxedEnvironment:
    # A fresh environment per template: nothing is shared between templates or Tokenizer instances.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _make_dict
    env.globals["namespace"] = _GuardedNamespace
    return env


def _is_list_of_dicts(value: Any) -> bool:
    return (isinstance(value, Sequence) and not isinstance(value, (str, bytes))
            and all(isinstance(item, Mapping) for item in value))


TOOLS_NOTE = ("You can call these functions. To call one, reply with only a JSON object "
              "{\"name\": function name, \"parameters\": its arguments}.\n\n")


def tools_in_system_message(chat: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a chat template without tool support: the tools described in the system message (the Llama 3.1
    call form), and earlier calls written out as the assistant's text."""
    note = TOOLS_NOTE + "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    chat = [dict(m) for m in chat]
    for m in chat:
        if m.get("tool_calls") and not m["content"]:
            m["content"] = "\n".join(json.dumps({"name": c["function"]["name"],
                                                 "parameters": c["function"].get("arguments", {})},
                                                ensure_ascii=False) for c in m["tool_calls"])
    if chat[0]["role"] == "system":
        chat[0]["content"] = chat[0]["content"] + "\n\n" + note
    else:
        chat.insert(0, {"role": "system", "content": note})
    return chat


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation and return a fresh copy the template can read.

    Keys whose value is None are dropped, as transformers does (OpenAI-style ``tool_calls=None``
    would otherwise render as the text "None").
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must not be empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for field in ("role", "content"):
            if field not in message:
                raise ValueError(f"messages[{i}].{field} is missing")
            if not isinstance(message[field], str):
                raise ValueError(f"messages[{i}].{field} must be a string, got {type(message[field]).__name__}")
        out.append({key: value for key, value in message.items() if value is not None})
    return out


class ChatTemplate:
    """One compiled chat template plus the named special tokens it may refer to (``bos_token`` ...)."""

    def __init__(self, source: str, special_tokens: Mapping[str, str] | None = None) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ValueError("chat template source must be a non-empty string")
        self.source = source
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"chat template does not compile: {exc} (line {exc.lineno})") from exc

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render ``messages`` to prompt text; ``extra`` (tools, documents, date_string, ...) reaches the template.

        Extra variables override the special tokens of the same name, as in transformers.
        """
        chat = validate_messages(messages)
        tools = extra.pop("tools", None)
        documents = extra.pop("documents", None)
        if tools is not None and not _is_list_of_dicts(tools):
            raise ValueError("tools must be a list of JSON-schema dicts")
        if documents is not None and not _is_list_of_dicts(documents):
            raise ValueError("documents must be a list of dicts (e.g. with 'title' and 'text')")
        if tools and "tools" not in self.source:   # a template that cannot show tools: the system message does
            chat = tools_in_system_message(chat, tools)
        variables = {**self.special_tokens, **extra}
        try:
            return self._template.render(messages=chat, tools=tools, documents=documents,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template failed to render: {exc}") from exc

    def __repr__(self) -> str:
        return f"ChatTemplate({len(self.source)} chars, tokens={sorted(self.special_tokens)})"
