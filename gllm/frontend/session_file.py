"""A saved chat session on disk: the conversation's messages and, when the engine had it cached, the KV
snapshot of its tokens (`LLMEngine.snapshot`), so a loaded session continues without its prefill.

Layout: b"GLLMCHAT" | u32 length | UTF-8 JSON {"format": 1, "messages": [...]} | the snapshot blob (may be
empty). The blob checks itself (model, tokenizer, checksum) when it is restored."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAGIC = b"GLLMCHAT"
FORMAT = 1


def write_session(path: str | Path, messages: list[dict[str, Any]], blob: bytes) -> int:
    """Write atomically (a crash mid-save leaves the previous file); the bytes written."""
    head = json.dumps({"format": FORMAT, "messages": messages}, ensure_ascii=False).encode()
    data = MAGIC + struct.pack("<I", len(head)) + head + blob
    target = Path(path)
    tmp = target.with_name(target.name + ".partial")
    tmp.write_bytes(data)
    tmp.replace(target)
    return len(data)


def read_session(path: str | Path) -> tuple[list[dict[str, Any]], bytes]:
    """(messages, snapshot blob); ValueError if the file is not a saved session."""
    data = Path(path).read_bytes()
    if data[:len(MAGIC)] != MAGIC or len(data) < len(MAGIC) + 4:
        raise ValueError(f"{path} is not a saved gllm chat session")
    (n,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    try:
        head = json.loads(data[start:start + n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: damaged session header ({exc})") from None
    messages = head.get("messages") if isinstance(head, dict) else None
    if head.get("format") != FORMAT or not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise ValueError(f"{path}: not a format-{FORMAT} session")
    return messages, data[start + n:]
