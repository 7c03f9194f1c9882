"""What an upstream answer is, without a transport: the relay's stream observations
(`StreamStats`), the OpenAI-dialect stream check (`OpenAIEvents`: error events, events that are
not JSON, a stream cut short), the ``usage`` parser and the failure-before-the-first-byte error.

No HTTP library is imported here, so the transport-neutral core (`inferplane.core`) and every
front end (the aiohttp gateway, the Envoy ext_proc picker, the batch lane) share these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Final

import orjson

from inferplane.errors import UpstreamError, UpstreamErrorEvent


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


class OpenAIEvents:
    """Checks an OpenAI-dialect stream as it is relayed: each complete ``data:`` line is JSON
    or ``[DONE]``, and the stream ends with ``[DONE]`` (as vLLM, SGLang and OpenAI send it) or,
    for engines that never send it (TGI before 2.2, some llama.cpp forks), cleanly after a
    chunk with a ``finish_reason``; what a client's SSE parser would choke on, or a stream cut
    short with a clean close before any finish reason, is a stream error (as a Messages stream
    without ``message_stop`` is). Only a line split across
    chunks is carried to the next; engines send whole events, so that is rare."""

    __slots__ = ("_tail", "done", "error", "error_at", "finished")

    #: a ``data:`` line longer than this (with no end in sight) is not an OpenAI event
    MAX_LINE = 16 * 1024 * 1024

    def __init__(self) -> None:
        self._tail = b""
        self.done = False
        self.finished = False  # a chunk with a finish reason went by
        self.error: Any = None  # an error event's ``error`` (vLLM, SGLang, OpenAI mid-stream)
        self.error_at = 0  # where in the last chunk fed the error event's line began

    def feed(self, chunk: bytes) -> str | None:
        """None, or what is wrong with the stream so far: an event that is not JSON, or an
        error event (``data: {"error": {...}}``, then `error` holds its ``error`` and
        `error_at` where its line began in ``chunk``, 0 if before it).

        On the relay's path for every event: each ``data:`` line is parsed once with orjson (the
        check itself), around it as little as Python allows (no copy of a chunk that ends with
        its line, ``[DONE]`` tried only when a line does not parse, the finish reason looked
        for in a plain loop and only until one is seen)."""
        tail = self._tail
        data = tail + chunk if tail else chunk
        cut = data.rfind(b"\n")
        if cut < 0:
            self._tail = data
            return None if len(data) <= self.MAX_LINE else (
                f"sent a line of more than {self.MAX_LINE} bytes")
        if cut == len(data) - 1:  # whole lines (as engines send them): nothing carried
            complete, self._tail = data, b""
        else:
            complete, self._tail = data[:cut], data[cut + 1 :]
        loads = orjson.loads
        lines = complete.split(b"\n")
        for line in lines:
            if not line or line[:5] != b"data:":  # blank lines, comments, event names
                continue
            try:
                obj = loads(line[5:])  # JSON's own whitespace around it is allowed
            except orjson.JSONDecodeError:
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    self.done = True
                    continue
                return f"sent a stream event that is not JSON: {excerpt(payload)}"
            if type(obj) is not dict:
                continue
            err = obj.get("error")
            if err and isinstance(err, dict | str):  # not null, false, "" or {}
                self.error = err
                at = 0  # where its line begins: off the hot path, this very line's offset
                for before in lines:
                    if before is line:
                        break
                    at += len(before) + 1
                self.error_at = max(0, at - len(tail))
                return error_message(err)
            if not self.finished:
                choices = obj.get("choices")
                if type(choices) is list:
                    for c in choices:
                        if type(c) is dict and c.get("finish_reason") is not None:
                            self.finished = True
                            break
        return None

    def failure(self, problem: str, upstream: str, tokens: int) -> UpstreamError:
        """`feed`'s ``problem`` as the stream error both front ends record (502): the upstream's
        own error event is an `UpstreamErrorEvent` (``client_fault`` when the event blames the
        request), anything else an `UpstreamError`; ``tokens``: the text events before it."""
        if self.error is None:
            return UpstreamError(problem, upstream=upstream)
        return UpstreamErrorEvent(
            f"sent an error event mid-stream after {tokens} tokens: {problem}",
            upstream=upstream, client_fault=client_fault(self.error),
        )

    def close(self) -> str | None:
        """At the upstream's end of the body: None, or what was missing."""
        if self._tail.strip() == b"data: [DONE]" or self._tail.strip() == b"data:[DONE]":
            self.done = True
        if self.done or self.finished:
            return None  # a clean end after a finish reason: complete without [DONE]
        return "the stream ended without its closing DONE event (cut short upstream)"


CLIENT_FAULT_TYPES: Final = frozenset({"BadRequestError", "invalid_request_error"})
"""An error event's ``type`` that blames the request: vLLM's and SGLang's exception for a bad
request, OpenAI's (and Anthropic's) type for one."""


def client_fault(error: Any) -> bool:
    """Whether an error event says the request was at fault (a 4xx ``code`` or a bad-request
    ``type``): then not the endpoint's failure (review27 S2)."""
    if type(error) is not dict:
        return False
    code = error.get("code")
    return (type(code) is int and 400 <= code < 500) or error.get("type") in CLIENT_FAULT_TYPES


def error_message(error: Any) -> str:
    """What an OpenAI-dialect error event says: its ``message`` (vLLM's, SGLang's, OpenAI's
    ``{"error": {"message", "type", "param", "code"}}``), the text of ``{"error": "text"}``, or
    the error as JSON, cut to 500 characters."""
    text: str
    if type(error) is dict and isinstance(error.get("message"), str):
        text = error["message"]
    elif isinstance(error, str):
        text = error
    else:
        text = orjson.dumps(error).decode()
    return text if len(text) <= 500 else text[:500] + "…"


def excerpt(data: bytes, limit: int = 120) -> str:
    text = data[:limit].decode("utf-8", "replace").strip()
    return repr(text + ("…" if len(data) > limit else ""))
