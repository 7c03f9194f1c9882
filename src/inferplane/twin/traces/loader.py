"""Loaders for real request traces, and slicing them for replay.

Two formats are understood (see docs/simulator.md, "Traces"):

* **mooncake** -- JSON Lines, one request a line: ``timestamp`` (ms from the start of the trace),
  ``input_length``, ``output_length`` and ``hash_ids`` (one id per 512-token prompt block).
* **azure** -- the Azure LLM inference trace CSV: ``TIMESTAMP`` (``2023-11-16 18:15:46.6805900``,
  seven fractional digits), ``ContextTokens``, ``GeneratedTokens``. No prefix information.

Both load into :class:`TraceRequest` with ``arrival_s`` in seconds. A file that cannot be read as
its format raises :class:`TraceError`, whose message names the file, the 1-based line and the
problem -- a user error, not a stack trace.
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib
import itertools
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = [
    "TraceError",
    "TraceRequest",
    "load_azure",
    "load_mooncake",
    "load_trace",
    "slice_trace",
]

_loads: Callable[[bytes | str], Any] = json.loads
_JSONError: tuple[type[Exception], ...] = (ValueError,)
try:  # orjson is optional (not a declared dependency); it parses the Mooncake file faster
    _orjson = importlib.import_module("orjson")
    _loads = _orjson.loads
    _JSONError = (_orjson.JSONDecodeError,)
except ImportError:  # pragma: no cover - depends on the environment
    pass

FORMATS = ("mooncake", "azure")
_EXTENSIONS = {".jsonl": "mooncake", ".json": "mooncake", ".csv": "azure"}


class TraceError(ValueError):
    """A trace file that cannot be loaded; the message names the file, line and problem."""

    def __init__(self, path: str | Path, line: int | None, problem: str) -> None:
        self.path = str(path)
        self.line = line
        self.problem = problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace.

    ``arrival_s`` is seconds from the start of the trace; ``hash_ids`` are the prompt's 512-token
    block ids (empty when the trace has no prefix information).
    """

    arrival_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


def _read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TraceError(path, None, f"cannot read trace file: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise TraceError(path, line, "not UTF-8 text") from None


def _count(value: object, field: str, path: Path, line: int) -> int:
    """Validate a non-negative integer field (JSON ``12.0`` is accepted as 12)."""
    if type(value) is int:
        if value < 0:
            raise TraceError(path, line, f"negative {field}: {value}")
        return value
    if isinstance(value, float) and value.is_integer():
        return _count(int(value), field, path, line)
    if value is None:
        raise TraceError(path, line, f"{field} is null")
    raise TraceError(path, line, f"{field} must be a non-negative integer, got {value!r}")


def _mooncake_row(obj: object, path: Path, line: int) -> TraceRequest:
    if not isinstance(obj, dict):
        raise TraceError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    try:
        ts = obj["timestamp"]
        input_length = obj["input_length"]
        output_length = obj["output_length"]
        hash_ids = obj["hash_ids"]
    except KeyError as exc:
        raise TraceError(path, line, f"missing field {exc.args[0]!r}") from None
    if type(ts) not in (int, float) or not math.isfinite(ts):
        raise TraceError(path, line, f"timestamp must be a number, got {ts!r}")
    if ts < 0:
        raise TraceError(path, line, f"negative timestamp: {ts}")
    if not isinstance(hash_ids, list):
        raise TraceError(path, line, f"hash_ids must be a list, got {hash_ids!r}")
    for h in hash_ids:
        if type(h) is not int:
            raise TraceError(path, line, f"hash_ids must hold integers, got {h!r}")
    return TraceRequest(
        arrival_s=ts / 1000.0,
        input_tokens=_count(input_length, "input_length", path, line),
        output_tokens=_count(output_length, "output_length", path, line),
        hash_ids=tuple(hash_ids),
    )


def _sorted_by_arrival(reqs: list[TraceRequest]) -> list[TraceRequest]:
    arrivals = [r.arrival_s for r in reqs]
    if all(a <= b for a, b in itertools.pairwise(arrivals)):
        return reqs
    return sorted(reqs, key=lambda r: r.arrival_s)  # stable: ties keep file order


def load_mooncake(path: str | Path) -> list[TraceRequest]:
    """Load a Mooncake JSON Lines trace; ``arrival_s`` is ``timestamp / 1000``.

    Blank lines are skipped. Requests are returned in arrival order (the file's order when it is
    already sorted, which the published traces are). Raises :class:`TraceError` on bad JSON, a
    missing field, a negative or non-integer length, or a truncated last line.
    """
    p = Path(path)
    text = _read_text(p)
    lines = text.splitlines()
    numbered = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not numbered:
        raise TraceError(p, None, "trace contains no requests")
    objs: list[object] | None = None
    try:  # fast path: one parse of the whole file as a JSON array
        parsed = _loads("[" + ",".join(ln for _, ln in numbered) + "]")
        if (
            isinstance(parsed, list)
            and len(parsed) == len(numbered)
            and all(type(o) is dict for o in parsed)
        ):
            objs = parsed
    except _JSONError:
        objs = None
    if objs is None:  # slow path, line by line, to name the offending line
        objs = []
        truncated = not text.endswith(("\n", "\r"))
        for line_no, ln in numbered:
            try:
                objs.append(_loads(ln))
            except _JSONError as exc:
                if truncated and line_no == len(lines):
                    problem = "truncated last line (no trailing newline) is not valid JSON"
                else:
                    problem = f"invalid JSON: {exc}"
                raise TraceError(p, line_no, problem) from None
    reqs = [
        _mooncake_row(obj, p, line_no) for (line_no, _), obj in zip(numbered, objs, strict=True)
    ]
    return _sorted_by_arrival(reqs)


_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()


_TIMESTAMP = re.compile(r"\s*(\d{4}-\d{2}-\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*")


def _parse_timestamp(value: str, path: Path, line: int, days: dict[str, int]) -> int:
    """Parse ``YYYY-MM-DD HH:MM:SS[.fffffff]`` (any number of fraction digits) to integer ns."""
    m = _TIMESTAMP.fullmatch(value)
    try:
        if m is None:
            raise ValueError(value)
        date_s, h, mi, sec, frac = m.groups()
        day = days.get(date_s)
        if day is None:
            day = _dt.date.fromisoformat(date_s).toordinal() - _EPOCH_ORDINAL
            days[date_s] = day
        hh, mm, ss = int(h), int(mi), int(sec)
        if hh > 23 or mm > 59 or ss > 60:
            raise ValueError(value)
    except ValueError:
        raise TraceError(
            path, line, f"bad TIMESTAMP {value!r} (expected 'YYYY-MM-DD HH:MM:SS.fffffff')"
        ) from None
    nanos = int((frac + "00000000")[:9]) if frac else 0
    return (day * 86400 + hh * 3600 + mm * 60 + ss) * 1_000_000_000 + nanos


_AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")


def _int_cell(value: str, field: str, path: Path, line: int) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise TraceError(
            path, line, f"{field} must be a non-negative integer, got {value!r}"
        ) from None
    if n < 0:
        raise TraceError(path, line, f"negative {field}: {n}")
    return n


def load_azure(path: str | Path) -> list[TraceRequest]:
    """Load an Azure LLM inference trace CSV; ``arrival_s`` is relative to the first row.

    Timestamps may carry any number of fractional digits (the published file has seven) and are
    converted exactly, in integer nanoseconds, before being re-based. Requests are returned in
    arrival order. Raises :class:`TraceError` on a missing column, a bad timestamp, a negative or
    non-integer token count, or a short row.
    """
    p = Path(path)
    text = _read_text(p)
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    if header is None:
        raise TraceError(p, None, "trace is empty (no header row)")
    names = [h.strip() for h in header]
    missing = [c for c in _AZURE_COLUMNS if c not in names]
    if missing:
        raise TraceError(p, 1, f"missing column(s) {', '.join(missing)} in header {names!r}")
    i_ts, i_in, i_out = (names.index(c) for c in _AZURE_COLUMNS)
    need = max(i_ts, i_in, i_out) + 1
    days: dict[str, int] = {}
    parsed: list[tuple[int, int, int]] = []
    for line_no, row in enumerate(rows, start=2):
        if not row or (len(row) == 1 and not row[0].strip()):
            continue
        if len(row) < need:
            raise TraceError(p, line_no, f"expected {len(names)} columns, got {len(row)}")
        parsed.append(
            (
                _parse_timestamp(row[i_ts], p, line_no, days),
                _int_cell(row[i_in], "ContextTokens", p, line_no),
                _int_cell(row[i_out], "GeneratedTokens", p, line_no),
            )
        )
    if not parsed:
        raise TraceError(p, None, "trace contains no requests")
    t0 = parsed[0][0]
    reqs = [TraceRequest((ns - t0) / 1e9, n_in, n_out) for ns, n_in, n_out in parsed]
    if any(r.arrival_s < 0 for r in reqs):  # unsorted file: re-base on the earliest row instead
        first = min(ns for ns, _, _ in parsed)
        reqs = [TraceRequest((ns - first) / 1e9, n_in, n_out) for ns, n_in, n_out in parsed]
    return _sorted_by_arrival(reqs)


def load_trace(path: str | Path, format: str | None = None) -> list[TraceRequest]:
    """Load a trace in ``format`` ("mooncake" or "azure"), guessed from the extension if None.

    ``.jsonl``/``.json`` mean mooncake and ``.csv`` means azure; anything else is a
    :class:`TraceError` asking for an explicit format.
    """
    p = Path(path)
    fmt = format
    if fmt is None:
        fmt = _EXTENSIONS.get(p.suffix.lower())
        if fmt is None:
            raise TraceError(
                p,
                None,
                f"cannot guess the trace format from the extension {p.suffix!r}; "
                f"pass one of {', '.join(FORMATS)}",
            )
    fmt = fmt.lower()
    if fmt == "mooncake":
        return load_mooncake(p)
    if fmt == "azure":
        return load_azure(p)
    raise TraceError(
        p, None, f"unknown trace format {format!r}; expected one of {', '.join(FORMATS)}"
    )


def slice_trace(
    reqs: Sequence[TraceRequest],
    start_s: float = 0.0,
    duration_s: float | None = None,
    rate_scale: float = 1.0,
    limit: int | None = None,
) -> list[TraceRequest]:
    """Return the requests arriving in ``[start_s, start_s + duration_s)``, re-based and scaled.

    Arrivals are shifted so the window start is time 0, then divided by ``rate_scale`` (2.0
    replays the window twice as fast: half the inter-arrival times, twice the request rate).
    ``duration_s=None`` runs to the end of the trace; ``limit`` keeps at most that many requests.
    ``reqs`` must be in arrival order, as the loaders return them.
    """
    if rate_scale <= 0 or not math.isfinite(rate_scale):
        raise ValueError(f"rate_scale must be a positive number, got {rate_scale}")
    if duration_s is not None and duration_s < 0:
        raise ValueError(f"duration_s must be >= 0, got {duration_s}")
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    end = math.inf if duration_s is None else start_s + duration_s
    out: list[TraceRequest] = []
    for r in reqs:
        if r.arrival_s < start_s:
            continue
        if r.arrival_s >= end or (limit is not None and len(out) >= limit):
            break
        out.append(replace(r, arrival_s=(r.arrival_s - start_s) / rate_scale))
    return out
