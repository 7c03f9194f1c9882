"""Write the synthetic sample trace `examples/traces/sample_conversation.jsonl`.

It is in the Mooncake format `inferplane simulate` reads (`twin/traces/loader.py`): one JSON
object a line, ``timestamp`` (ms from the start), ``input_length``, ``output_length`` and
``hash_ids`` (one id per 512-token prompt block; requests sharing a leading run of ids share that
prompt prefix). Nothing in it comes from a real trace: conversations arrive as a Poisson process,
each turn's prompt is the conversation so far (its earlier blocks) plus a new message, every
prompt starts with one shared system block (id 0, as in the Mooncake trace), and lengths are
drawn from log-normal distributions. The shape (about 3.3 requests/s, long growing prompts,
prefix reuse) is that of a conversation service; use a real trace for conclusions about one.

    python scripts/make_sample_trace.py [--out PATH] [--seconds 120] [--seed 7]

Deterministic for a given seed (the shipped file: the defaults).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

BLOCK = 512
OUT = Path(__file__).resolve().parent.parent / "examples" / "traces" / "sample_conversation.jsonl"


def lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A log-normal draw with this mean."""
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def generate(seconds: float, seed: int, rate_per_s: float = 3.3) -> list[dict[str, object]]:
    rng = random.Random(seed)
    next_id = 1  # 0: the shared system block
    live: list[list[int]] = []  # block ids of each open conversation so far
    lines: list[dict[str, object]] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= seconds:
            return lines
        if live and rng.random() < 0.55:  # a next turn of an open conversation
            i = rng.randrange(len(live))
            blocks = live[i]
        else:  # a new conversation: a first message of a few thousand tokens
            blocks = [0]
            live.append(blocks)
            i = len(live) - 1
        new_tokens = max(64, int(lognormal(rng, 2500 if len(blocks) == 1 else 1200, 0.9)))
        total = (len(blocks) - 1) * BLOCK + new_tokens + rng.randrange(1, BLOCK)
        while len(blocks) * BLOCK < total:
            blocks.append(next_id)
            next_id += 1
        output = max(1, min(2000, int(lognormal(rng, 340, 0.8))))
        lines.append({"timestamp": int(t * 1000), "input_length": total,
                      "output_length": output, "hash_ids": list(blocks)})
        # the answer becomes part of the conversation's next prompt
        for _ in range(math.ceil(output / BLOCK)):
            blocks.append(next_id)
            next_id += 1
        if len(blocks) * BLOCK > 60_000 or rng.random() < 0.15:  # the conversation ends
            live.pop(i)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seconds", type=float, default=120.0)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    with a.out.open("w") as f:
        for line in generate(a.seconds, a.seed):
            f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
