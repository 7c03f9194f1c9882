"""Scheduled endpoint failures for the simulator (``inferplane simulate --faults FILE``).

A YAML or JSON file with a ``faults:`` list (or the list itself), each entry one event at a
virtual time (seconds after the first arrival of the replayed slice, after rate scaling)::

    faults:
      - {at: 30, endpoint: h100-3, event: down}         # connections refused, in-flight lost
      - {at: 90, endpoint: h100-3, event: up}           # back, with an empty KV cache
      - {at: 40, endpoint: h100-5, event: hung, for_s: 20}   # accepts, never answers
      - {at: 50, endpoint: api-0, event: "429", for_s: 10, retry_after_s: 5}

- ``down``: new requests fail to connect (re-placed before the first byte); requests in flight
  there fail mid-stream (502); health probes fail, so the scraper marks it unhealthy at its next
  probe (not before the gateway would send one: ``gateway.health_skip_while_serving`` skips the
  turns while a 2xx answer within ``health_skip_window_s``, after the last failed scrape, and no
  failed request in it vouch for it: a failed scrape forces the next probe only for the answers
  before it, answers after it still skip); its engine restarts empty on ``up``;
- ``hung``: the endpoint accepts requests and never answers: an attempt fails when the gateway's
  first-byte timeout (``gateway.first_byte_timeout``, derived from the predicted TTFT; when
  disabled, ``gateway.upstream_timeout_s``) runs out, then is re-placed, and consecutive
  timeouts eject it; health probes time out too;
- ``429``: every new request is answered ``429`` with ``Retry-After`` (a provider's rate limit),
  which the gateway treats as a failure before the first byte (re-placed);
- ``up``: ends whatever fault the endpoint had.

``for_s`` schedules the matching ``up``. Unknown endpoints, negative times and unknown events
are reported with the file and the entry's path (`ConfigError`), before anything runs; so is a
key given twice in one mapping, in YAML as in JSON (either parser would keep the last value).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from inferplane.config.loader import format_loc
from inferplane.errors import ConfigError
from inferplane.yamlio import parse_json, parse_yaml, read_text

__all__ = ["FaultEvent", "load_faults", "validate_faults"]

FaultKind = Literal["down", "up", "hung", "429"]


class FaultEvent(BaseModel):
    """One scheduled change of an endpoint's behaviour."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    at: float = Field(ge=0, description="virtual seconds after the first arrival")
    endpoint: str
    event: FaultKind
    for_s: float | None = Field(None, gt=0, description="schedule the matching `up` after this")
    retry_after_s: float = Field(1.0, gt=0, description="the Retry-After of a `429`")


def _parse(text: str, path: Path) -> object:
    # a repeated key is refused in either form, as in the fleet file
    if path.suffix.lower() == ".json":
        return parse_json(text, str(path))
    return parse_yaml(text, str(path))


def load_faults(path: str | Path, endpoints: Sequence[str]) -> list[FaultEvent]:
    """Read and check a fault schedule against the fleet's ``endpoints``; sorted by time."""
    p = Path(path)
    raw = _parse(read_text(p), p)
    if isinstance(raw, dict) and set(raw) == {"faults"}:
        raw = raw["faults"]
    if not isinstance(raw, list):
        raise ConfigError(str(p), [("faults", "expected a list of fault events (or `faults:`)")])
    return validate_faults(raw, endpoints, str(p))


def validate_faults(
    raw: Sequence[object], endpoints: Sequence[str], file: str = "<faults>"
) -> list[FaultEvent]:
    """Check fault entries (mappings) against the fleet; `ConfigError` naming every problem."""
    known = set(endpoints)
    events: list[FaultEvent] = []
    problems: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        if isinstance(item, dict) and isinstance(item.get("event"), int):
            item = {**item, "event": str(item["event"])}  # YAML reads 429 as a number
        try:
            ev = FaultEvent.model_validate(item)
        except ValidationError as exc:
            problems += [(f"faults[{i}].{format_loc(e['loc'])}", e["msg"]) for e in exc.errors()]
            continue
        if ev.endpoint not in known:
            problems.append(
                (f"faults[{i}].endpoint", f"unknown endpoint {ev.endpoint!r}; known: "
                 f"{', '.join(sorted(known))}")
            )
            continue
        if ev.for_s is not None and ev.event == "up":
            problems.append((f"faults[{i}].for_s", "an `up` event has no duration"))
            continue
        events.append(ev)
    if problems:
        raise ConfigError(file, problems)
    out: list[FaultEvent] = []
    for ev in events:
        out.append(ev)
        if ev.for_s is not None:
            out.append(FaultEvent(at=ev.at + ev.for_s, endpoint=ev.endpoint, event="up"))
    return sorted(out, key=lambda e: e.at)
