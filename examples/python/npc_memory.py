"""NPC memory across a save and a load: an NPC talks with the player, the game saves the session (the
messages and the KV snapshot of the conversation) to a file and quits; a new engine process loads the file,
restores the KV and the NPC goes on. The second process prints how long the restore took against
prefilling the same conversation again.

    python examples/python/npc_memory.py [--model NAME_OR_PATH] [--save npc_brann.gllmchat]

(`python examples/python/npc_memory.py --load FILE` is the second process; the first one starts it.)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from gllm.engine import GenerationRequest, GeneratorParams, LLMEngine
from gllm.frontend.session_file import read_session, write_session

SYSTEM = ("You are Brann, a tired town guard of Eldmoor. You have kept the river gate for twenty years. You "
          "know the smith (Hild, quick-tempered, honest), the priest (Father Oswin, who buries things at night) "
          "and the road north (wolves, and a burned watchtower). Answer in one or two short sentences.")
PLAYER_LINES = ["Good evening, guard. Quiet night?", "Who is the best smith in town?", "And the road north?"]
AFTER_LOAD = "Remind me: who did you say the smith was?"
PARAMS = GeneratorParams(max_seq_len=2048)


def say(engine: LLMEngine, messages: list[dict[str, str]], request_id: str) -> str:
    result = engine.generate(GenerationRequest(messages=messages, max_new_tokens=48, temperature=0,
                                               request_id=request_id))[0]
    return result.text


def play_and_save(model: str | None, path: str) -> None:
    with LLMEngine(model, PARAMS) as engine:
        messages = [{"role": "system", "content": SYSTEM}]
        for i, line in enumerate(PLAYER_LINES):
            messages.append({"role": "user", "content": line})
            print(f"player> {line}")
            answer = say(engine, messages, f"turn-{i}")
            print(f"brann>  {answer.strip()}")
            messages.append({"role": "assistant", "content": answer})
        blob = engine.snapshot(f"turn-{len(PLAYER_LINES) - 1}")   # the KV of the whole conversation so far
        size = write_session(path, messages, blob)
        print(f"(saved {len(messages)} messages + the KV of {engine.snapshot_tokens(blob)} tokens to {path}: "
              f"{size / 1e6:.2f} MB; the game quits)\n")


def load_and_continue(model: str | None, path: str) -> None:
    messages, blob = read_session(path)
    with LLMEngine(model, PARAMS) as engine:
        started = time.perf_counter()
        info = engine.restore(blob)
        restore_s = time.perf_counter() - started
        messages.append({"role": "user", "content": AFTER_LOAD})
        print(f"(a new process loaded {path}: {info.tokens} tokens of KV restored in {restore_s * 1e3:.1f} ms)")
        print(f"player> {AFTER_LOAD}")
        request = GenerationRequest(messages=messages, max_new_tokens=48, temperature=0)
        result = engine.generate(request)[0]
        print(f"brann>  {result.text.strip()}")
        print(f"(first token {result.timings.ttft_ms:.0f} ms after the request; {result.usage.cached_tokens} of "
              f"{result.usage.prompt_tokens} prompt tokens came from the restored cache)")
        prompt = engine.tokenize_request(request)
    # The same first token without the snapshot: the whole conversation prefilled again.
    with LLMEngine(model, PARAMS) as cold:
        started = time.perf_counter()
        cold.generate(GenerationRequest(prompt_token_ids=prompt, max_new_tokens=1, temperature=0))
        prefill_s = time.perf_counter() - started
    print(f"restore {restore_s * 1e3:.1f} ms + first token {result.timings.ttft_ms:.0f} ms, against "
          f"{prefill_s * 1e3:.0f} ms to prefill the {len(prompt)}-token conversation again")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--save", default="npc_brann.gllmchat", help="the save file")
    parser.add_argument("--load", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        load_and_continue(args.model, args.load)
        return
    play_and_save(args.model, args.save)
    second = [sys.executable, __file__, "--load", args.save] + (["--model", args.model] if args.model else [])
    sys.exit(subprocess.run(second).returncode)


if __name__ == "__main__":
    main()
