"""Checking a batch input file (JSONL) at upload: every line, with its line number.

Each non-empty line must be a JSON object ``{"custom_id", "method": "POST", "url", "body"}``:
``custom_id`` a non-empty string unique in the file, ``url`` one of the batchable endpoints,
``body`` an object that passes the same checks as a direct request (`api.validation.validate`)
and does not ask to stream. The first bad line is a 400 naming its number and the field.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from inferplane.core.validation import validate
from inferplane.errors import InvalidRequestError
from inferplane.types import ApiKind

ENDPOINTS: dict[str, ApiKind] = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/embeddings": "embeddings",
}


@dataclass(frozen=True, slots=True)
class InputLine:
    line_no: int  # 1-based, as an editor shows it
    custom_id: str
    url: str
    body: bytes  # the line's ``body`` object, re-serialised


def _bad(line_no: int, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"line {line_no}: {message}", param="file", code="invalid_file")


def parse_input(content: bytes, max_lines: int) -> list[InputLine]:
    """Every request of a batch input file, or a 400 naming the first bad line."""
    out = list(iter_input(content.split(b"\n"), max_lines))
    if not out:
        raise InvalidRequestError("the file has no requests", param="file", code="invalid_file")
    return out


def check_input(lines: Iterable[bytes], max_lines: int) -> int:
    """Check a file line by line without keeping it (an upload streamed to disk); returns the
    number of requests, or raises the 400 naming the first bad line."""
    n = sum(1 for _ in iter_input(lines, max_lines))
    if not n:
        raise InvalidRequestError("the file has no requests", param="file", code="invalid_file")
    return n


def iter_input(lines: Iterable[bytes], max_lines: int) -> Iterator[InputLine]:
    """The requests of a file's lines, checked one by one."""
    seen: set[str] = set()
    count = 0
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            obj: Any = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _bad(i, f"malformed JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise _bad(i, "must be a JSON object")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise _bad(i, "'custom_id' must be a non-empty string")
        if cid in seen:
            raise _bad(i, f"duplicate custom_id {cid!r}; each must be unique in the file")
        seen.add(cid)
        if obj.get("method") != "POST":
            raise _bad(i, f"'method' must be \"POST\", got {obj.get('method')!r}")
        url = obj.get("url")
        if not isinstance(url, str) or url not in ENDPOINTS:
            raise _bad(i, f"'url' must be one of {', '.join(ENDPOINTS)}, got {url!r}")
        body = obj.get("body")
        if not isinstance(body, dict):
            raise _bad(i, "'body' must be a JSON object")
        try:
            validate(ENDPOINTS[url], body)
        except InvalidRequestError as exc:
            raise _bad(i, f"body: {exc.message}") from None
        if body.get("stream"):
            raise _bad(i, "body: 'stream' is not supported in a batch")
        extra = set(obj) - {"custom_id", "method", "url", "body"}
        if extra:
            raise _bad(i, f"unknown field(s) {', '.join(sorted(extra))}")
        count += 1
        if count > max_lines:
            raise _bad(i, f"more than {max_lines} requests in one file")
        yield InputLine(i, cid, url, orjson.dumps(body))
