"""`HeldUpstream`, an upstream that answers only when a test lets it, and `config`, a one-endpoint
fleet file for it with the dispatch gate at zero (tests of the live request path)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.builders import model, pool_fleet, to_yaml
from tests.support.fake_upstream import chat_app

KEY = "sk-gate"


@dataclass
class HeldUpstream:
    """An OpenAI-style upstream that notes each prompt as it arrives and answers only once
    ``hold`` is set (a long generation, for as long as the test wants)."""

    arrived: list[str] = field(default_factory=list)
    hold: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    def app(self) -> web.Application:
        async def reply(prompt: str) -> str:
            self.arrived.append(prompt)
            self.changed.set()
            await self.hold.wait()
            return f"re: {prompt}"

        return chat_app(reply)

    async def until(self, n: int) -> list[str]:
        """The prompts arrived once ``n`` have (a liveness bound, not a speed target)."""
        async def wait() -> None:
            while len(self.arrived) < n:
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), 20.0)
        return list(self.arrived)


def config(up: int, hardware: str = "h100", **gateway: Any) -> str:
    """The fleet file: ``gateway`` adds to its gateway block."""
    return to_yaml(pool_fleet(
        up, key=KEY, substrate={"hardware": hardware}, models=[model(max_context=4096)],
        endpoint_fields={"name": "up", "max_concurrency": 8},
        gateway={"scrape_interval_s": 0.05, "seed": 1, "first_byte_timeout": {"floor_s": 120},
                 **gateway},
        admission={"queue": {"max_prefill_queue_s": 0, "default_deadline_ms": 30000}},
        batch={"poll_interval_s": 0.01, "max_concurrency": 2}))
