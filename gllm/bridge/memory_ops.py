"""The bridge's NPC-memory ops (snapshot, restore, pin, unpin, embed): each runs on the server's memory lane
thread (they wait for the engine thread, between its steps) and answers with one reply message or one error,
both carrying the op's id. A snapshot or restore is bounded by the server's `max_message_bytes` both ways."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from gllm.bridge import protocol as P
from gllm.engine.errors import EngineBusy, RequestRejected

if TYPE_CHECKING:
    from gllm.engine.interface import EngineAPI

# A snapshot message's bytes beyond its blob: the op, id and tokens keys (the id is at most 128 bytes).
SNAPSHOT_OVERHEAD = 200


def engine_request_id(serial: int, cid: str) -> str:
    """The engine's id of a client's generate (`BridgeServer` names them so)."""
    return f"{serial:x}/{cid}"


def run_memory_op(engine: EngineAPI, serial: int, m: P.MemoryMessage, max_message_bytes: int) -> dict[str, Any]:
    try:
        return _run(engine, serial, m, max_message_bytes)
    except RequestRejected as exc:     # pins refused, bad input, busy
        code = P.BUSY if isinstance(exc, EngineBusy) else exc.code if exc.code in P.ERROR_CODES else P.BAD_REQUEST
        return P.error(m.id, code, str(exc))
    except ValueError as exc:          # snapshot errors (typed: gllm.kv.snapshot.SnapshotError) and the like
        code = getattr(exc, "code", P.BAD_REQUEST)
        return P.error(m.id, code if code in P.ERROR_CODES else P.BAD_REQUEST, str(exc))
    except RuntimeError as exc:        # the engine is closed
        return P.error(m.id, P.BUSY, f"the engine is not accepting requests: {exc}")


def _run(engine: EngineAPI, serial: int, m: P.MemoryMessage, max_message_bytes: int) -> dict[str, Any]:
    if isinstance(m, P.Snapshot):
        source = m.tokens if m.tokens is not None else engine_request_id(serial, m.conversation)
        blob = engine.snapshot(source, encoding=m.encoding)
        if len(blob) + SNAPSHOT_OVERHEAD > max_message_bytes:
            return P.error(m.id, P.TOO_LONG, f"the snapshot is {len(blob)} bytes; messages are limited to "
                           f"{max_message_bytes} (max_message_bytes): use encoding int8, a shorter history, or "
                           f"a server with a larger limit")
        return P.snapshot(m.id, engine.snapshot_tokens(blob), blob)
    if isinstance(m, P.Restore):
        info = engine.restore(m.blob)
        return P.restored(m.id, info.tokens, info.new_blocks)
    if isinstance(m, P.Pin):
        what = m.tokens if m.tokens is not None else m.messages if m.messages is not None else m.prompt
        pin_id = engine.pin(what)
        return P.pinned(m.id, pin_id, engine.pins().get(pin_id, 0))
    if isinstance(m, P.Unpin):
        return P.unpinned(m.id, m.pin, engine.unpin(m.pin))
    result = engine.embed(m.input, pooling=m.pooling)
    return P.embeddings(m.id, result.vectors, result.prompt_tokens)
