"""Listing and exporting records: the query, its opaque cursor, and the export formats.

A `Query` selects one tenant's records (or every tenant's, for ``inferplane export``) by time
(``since <= at_unix < until``), workload class, model and substrate, in storage order (the
ledger's row id); a page ends with an opaque cursor naming the last row returned. Exports stream
`ExportRow`s into NDJSON, CSV or Parquet (schema ``inferplane.export/1``, docs/evidence.md).
An export of a pruned ledger carries each pruned shard's latest prune anchor (schema
``inferplane.prune/1``): the first lines of NDJSON, ``prune_anchors`` in Parquet's metadata.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import IO, TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from inferplane.ledger.chain import PruneAnchor

log = logging.getLogger("inferplane.ledger")

EXPORT_SCHEMA = "inferplane.export/1"
ANCHOR_SCHEMA = "inferplane.prune/1"
"""An exported prune anchor's ``schema`` (an NDJSON line, an item of Parquet's
``prune_anchors``)."""
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


class BadQuery(ValueError):
    """A query parameter that cannot be used (the message names it: ``param``)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class Query:
    tenant: str | None
    since: float | None = None
    until: float | None = None
    workload_class: str | None = None
    model: str | None = None
    substrate: str | None = None
    limit: int = DEFAULT_LIMIT
    after: int = 0
    """Return rows whose row id is greater than this (decoded from the cursor)."""


def where_clause(q: Query | None, mark: str, row_id: str) -> tuple[str, list[Any]]:
    """The SQL filter selecting ``q``'s records (``""`` when none) and its arguments.

    ``mark`` is the driver's placeholder (``?`` for sqlite3, ``%s`` for psycopg); ``row_id`` is
    the column the cursor counts (`Query.after`).
    """
    where: list[str] = []
    args: list[Any] = []
    if q is not None:
        for col, val in (("tenant", q.tenant), ("workload_class", q.workload_class),
                         ("model", q.model), ("substrate", q.substrate)):
            if val is not None:
                where.append(f"{col} = {mark}")
                args.append(val)
        if q.since is not None:
            where.append(f"at_unix >= {mark}")
            args.append(q.since)
        if q.until is not None:
            where.append(f"at_unix < {mark}")
            args.append(q.until)
        if q.after:
            where.append(f"{row_id} > {mark}")
            args.append(q.after)
    return (" WHERE " + " AND ".join(where) if where else ""), args


@dataclass(slots=True)
class Page:
    items: list[dict[str, Any]] = field(default_factory=list)
    next_cursor: str | None = None


@dataclass(frozen=True, slots=True)
class ExportRow:
    """One stored record with its position in the chain."""

    row_id: int
    shard: str
    seq: int
    decision_id: str
    at_unix: float
    tenant: str
    workload_class: str | None
    model: str | None
    substrate: str | None
    endpoint: str | None
    status: int | None
    cost_usd: float | None
    receipt: str
    prev_hash: str
    chain_hash: str
    text: str
    ttft_s: float | None = None


_MISSING = object()
CURRENT_RECORD_SCHEMA = "inferplane.decision/2"
"""`record.RECORD_SCHEMA` (which imports this module): every column of such a record is set."""

INDEXED_COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("decision_id", ("decision_id",)),
    ("at_unix", ("at_unix",)),
    ("tenant", ("tenant",)),
    ("endpoint", ("outcome", "endpoint")),
    ("workload_class", ("request", "workload_class")),
    ("model", ("request", "model")),
    ("substrate", ("picked", "substrate")),
    ("status", ("outcome", "status")),
    ("ttft_s", ("outcome", "ttft_s")),
    ("cost_usd", ("outcome", "cost_usd")),
)
"""Each indexed column and where its value sits in the hashed record (`record.encode_entry`
fills the columns from the same values). Only the record is covered by the receipt and the
chain; the columns are copies for SQL filters and exports, which `column_mismatch` checks."""


def _field(rec: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if rec is None:
            return None  # an object that is null (``picked`` when nothing was picked)
        if not isinstance(rec, dict) or key not in rec:
            return _MISSING
        rec = rec[key]
    return rec


def column_mismatch(row: Any, rec: Any) -> str | None:
    """The first indexed column of ``row`` (an `ExportRow`, or a spooled `record.Entry`) whose
    value is not the parsed record's (``rec``),
    or None. A field the record does not have (a record migrated from an older schema) is not
    compared, nor is a column an older writer left empty (a record of another ``schema``)."""
    if not isinstance(rec, dict):
        return "record"
    current = rec.get("schema") == CURRENT_RECORD_SCHEMA
    for col, path in INDEXED_COLUMNS:
        want = _field(rec, path)
        if want is _MISSING:
            continue
        have = getattr(row, col)
        if have is None and not current:
            continue  # an older record's column left empty by its writer or the migration
        if have != want and not (want is None and isinstance(have, float)
                                 and not math.isfinite(have)):
            return col  # (NaN and ±inf, which JSON writes as null, are stored as they are)
    return None


def encode_cursor(row_id: int) -> str:
    return base64.urlsafe_b64encode(f"c1:{row_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        tag, _, num = raw.partition(":")
        if tag != "c1" or not num.isdigit():
            raise ValueError
        return int(num)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadQuery("cursor", "cursor is not one this gateway returned") from None


def parse_time(value: str, param: str) -> float:
    """Unix seconds, or an ISO 8601 date/time (UTC when no offset is given)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(
            param, f"{param} must be unix seconds or an ISO 8601 time; got {value!r}"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def parse_query(tenant: str, params: dict[str, str]) -> Query:
    """A `Query` from ``GET /v1/decisions`` parameters; `BadQuery` for a bad one."""
    known = {"since", "until", "class", "model", "substrate", "limit", "cursor"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadQuery(unknown[0], f"unknown parameter {unknown[0]!r}; known: "
                       f"{', '.join(sorted(known))}")
    limit = DEFAULT_LIMIT
    if "limit" in params:
        raw = params["limit"]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise BadQuery("limit", f"limit must be an integer from 1 to {MAX_LIMIT}; got {raw!r}")
        limit = int(raw)
    since = parse_time(params["since"], "since") if "since" in params else None
    until = parse_time(params["until"], "until") if "until" in params else None
    return Query(
        tenant=tenant,
        since=since,
        until=until,
        workload_class=params.get("class") or None,
        model=params.get("model") or None,
        substrate=params.get("substrate") or None,
        limit=limit,
        after=decode_cursor(params["cursor"]) if params.get("cursor") else 0,
    )


def page_of(rows: list[ExportRow], limit: int) -> Page:
    """The API page of ``rows`` (at most ``limit + 1`` were fetched, to know if more exist).

    The rows were selected by their indexed columns, which the receipt does not cover: a row
    whose columns do not match its record (edited in the database) is left out, with a
    warning, so a filter on ``tenant`` (or class, model, substrate, time) never hands out a
    record that does not itself match it."""
    more = len(rows) > limit
    rows = rows[:limit]
    items = []
    for r in rows:
        rec = orjson.loads(r.text)
        bad = column_mismatch(r, rec)
        if bad is not None:
            log.warning("ledger: record %s#%s (decision %s): its %s column does not match the "
                        "record (edited in the database?); left out of the listing; run "
                        "`inferplane verify`", r.shard, r.seq, r.decision_id, bad)
            continue
        items.append({"receipt": r.receipt, "record": rec})
    return Page(items, encode_cursor(rows[-1].row_id) if more and rows else None)


# -- export formats ---------------------------------------------------------------------------
COLUMNS = (
    "shard", "seq", "decision_id", "at_unix", "tenant", "workload_class", "model", "substrate",
    "endpoint", "status", "cost_usd", "receipt", "prev_hash", "chain_hash",
)


def ndjson_line(r: ExportRow) -> bytes:
    """One NDJSON line: the chain fields, then ``record`` spliced in verbatim (its canonical
    bytes, so sha256 of them is the receipt)."""
    head = orjson.dumps({
        "schema": EXPORT_SCHEMA, "shard": r.shard, "seq": r.seq, "receipt": r.receipt,
        "prev_hash": r.prev_hash, "chain_hash": r.chain_hash,
    })
    return head[:-1] + b',"record":' + r.text.encode() + b"}\n"


def anchor_object(a: PruneAnchor) -> dict[str, Any]:
    """A prune anchor as an export carries it (``inferplane.prune/1``)."""
    return {"schema": ANCHOR_SCHEMA, "shard": a.shard, "first_seq": a.first_seq,
            "prev_hash": a.prev_hash, "before_unix": a.before_unix, "at_unix": a.at_unix,
            "key_id": a.key_id, "signature": a.signature}


def anchor_lines(anchors: Sequence[PruneAnchor]) -> bytes:
    """The NDJSON lines of ``anchors``, which come before the records."""
    return b"".join(orjson.dumps(anchor_object(a)) + b"\n" for a in anchors)


def write_ndjson(rows: Iterable[ExportRow], out: IO[bytes],
                 anchors: Sequence[PruneAnchor] = ()) -> int:
    out.write(anchor_lines(anchors))
    n = 0
    buf: list[bytes] = []
    for r in rows:
        buf.append(ndjson_line(r))
        n += 1
        if len(buf) >= 4096:
            out.write(b"".join(buf))
            buf.clear()
    out.write(b"".join(buf))
    return n


def write_csv(rows: Iterable[ExportRow], out: IO[bytes],
              anchors: Sequence[PruneAnchor] = ()) -> int:
    """CSV with a header; ``record`` is the last column, the canonical text. (A table has no
    place for ``anchors``: the command states them on stderr.)"""
    text = io.TextIOWrapper(out, encoding="utf-8", newline="", write_through=False)
    w = csv.writer(text)
    w.writerow([*COLUMNS, "record"])
    n = 0
    for r in rows:
        w.writerow([
            r.shard, r.seq, r.decision_id, repr(r.at_unix), r.tenant, r.workload_class or "",
            r.model or "", r.substrate or "", r.endpoint or "",
            "" if r.status is None else r.status, "" if r.cost_usd is None else repr(r.cost_usd),
            r.receipt, r.prev_hash, r.chain_hash, r.text,
        ])
        n += 1
    text.flush()
    text.detach()
    return n


def write_parquet(rows: Iterable[ExportRow], out: IO[bytes],
                  anchors: Sequence[PruneAnchor] = (), batch: int = 50_000) -> int:
    """Parquet (zstd), written in row groups of ``batch`` rows; ``record`` is a string column;
    ``anchors`` in the metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = parquet_schema(anchors)
    names = [*COLUMNS, "record"]
    n = 0
    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        for chunk in _chunks(rows, batch):
            cols: list[list[Any]] = [[] for _ in names]
            for r in chunk:
                for i, v in enumerate((
                    r.shard, r.seq, r.decision_id, r.at_unix, r.tenant, r.workload_class,
                    r.model, r.substrate, r.endpoint, r.status, r.cost_usd, r.receipt,
                    r.prev_hash, r.chain_hash, r.text,
                )):
                    cols[i].append(v)
            writer.write_table(pa.Table.from_arrays(
                [pa.array(c, type=schema.field(i).type) for i, c in enumerate(cols)],
                schema=schema,
            ))
            n += len(chunk)
    return n


def parquet_schema(anchors: Sequence[PruneAnchor] = ()) -> Any:
    """The Arrow schema of a Parquet export (``inferplane.export/1``); a pruned ledger's
    anchors are the metadata's ``prune_anchors`` (a JSON list of `anchor_object`s)."""
    import pyarrow as pa

    meta = {b"schema": EXPORT_SCHEMA.encode()}
    if anchors:
        meta[b"prune_anchors"] = orjson.dumps([anchor_object(a) for a in anchors])
    return pa.schema([
        ("shard", pa.string()), ("seq", pa.int64()), ("decision_id", pa.string()),
        ("at_unix", pa.float64()), ("tenant", pa.string()), ("workload_class", pa.string()),
        ("model", pa.string()), ("substrate", pa.string()), ("endpoint", pa.string()),
        ("status", pa.int32()), ("cost_usd", pa.float64()), ("receipt", pa.string()),
        ("prev_hash", pa.string()), ("chain_hash", pa.string()), ("record", pa.string()),
    ], metadata=meta)


def _chunks(rows: Iterable[ExportRow], size: int) -> Iterator[list[ExportRow]]:
    chunk: list[ExportRow] = []
    for r in rows:
        chunk.append(r)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


WRITERS = {"ndjson": write_ndjson, "csv": write_csv, "parquet": write_parquet}
