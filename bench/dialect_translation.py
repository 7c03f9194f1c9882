"""bench/dialect_translation: CPU cost of the Anthropic Messages dialect translation, in process.

    python bench/dialect_translation.py [--tokens 256] [--repeats 7]

Times, best of ``repeats`` (``time.process_time``), the three translations the dispatcher runs
for an ``anthropic`` endpoint: an OpenAI chat request → Messages request (a system prompt, a
3-turn conversation, one tool), a Messages answer → ``chat.completion``, and a Messages stream
of ``tokens`` text deltas (one event per read) → OpenAI SSE chunks. Prints µs per request and,
for the stream, µs per event. For comparison, it also times ``orjson.loads`` + ``dumps`` of the
request body (what renaming a model costs an OpenAI-dialect endpoint).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from inferplane.dispatch import anthropic

REQUEST = {
    "model": "claude", "max_tokens": 512, "stream": True, "temperature": 0.7,
    "messages": [
        {"role": "system", "content": "You are a terse assistant. " * 20},
        {"role": "user", "content": "What is the weather in Paris? " * 10},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"},
    ],
    "tools": [{"type": "function", "function": {
        "name": "weather", "description": "current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
}


def _events(tokens: int) -> list[bytes]:
    def ev(obj: dict[str, object]) -> bytes:
        return f"event: {obj['type']}\ndata: {json.dumps(obj)}\n\n".encode()

    out = [ev({"type": "message_start", "message": {"id": "msg_1", "model": "claude",
                                                    "usage": {"input_tokens": 300}}}),
           ev({"type": "content_block_start", "index": 0,
               "content_block": {"type": "text", "text": ""}})]
    out += [ev({"type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": f" word{i}"}}) for i in range(tokens)]
    out += [ev({"type": "content_block_stop", "index": 0}),
            ev({"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": tokens}}),
            ev({"type": "message_stop"})]
    return out


def best(fn: Callable[[], object], n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(n):
            fn()
        times.append((time.process_time() - t0) / n)
    return min(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    body = orjson.dumps(REQUEST)
    answer = orjson.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude",
        "content": [{"type": "text", "text": " ".join(f"word{i}" for i in range(args.tokens))}],
        "stop_reason": "end_turn", "usage": {"input_tokens": 300, "output_tokens": args.tokens},
    })
    events = _events(args.tokens)

    def stream() -> None:
        t = anthropic.StreamTranslator(include_usage=True)
        for e in events:
            t.feed(e)
        t.close()

    rows = [
        ("request → Messages", best(lambda: orjson.dumps(anthropic.to_messages_request(
            orjson.loads(body), model="claude-x", default_max_tokens=1024)), 2000, args.repeats)),
        ("model rename only (loads + dumps)", best(
            lambda: orjson.dumps(orjson.loads(body)), 2000, args.repeats)),
        ("Messages answer → chat.completion", best(
            lambda: orjson.dumps(anthropic.to_chat_completion(answer)), 2000, args.repeats)),
        (f"Messages stream of {args.tokens} deltas → chunks", best(stream, 50, args.repeats)),
    ]
    print(f"# bench/dialect_translation — {date.today()} — {platform.node()} "
          f"({platform.machine()}), Python {platform.python_version()}")
    print("| translation | µs per request | µs per event |")
    print("|---|---:|---:|")
    for name, us in rows:
        per_event = f"{us / len(events):.2f}" if "stream" in name else ""
        print(f"| {name} | {us:.1f} | {per_event} |")


if __name__ == "__main__":
    main()
