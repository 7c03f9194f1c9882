"""What an upstream answer is, without a transport: the relay's stream observations
(`StreamStats`), the ``usage`` parser and the failure-before-the-first-byte error.

No HTTP library is imported here, so the transport-neutral core (`inferplane.core`) and every
front end (the aiohttp gateway, the Envoy ext_proc picker, the batch lane) share these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import orjson

from inferplane.errors import UpstreamError


class UpstreamAttemptFailed(UpstreamError):
    """The upstream failed before sending a byte of the answer: the request may be re-placed."""

    def __init__(
        self,
        message: str,
        *,
        upstream: str,
        reason: str,
        status: int | None = None,
        body: bytes = b"",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message, upstream=upstream)
        self.reason = reason
        self.upstream_status = status
        self.body = body
        self.retry_after_s = retry_after_s  # the upstream's Retry-After, when it sent one


_TEXT_EVENT = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')


@dataclass(slots=True)
class StreamStats:
    """What the relay observed: first-byte time, inter-chunk gaps, usage if the upstream sent it."""

    started: float
    first_byte: float | None = None
    last_byte: float | None = None
    events: int = 0
    gaps: list[float] = field(default_factory=list)
    usage_line: bytes | None = None
    tokens: int = 0
    """Events that carried generated text (a non-empty ``content`` or ``text``): the completion
    tokens billed when the stream ends without a usage chunk (one token an event, as vLLM, SGLang
    and the emulator stream)."""

    def observe(self, chunk: bytes, now: float) -> None:
        """One chunk of an SSE answer arrived at ``now`` (perf_counter seconds)."""
        events = n = chunk.count(b"data:")
        if self.first_byte is None:
            self.first_byte = now
            n -= 1
        elif self.last_byte is not None and n > 0:
            self.gaps.append((now - self.last_byte) / n)
        self.last_byte = now
        self.events += events
        self.tokens += len(_TEXT_EVENT.findall(chunk))
        if b'"usage"' in chunk:
            self.usage_line = chunk


def parse_usage(payload: bytes | None, *, sse: bool) -> dict[str, Any] | None:
    """The ``usage`` object of a JSON answer, or of the SSE chunk that carries it."""
    if not payload:
        return None
    candidates: list[bytes]
    if sse:
        candidates = [
            line[5:].strip()
            for line in payload.split(b"\n")
            if line.startswith(b"data:") and b'"usage"' in line
        ]
    else:
        candidates = [payload]
    for c in reversed(candidates):
        try:
            obj = orjson.loads(c)
        except orjson.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
            usage: dict[str, Any] = obj["usage"]
            return usage
    return None
