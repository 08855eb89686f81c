"""`gllm` command line: chat, generate, models, fetch, serve."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

from gllm.engine.catalog import DEFAULT_MODEL, KNOWN_MODELS, cached_gguf_path, fetch_known_model, gllm_home
from gllm.frontend.helpers import field_flag
from gllm.request_fields import CONSTRAINT_FIELDS, FIELDS_BY_NAME, FieldError, RequestField


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (exit code 2), not usage plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"gllm: error: {message}\n")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help=f"known name, HF folder, .gguf or HF cache id (default {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress output")


_CLI_FIELDS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
               "frequency_penalty", "seed", "max_new_tokens")


def _add_sampling_flags(p: argparse.ArgumentParser, default_temperature: float) -> None:
    for name in _CLI_FIELDS:
        f = FIELDS_BY_NAME[name]
        default = default_temperature if name == "temperature" else f.default
        p.add_argument("--" + f.wire_name.replace("_", "-"), dest=name, type=field_flag(f), default=default,
                       metavar=f.wire_name.upper(), help=f"{f.help}; {f.limits} (default {default})")


def _constraint_value(f: RequestField):
    """An argparse ``type`` for a structured-output flag: the text, or the file's text for ``@path``."""
    flag = "--" + f.wire_name.replace("_", "-")

    def parse(text: str):
        if text.startswith("@"):
            try:
                text = Path(text[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                raise argparse.ArgumentTypeError(f"{flag}: cannot read {text[1:]}: {exc}") from None
        try:   # one --choice flag is one item of the list
            return f.check([text], flag)[0] if f.kind == "str_list" else f.check(text, flag)
        except FieldError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


def _add_constraint_flags(p: argparse.ArgumentParser) -> None:
    """--json-schema, --regex, --grammar, --choice (repeated): at most one; the output then always parses."""
    group = p.add_mutually_exclusive_group()
    for f in CONSTRAINT_FIELDS:
        many = f.kind == "str_list"
        group.add_argument("--" + f.wire_name.replace("_", "-"), dest=f.name, type=_constraint_value(f),
                           action="append" if many else "store", default=None, metavar="TEXT",
                           help=f"{f.help}{' (repeat the flag for each)' if many else ''}; {f.limits}"
                                f"{'' if many else '; @FILE reads it from a file'}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gllm", description="Local LLM runtime for game NPCs")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    chat = sub.add_parser("chat", help="interactive streaming chat")
    _add_model_flags(chat)
    _add_sampling_flags(chat, 0.7)
    chat.add_argument("--system", "--persona", dest="system", default=None, help="system prompt / NPC persona")

    gen = sub.add_parser("generate", help="one completion of a prompt")
    gen.add_argument("prompt")
    _add_model_flags(gen)
    _add_sampling_flags(gen, 0.7)
    gen.add_argument("--system", default=None, help="system prompt (the prompt becomes a chat message)")
    gen.add_argument("--raw", action="store_true", help="complete the raw text, no chat template")
    gen.add_argument("--logprobs", type=field_flag(FIELDS_BY_NAME["logprobs"]), default=None,
                     help=FIELDS_BY_NAME["logprobs"].help)
    gen.add_argument("--json", action="store_true", help="print text, tokens, logprobs, usage, timings as JSON")
    _add_constraint_flags(gen)

    models = sub.add_parser("models", help="known and cached models")
    models.add_argument("--clean", action="store_true",
                        help="delete the float32 copies of GGUF files that earlier gllm versions kept in its cache")
    fetch = sub.add_parser("fetch", help="download the default (or a known) model into the cache")
    fetch.add_argument("name", nargs="?", default=DEFAULT_MODEL, choices=sorted(KNOWN_MODELS))
    fetch.add_argument("--quiet", action="store_true")

    from gllm import serve as serve_cmd
    serve = sub.add_parser("serve", help="serve the engine over ZeroMQ (--zmq) and/or OpenAI-style HTTP (--http)")
    serve_cmd.add_arguments(serve)
    serve.set_defaults(run=serve_cmd.run)
    return parser


def _engine(args: argparse.Namespace):
    from gllm.engine import LLMEngine
    engine = LLMEngine(args.model, device=args.device, quiet=args.quiet)
    if not args.quiet:
        print(f"gllm: {engine.model_name} on {engine.device}, {engine.weight_format} ({engine.dtype_reason}; "
              f"{engine.weight_bytes / 2**20:.0f} MiB of weights, loaded in {engine.load_seconds:.2f} s)",
              file=sys.stderr)
    return engine


def _request(args: argparse.Namespace, **fields):
    from gllm.engine import GenerationRequest
    return GenerationRequest(**{name: getattr(args, name) for name in _CLI_FIELDS}, **fields)


def cmd_generate(args: argparse.Namespace) -> int:
    with _engine(args) as engine:
        if args.raw:
            fields = {"prompt": args.prompt}
        else:
            messages = ([{"role": "system", "content": args.system}] if args.system else [])
            fields = {"messages": messages + [{"role": "user", "content": args.prompt}]}
        constraint = {f.name: getattr(args, f.name) for f in CONSTRAINT_FIELDS if getattr(args, f.name) is not None}
        req = _request(args, logprobs=args.logprobs, **fields, **constraint)
        if args.json:
            result = engine.generate([req])[0]
            out = {
                "text": result.text, "tokens": result.tokens, "finish_reason": result.finish_reason,
                "usage": asdict(result.usage), "timings": asdict(result.timings),
                "logprobs": None if result.logprobs is None else [
                    {"token_id": lp.token_id,
                     "token": engine.tokenizer.decode([lp.token_id], skip_special_tokens=False),
                     "logprob": lp.logprob,
                     "top": [{"token_id": t, "token": engine.tokenizer.decode([t], skip_special_tokens=False),
                              "logprob": v} for t, v in lp.top]}
                    for lp in result.logprobs],
            }
            print(json.dumps(out, ensure_ascii=False))
        else:
            handle = engine.submit(req)
            while not handle.done:
                for event in handle.poll():
                    print(event.text, end="", flush=True)
                if not handle.done:
                    import time
                    time.sleep(0.005)
            print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    engine = _engine(args)
    history: list[dict[str, str]] = []
    system = [{"role": "system", "content": args.system}] if args.system else []
    print("gllm chat — /reset clears the conversation, /save FILE and /load FILE keep it (with its KV cache), "
          "/quit or Ctrl-D leaves, Ctrl-C stops a reply.", file=sys.stderr)
    turns = itertools.count(1)
    last_id: list[str] = []    # the last finished reply's request id (what /save snapshots)

    async def reply(messages: list[dict[str, str]]) -> str:
        text = ""
        request_id = f"chat-{next(turns)}"
        async for event in engine.stream(_request(args, messages=messages, request_id=request_id)):
            if event.result is not None and event.result.finish_reason in ("stop", "length"):
                last_id[:] = [request_id]
            print(event.text, end="", flush=True)
            text += event.text
        return text

    try:
        while True:
            try:
                line = input("you> ").strip()
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print()
                continue
            if line in ("/quit", "/exit"):
                return 0
            if line == "/reset":
                history.clear()
                last_id.clear()
                print("(conversation cleared)", file=sys.stderr)
                continue
            if line.startswith(("/save", "/load")):
                command, _, path = line.partition(" ")
                if not path.strip():
                    print(f"({command} needs a file name)", file=sys.stderr)
                elif command == "/save":
                    _save_chat(engine, path.strip(), system + history, last_id)
                else:
                    loaded = _load_chat(engine, path.strip())
                    if loaded is not None:
                        system = [m for m in loaded[:1] if m["role"] == "system"]
                        history[:] = loaded[len(system):]
                        last_id.clear()
                continue
            if not line:
                continue
            history.append({"role": "user", "content": line})
            try:
                text = asyncio.run(reply(system + history))
                history.append({"role": "assistant", "content": text})
                print()
            except KeyboardInterrupt:  # leaving the stream cancels the request and frees its blocks
                history.pop()
                print("\n(reply cancelled)", file=sys.stderr)
    finally:
        engine.close()


def _save_chat(engine, path: str, messages: list[dict[str, str]], last_id: list[str]) -> None:
    from gllm.frontend.session_file import write_session
    blob = b""
    if last_id:
        try:
            blob = engine.snapshot(last_id[0])
        except ValueError as exc:   # nothing cached of it (evicted): the messages alone still load
            print(f"(no KV snapshot: {exc})", file=sys.stderr)
    try:
        size = write_session(path, messages, blob)
    except OSError as exc:
        print(f"(cannot save: {exc})", file=sys.stderr)
        return
    tokens = engine.snapshot_tokens(blob) if blob else 0
    print(f"(saved {len(messages)} messages and the KV of {tokens} tokens to {path}, {size} bytes)", file=sys.stderr)


def _load_chat(engine, path: str) -> list[dict[str, str]] | None:
    from gllm.frontend.session_file import read_session
    try:
        messages, blob = read_session(path)
    except (OSError, ValueError) as exc:
        print(f"(cannot load: {exc})", file=sys.stderr)
        return None
    restored = 0
    if blob:
        try:
            restored = engine.restore(blob).tokens
        except ValueError as exc:   # another model's, damaged: the messages still load, prefilled again
            print(f"(KV snapshot not restored: {exc})", file=sys.stderr)
    print(f"(loaded {len(messages)} messages; {restored} tokens restored to the KV cache)", file=sys.stderr)
    return messages


def cmd_models(args: argparse.Namespace) -> int:
    from gllm.engine.loading import old_conversions, remove_old_conversions
    print(f"cache: {gllm_home()}")
    for name, model in KNOWN_MODELS.items():
        path = cached_gguf_path(name)
        state = f"cached: {_gguf_weights(path)}" if path.exists() else "not fetched"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"  {name}{default}: {model.description} [{state}]")
    if args.clean:
        print(f"removed old float32 conversions: {remove_old_conversions() / 2**20:.0f} MiB freed")
    elif old_conversions():
        print(f"old float32 conversions nothing reads any more ({', '.join(map(str, old_conversions()))}): "
              f"remove them with `gllm models --clean`")
    return 0


def _gguf_weights(path) -> str:
    """E.g. "GGUF, 94 MiB: 210 Q4_1, 61 F32, 1 Q8_0 tensors; on the CPU the quantized ones run as they are"."""
    from gllm.formats.gguf import gguf_file_from_reader, open_gguf
    from gllm.formats.gguf_quants import PLANE_TYPES
    counts = gguf_file_from_reader(open_gguf(path), path).type_counts()
    kept = sum(n for t, n in counts.items() if t in PLANE_TYPES)
    listed = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda item: -item[1]))
    return (f"GGUF, {path.stat().st_size / 2**20:.0f} MiB: {listed} tensors"
            + ("; on the CPU its quantized projections run in their own blocks" if kept else ""))


def cmd_fetch(args: argparse.Namespace) -> int:
    path = fetch_known_model(args.name, quiet=args.quiet)
    if not args.quiet:
        print(path)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"generate": cmd_generate, "chat": cmd_chat, "models": cmd_models, "fetch": cmd_fetch}
    run = getattr(args, "run", None) or commands[args.command]
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"gllm: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
