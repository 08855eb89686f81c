"""`POST /v1/embeddings` in OpenAI's shape: `input` (a string, a list of strings, token ids or lists of them),
`encoding_format` "float" (default) or "base64" (little-endian float32), `usage`; gllm's extension `pooling`
("mean", the default, or "last"). The vectors are the loaded model's pooled hidden states (`LLMEngine.embed`)."""

from __future__ import annotations

import base64
import struct
from dataclasses import dataclass
from typing import Any

from gllm.engine.errors import EngineBusy, RequestRejected
from gllm.http.errors import ApiError, bad_request

ENCODINGS = ("float", "base64")


@dataclass
class EmbeddingsRequest:
    inputs: Any
    encoding_format: str
    pooling: str


def parse_embeddings(body: dict[str, Any]) -> EmbeddingsRequest:
    if "input" not in body:
        raise bad_request("input is required", param="input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ENCODINGS:
        raise bad_request(f"encoding_format must be one of {ENCODINGS}, got {encoding!r}", param="encoding_format")
    if body.get("dimensions") is not None:
        raise bad_request("dimensions is not supported: the vectors have the model's hidden size", param="dimensions")
    pooling = body.get("pooling", "mean")
    if not isinstance(pooling, str):
        raise bad_request("pooling must be \"mean\" or \"last\"", param="pooling")
    return EmbeddingsRequest(body["input"], encoding, pooling)


def embeddings_response(vectors: list[list[float]], prompt_tokens: int, model: str, encoding: str) -> dict[str, Any]:
    def encoded(v: list[float]) -> list[float] | str:
        if encoding == "float":
            return v
        return base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode()

    return {"object": "list", "model": model,
            "data": [{"object": "embedding", "index": i, "embedding": encoded(v)} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def embed_error(exc: Exception) -> ApiError:
    """What an engine refusal of an embeddings call becomes."""
    if isinstance(exc, RuntimeError):
        return ApiError(503, f"the engine is not accepting requests: {exc}", code="unavailable")
    if isinstance(exc, EngineBusy):
        return ApiError(503, f"the server is overloaded: {exc}; retry later", code="overloaded",
                        headers={"Retry-After": "1"})
    if isinstance(exc, RequestRejected):
        return bad_request(str(exc), param=exc.field, code=None if exc.code == "bad_request" else exc.code)
    return bad_request(str(exc))
