"""A game loop talking to `gllm serve` over the ZeroMQ bridge: three NPCs answer the player at 60 fps.

The loop never waits on the model: each frame it calls `client.poll(0)` (or spends what is left of the
frame budget, at most 2 ms, waiting for text), shows whatever text arrived, and goes on. The guard
faces the player, so his request gets the highest priority; the villagers' chatter is cancelled when
the player walks away.

    gllm serve --model PATH                      # in another terminal (or: python -m gllm.bridge ...)
    python examples/python/bridge_client.py [--zmq tcp://127.0.0.1:5555] [--token SECRET]
    python examples/python/bridge_client.py --spawn   # start a server on the tiny test model first
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from gllm.bridge.cli import READY_PREFIX
from gllm.bridge.client import BridgeClient, Done, Error, Token

FRAME_S = 1 / 60
LORE = ("You live in Eldmoor, a river town under the Ashen Mountains. The old dragon Veyra sleeps in the "
        "northern peaks. Answer in character, in one or two short sentences.")
NPCS = {  # name: (persona, priority)
    "Guard": ("You are Brann, a tired town guard who distrusts strangers.", 10),
    "Smith": ("You are Hilde, a cheerful blacksmith.", 0),
    "Priest": ("You are Father Osric, a nervous priest.", 0),
}
PLAYER_LINE = "Have you seen anything strange near the mountains lately?"


def spawn_server() -> tuple[subprocess.Popen, str]:
    """Start `python -m gllm.bridge` on the tiny test model and read its endpoint from its ready line."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
    import make_test_models
    print("(starting a server on the tiny random test model, so the words are noise)")
    model = make_test_models.build_all()["tiny-llama32"]
    proc = subprocess.Popen([sys.executable, "-m", "gllm.bridge", "--model", str(model), "--zmq", "tcp://127.0.0.1:*",
                             "--max-seq-len", "1024"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:                   # the server prints this line once it listens
        if line.startswith(READY_PREFIX):
            return proc, line[len(READY_PREFIX):].strip()
    raise RuntimeError(f"the server exited with {proc.wait()} before listening")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--zmq", default="tcp://127.0.0.1:5555")
    ap.add_argument("--token", default=None)
    ap.add_argument("--spawn", action="store_true", help="start a server on the tiny test model first")
    ap.add_argument("--seconds", type=float, default=20.0, help="stop the game after this long")
    args = ap.parse_args()
    server, address = spawn_server() if args.spawn else (None, args.zmq)
    try:
        with BridgeClient(address, token=args.token, name="example-game/0.1") as client:
            welcome = client.connect()
            print(f"connected: {welcome.model} (max_seq_len {welcome.max_seq_len}) on {welcome.server}\n")
            return game_loop(client, args.seconds)
    finally:
        if server is not None:
            server.terminate()                 # SIGTERM: the server ends its requests and exits
            server.wait()


def game_loop(client: BridgeClient, seconds: float) -> int:
    speech: dict[str, str] = {}            # request id -> text so far
    who: dict[str, str] = {}               # request id -> NPC name
    first_text_at: dict[str, float] = {}
    asked_at = 0.0
    frame, worst_poll_ms, frame_ms = 0, 0.0, FRAME_S * 1000
    start = time.perf_counter()
    walked_away = False
    while time.perf_counter() - start < seconds:
        frame_start = time.perf_counter()
        frame += 1

        # --- game logic -------------------------------------------------------------------------
        if frame == 10:                     # the player speaks to everyone around
            asked_at = time.perf_counter()
            for name, (persona, priority) in NPCS.items():
                rid = client.generate(messages=[{"role": "system", "content": f"{LORE} {persona}"},
                                                {"role": "user", "content": PLAYER_LINE}],
                                      max_tokens=40, temperature=0.7, top_p=0.9, seed=frame, priority=priority,
                                      stop=["\n\n"])
                speech[rid], who[rid] = "", name
        if frame == 60 and not walked_away:  # the player walks off: the villagers stop talking
            walked_away = True
            for rid, name in who.items():
                if name != "Guard" and rid in client.in_flight:
                    client.cancel(rid)
        if frame % 30 == 0:
            client.frame(frame_ms, FRAME_S * 1000)   # tell the server how the frames are going

        # --- bridge: never more than 2 ms of the frame --------------------------------------------
        budget_ms = max(0.0, min(2.0, (FRAME_S - (time.perf_counter() - frame_start)) * 1000 - 1))
        t0 = time.perf_counter()
        events = client.poll(budget_ms)
        worst_poll_ms = max(worst_poll_ms, (time.perf_counter() - t0) * 1000)
        for ev in events:
            if isinstance(ev, Token) and ev.id in speech:
                speech[ev.id] += ev.text
                first_text_at.setdefault(ev.id, time.perf_counter())
                print(f"[{who[ev.id]:6}] {ev.text!r}")
            elif isinstance(ev, Done) and ev.id in speech:
                ttft = (first_text_at.get(ev.id, time.perf_counter()) - asked_at) * 1000
                print(f"[{who[ev.id]:6}] done ({ev.finish_reason}, {ev.usage.get('completion_tokens')} tokens, "
                      f"first text after {ttft:.0f} ms): {ev.text!r}")
            elif isinstance(ev, Error):
                print(f"error: {ev.code}: {ev.message}")
        if asked_at and not client.in_flight:
            break

        # --- render, then sleep to the next frame ------------------------------------------------------
        frame_ms = (time.perf_counter() - frame_start) * 1000
        time.sleep(max(0.0, FRAME_S - (time.perf_counter() - frame_start)))
    print(f"\n{frame} frames; the slowest poll took {worst_poll_ms:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
