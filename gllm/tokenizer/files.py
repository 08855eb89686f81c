"""Reading a Hugging Face-format tokenizer folder: tokenizer.json and the JSON files around it.

Only parsing lives here; `Tokenizer.from_dir` turns the result into a working tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# The named special tokens transformers hands to chat templates (its SPECIAL_TOKENS_ATTRIBUTES).
NAMED_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@dataclass(frozen=True)
class TokenizerFiles:
    """What a tokenizer folder says, before any token is looked up."""

    tokenizer_json: Path
    named_tokens: dict[str, str] = field(default_factory=dict)
    chat_template: str | dict[str, str] | None = None
    generation_bos_id: int | None = None
    generation_eos_ids: list[int] = field(default_factory=list)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path.name} is not valid JSON ({path}): {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} must hold a JSON object ({path})")
    return data


def token_content(value: Any, where: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict with "content"."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{where} must be a string or a dict with a 'content' string, got {value!r}")


def _chat_templates(value: Any) -> str | dict[str, str] | None:
    # Either one template, or a list of {"name", "template"} entries (e.g. "default" and "tool_use").
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {}
        for i, entry in enumerate(value):
            if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("template"), str)):
                raise ValueError(f"{CONFIG_FILE}: chat_template[{i}] must be a dict with 'name' and 'template' strings")
            named[entry["name"]] = entry["template"]
        return named
    raise ValueError(f"{CONFIG_FILE}: chat_template must be a string or a list of {{name, template}} entries")


def _id_list(value: Any, where: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise ValueError(f"{where} must be an int or a list of ints, got {value!r}")
    return list(values)


def read_tokenizer_files(path: str | Path) -> TokenizerFiles:
    """Parse a tokenizer folder. tokenizer.json is required; the other files are optional.

    tokenizer_config.json's add_bos_token/add_eos_token are not read: with a tokenizer.json present,
    its post-processor decides (transformers 5 drops those keys too).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tokenizer_json = folder / TOKENIZER_FILE
    if not tokenizer_json.is_file():
        raise FileNotFoundError(
            f"{TOKENIZER_FILE} not found in {folder} (gllm needs the fast-tokenizer file; "
            "a sentencepiece tokenizer.model alone is not supported)")

    config = _read_json(folder / CONFIG_FILE) if (folder / CONFIG_FILE).is_file() else {}
    named = {}
    for key in NAMED_TOKEN_KEYS:
        content = token_content(config.get(key), f"{CONFIG_FILE}: {key}")
        if content is not None:
            named[key] = content

    template = _chat_templates(config.get("chat_template"))
    if (folder / TEMPLATE_FILE).is_file():
        # transformers saves the template as its own file nowadays; it takes precedence over the config.
        template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")

    gen = _read_json(folder / GENERATION_CONFIG_FILE) if (folder / GENERATION_CONFIG_FILE).is_file() else {}
    gen_bos = _id_list(gen.get("bos_token_id"), f"{GENERATION_CONFIG_FILE}: bos_token_id")

    return TokenizerFiles(
        tokenizer_json=tokenizer_json,
        named_tokens=named,
        chat_template=template,
        generation_bos_id=gen_bos[0] if gen_bos else None,
        generation_eos_ids=_id_list(gen.get("eos_token_id"), f"{GENERATION_CONFIG_FILE}: eos_token_id"),
    )
