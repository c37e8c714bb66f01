"""Long ChatML training examples for throughput benchmarks, built from the bundled demo data.

Each example chains bundled conversations into one multi-turn chat until it reaches about
`target_tokens` tokens of the given tokenizer, so the 1B-shape benchmark trains on ~1,750-token
sequences like the published comparison. Deterministic: same inputs, same examples.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "turkish-demo.jsonl"


def long_chats(tokenizer, jinja: str, *, count: int, target_tokens: int, seed: int = 0) -> list[dict]:
    pool = [json.loads(line)["messages"] for line in DATA.read_text(encoding="utf-8").splitlines()]
    pool = [[m for m in msgs if m["role"] != "system"] for msgs in pool]
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        messages: list[dict] = []
        while True:
            candidate = messages + rng.choice(pool)
            text = tokenizer.apply_chat_template(candidate, chat_template=jinja, tokenize=False)
            if len(tokenizer(text, add_special_tokens=False).input_ids) > target_tokens and messages:
                break
            messages = candidate
        examples.append({"messages": messages})
    return examples
