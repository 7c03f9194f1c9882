"""``inferplane verify``: check a ledger's hash chains and signed checkpoints.

`verify_rows` reads the stored records shard by shard in chain order (any backend hands them in
as `ExportRow`s) and stops at the first record that is not what the chain says it must be:

- its content does not hash to its receipt (edited);
- an indexed column (tenant, status, cost, …) is not the record's own value (edited: the
  columns are what SQL filters and exports read, and the receipt does not cover them);
- its ``seq`` is not the next one, or its ``prev_hash`` is not the previous record's chain hash
  (a record before it was deleted, or one was inserted or moved);
- its chain hash does not follow from the above (chain fields edited);
- its storage position runs against the chain order (rows reordered).

Then every checkpoint's signature is checked with the pinned public key and compared with the
chain head it names (a re-written chain, or records deleted after a signed head), and each
shard's recorded head with its last record (records deleted from the tail).

A pruned shard (`inferplane.ledger.prune`) starts at its latest **prune anchor**: its first
stored record must be the anchor's ``first_seq`` and follow the anchor's ``prev_hash``; every
anchor must be signed by the pinned key. Records missing before the anchor were pruned by the
key holder; any other gap (records deleted after it, or the anchor itself deleted) fails as
before. Checkpoints of pruned records (a writer may sign a head a prune removed the moment
before) name nothing stored and are left out.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from inferplane.ledger.chain import (
    GENESIS,
    Checkpoint,
    PruneAnchor,
    chain_hash,
    check_anchor_signature,
    check_signature,
    key_id,
    latest_anchors,
)
from inferplane.ledger.query import ANCHOR_SCHEMA, EXPORT_SCHEMA, ExportRow, column_mismatch

Keys = Ed25519PublicKey | Sequence[Ed25519PublicKey] | None
"""The pinned public key, or a **keyring**: after a signing-key change, the current key
**first**, then the earlier ones, each checkpoint and anchor checked with the key its
``key_id`` names. An earlier key is trusted only where the current key vouches for it: a
checkpoint at or below the shard's latest checkpoint signed by the current key (whose chain
hash commits to every record before it; none at all where the current key has signed none of
the shard), and never a shard's latest prune anchor (keys get changed because one leaked: its
holder must not be able to sign a new tail or a new prune). ``ledger-sign-heads
--previous-key`` makes a ledger meet this at the key change: it signs every head and
re-signs every latest anchor with the new key."""


def keyring(keys: Keys) -> dict[str, Ed25519PublicKey]:
    """``key_id`` → key of the pinned key(s); empty without a key."""
    if keys is None:
        return {}
    if isinstance(keys, Ed25519PublicKey):
        keys = [keys]
    return {key_id(k): k for k in keys}


def _pinned(ring: dict[str, Ed25519PublicKey]) -> str:
    """How a refusal names the pinned key(s)."""
    if len(ring) == 1:
        return f"the pinned key {next(iter(ring))}"
    return f"any pinned key ({', '.join(ring)})"


@dataclass(slots=True)
class Report:
    ok: bool = True
    problem: str | None = None
    bad_shard: str | None = None
    bad_seq: int | None = None
    bad_decision: str | None = None
    records: int = 0
    shards: dict[str, int] = field(default_factory=dict)
    """Each shard's last seq."""
    checkpoints: int = 0
    checkpoints_checked: int = 0
    unsigned_tail: dict[str, int] = field(default_factory=dict)
    """Per shard, the records after its last valid checkpoint."""
    warnings: list[str] = field(default_factory=list)
    keyed: bool = False
    """A public key was given: signatures were checked and the unsigned tail is bounded."""
    checkpoint_every: int | None = None
    """The writers' ``ledger.checkpoint_every`` the unsigned tails were held to."""
    last_hash: dict[str, str] = field(default_factory=dict)
    """Each shard's last chain hash (what ``ledger-sign-heads`` signs)."""
    first: dict[str, int] = field(default_factory=dict)
    """Each shard's first stored seq (1, or its prune anchor's ``first_seq``)."""
    pruned: dict[str, PruneAnchor] = field(default_factory=dict)
    """The anchor each pruned shard starts at."""
    anchors: int = 0
    anchors_latest: int = 0
    """Anchors at each shard's latest ``first_seq`` (the ones that count; the others are its
    prune history, whose signatures are not checked)."""
    anchors_checked: int = 0
    signed: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    """Per shard, the (seq, chain hash) of each checkpoint verified with the key, in order."""
    checkpoints_pruned: int = 0
    """Checkpoints naming pruned records (left out of ``checkpoints``)."""
    key_ids: list[str] = field(default_factory=list)
    """The pinned keys' ids (more than one: a keyring; the first is the current key)."""
    resigned_anchors: int = 0
    """``ledger-sign-heads --previous-key``: latest prune anchors re-signed with the new key."""
    current_signed: dict[str, int] = field(default_factory=dict)
    """Per shard, the last seq whose checkpoint the current (first) key signed."""

    def fail(self, shard: str, seq: int | None, decision: str | None, problem: str) -> Report:
        self.ok = False
        self.bad_shard, self.bad_seq, self.bad_decision = shard, seq, decision
        self.problem = problem
        return self


def verify_rows(
    rows: Iterable[ExportRow],
    checkpoints: Iterable[Checkpoint],
    heads: dict[str, tuple[int, str]],
    public_key: Keys,
    checkpoint_every: int | None = None,
    anchors: Iterable[PruneAnchor] = (),
    rotation: bool = False,
) -> Report:
    """Verify ``rows`` (ordered by shard, then seq) against ``checkpoints``, the recorded
    shard ``heads`` (shard → (seq, chain_hash)) and the prune ``anchors``. The report names the
    first bad record. ``public_key`` may be a keyring (`Keys`): each signature is checked
    with the pinned key its ``key_id`` names.

    With a public key and ``checkpoint_every``, a shard with ``checkpoint_every`` or more
    records after its last valid checkpoint (or with no checkpoint at all) fails: every writer
    commits the checkpoint of each multiple of ``checkpoint_every`` in the transaction that
    writes that record, so an honest shard's unsigned tail is at most ``checkpoint_every - 1``
    records, whenever and however its writers stopped (docs/evidence.md).

    A keyring's earlier keys are held to `Keys`' limits, unless ``rotation`` (the key change
    itself, ``ledger-sign-heads --previous-key``: any key of the ring signs anything)."""
    ring = keyring(public_key)
    keyed = bool(ring)
    rep = Report(keyed=keyed, checkpoint_every=checkpoint_every if keyed else None,
                 key_ids=list(ring))
    cps: dict[tuple[str, int], list[Checkpoint]] = {}
    for cp in checkpoints:
        cps.setdefault((cp.shard, cp.seq), []).append(cp)
        rep.checkpoints += 1
    lim = _Limits(ring, rotation, cps)
    if rep.checkpoints and not keyed:
        rep.warnings.append(
            f"{rep.checkpoints} signed checkpoints not checked: no public key given "
            "(--public-key FILE, or --config with the signing key)"
        )
    # Only each shard's latest anchor starts its chain, so only its signature matters: an
    # earlier one is history (deleting it is harmless), and one signed by a key since
    # replaced must not fail the ledger for ever. Nobody without the key can add a later
    # anchor, nor one tied with the latest (every anchor at the latest first_seq is checked).
    anchors = list(anchors)
    latest = latest_anchors(anchors)
    for a in anchors:
        rep.anchors += 1
        if a.first_seq != latest[a.shard].first_seq:
            continue
        rep.anchors_latest += 1
        if keyed:
            bad = _check_anchor(a, ring) or lim.anchor(a)
            if bad:
                return rep.fail(a.shard, a.first_seq, None,
                                f"shard {a.shard}: its prune anchor at #{a.first_seq} {bad}")
            rep.anchors_checked += 1
    shard: str | None = None
    prev = GENESIS
    expect = 1
    last_row_id = -1
    last_signed = 0

    last_hash = rep.last_hash

    def close_shard() -> None:
        if shard is not None:
            rep.shards[shard] = expect - 1
            rep.unsigned_tail[shard] = expect - 1 - last_signed
            last_hash[shard] = prev

    for r in rows:
        if r.shard != shard:
            close_shard()
            if r.shard in rep.shards:
                return rep.fail(r.shard, r.seq, r.decision_id,
                                "rows of this shard are out of order")
            shard, prev, expect, last_row_id, last_signed = r.shard, GENESIS, 1, -1, 0
            rep.first[shard] = 1
            anchor = latest.get(shard)
            if anchor is not None:
                bad = _start_at_anchor(r, anchor)
                if bad:
                    return rep.fail(r.shard, r.seq, r.decision_id, bad)
                prev, expect = anchor.prev_hash, anchor.first_seq
                rep.first[shard], rep.pruned[shard] = expect, anchor
                if keyed:
                    last_signed = expect - 1
        rep.records += 1
        where = f"record {r.shard}#{r.seq} (decision {r.decision_id})"
        if hashlib.sha256(r.text.encode()).hexdigest() != r.receipt:
            return rep.fail(r.shard, r.seq, r.decision_id,
                            f"{where}: its content does not match its receipt (edited)")
        try:
            col = column_mismatch(r, orjson.loads(r.text))
        except orjson.JSONDecodeError:
            col = "record"
        if col is not None:
            return rep.fail(r.shard, r.seq, r.decision_id,
                            f"{where}: edited (column {col}: not the value in the hashed "
                            "record)")
        if r.seq > expect:
            gap = f"#{expect}" if r.seq == expect + 1 else f"#{expect}..#{r.seq - 1}"
            why = " and no prune anchor accounts for them" if expect == 1 else ""
            return rep.fail(r.shard, r.seq, r.decision_id,
                            f"{where}: the record(s) before it ({gap}) are missing "
                            f"(deleted){why}")
        if r.seq < expect:
            return rep.fail(r.shard, r.seq, r.decision_id,
                            f"{where}: seq {r.seq} again after #{expect - 1} (inserted or "
                            "duplicated)")
        if r.prev_hash != prev:
            return rep.fail(r.shard, r.seq, r.decision_id,
                            f"{where}: its previous hash is not the chain hash of record "
                            f"#{r.seq - 1} (a record was deleted, inserted or reordered)")
        if chain_hash(r.shard, r.seq, r.prev_hash, r.receipt) != r.chain_hash:
            return rep.fail(r.shard, r.seq, r.decision_id,
                            f"{where}: its chain hash does not follow from its content (edited)")
        if r.row_id <= last_row_id:
            return rep.fail(r.shard, r.seq, r.decision_id,
                            f"{where}: stored before the record it follows (reordered)")
        for cp in cps.pop((r.shard, r.seq), ()):
            bad = _check_checkpoint(cp, r.chain_hash, ring, rep) or lim.checkpoint(cp, rep)
            if bad:
                return rep.fail(r.shard, r.seq, r.decision_id, f"{where}: {bad}")
            if keyed:
                last_signed = r.seq
                rep.signed.setdefault(r.shard, []).append((r.seq, r.chain_hash))
        prev, expect, last_row_id = r.chain_hash, expect + 1, r.row_id
    close_shard()
    for s, a in sorted(latest.items()):
        if s not in rep.shards:  # every record of the shard pruned (or deleted: the head says)
            rep.shards[s], rep.first[s], rep.pruned[s] = a.first_seq - 1, a.first_seq, a
            rep.unsigned_tail[s] = 0
            last_hash[s] = a.prev_hash
    for s, a in sorted(rep.pruned.items()):
        if not keyed:
            rep.warnings.append(
                f"shard {s}: records #1..#{a.first_seq - 1} were pruned ({describe_anchor(a)}); "
                "without a public key the prune anchor's signature is not checked, so a "
                "deletion by anyone would look the same (checked: the hash links from "
                f"#{a.first_seq} on and that they follow the anchor's previous hash)")
    for key in [k for k in cps if k[1] < rep.first.get(k[0], 1)]:
        n = len(cps.pop(key))  # they sign pruned records: nothing stored to compare them with
        rep.checkpoints -= n
        rep.checkpoints_pruned += n
    for (s, seq), cp_list in sorted(cps.items()):
        cp = cp_list[0]
        k = ring.get(cp.key_id)
        if keyed and (k is None or not check_signature(k, cp)):
            continue  # a forged checkpoint for a record that does not exist proves nothing
        last = rep.shards.get(s, 0)
        return rep.fail(s, last + 1, None,
                        f"shard {s}: a checkpoint signs record #{seq} but the chain ends at "
                        f"#{last} (records #{last + 1}..#{seq} were deleted)")
    for s in sorted(set(rep.shards) - set(heads)):
        return rep.fail(s, None, None, f"shard {s}: has records but no recorded head "
                        "(the heads table was edited)")
    for s, (seq, head) in sorted(heads.items()):
        last = rep.shards.get(s, 0)
        if seq < last:
            return rep.fail(s, seq + 1, None,
                            f"shard {s}: records after its recorded head #{seq} (inserted)")
        if seq > last:
            return rep.fail(s, last + 1, None,
                            f"shard {s}: its head is #{seq} but the chain ends at #{last} "
                            f"(records #{last + 1}..#{seq} were deleted)")
        if seq == last and last > 0 and head != last_hash[s]:
            return rep.fail(s, last, None,
                            f"shard {s}: its recorded head does not match record #{last}")
    if rep.checkpoint_every is not None:
        for s, n in sorted(rep.unsigned_tail.items()):
            if n >= rep.checkpoint_every:
                last = rep.shards[s]
                since = f"#{last - n}" if last > n else "none"
                if s in rep.pruned and last - n == rep.first[s] - 1:
                    since = f"none since the prune anchor at #{rep.first[s]}"
                return rep.fail(
                    s, last - n + 1, None,
                    f"shard {s}: {n} records after its last signed checkpoint ({since}); "
                    f"writers sign every {rep.checkpoint_every} records in the same "
                    "transaction, so either checkpoints were deleted (and the chain may have "
                    "been re-written), or, harmless, the shard was written without the signing "
                    "key (before it was configured, or by a writer without it): then the key "
                    "holder signs its head with `inferplane ledger-sign-heads` "
                    "(docs/evidence.md, the unsigned tail). If the writers use another "
                    "ledger.checkpoint_every, pass --checkpoint-every N (or --config)")
    return rep


def _start_at_anchor(r: ExportRow, a: PruneAnchor) -> str | None:
    """Why the first stored record ``r`` of a pruned shard cannot start at its latest anchor
    ``a``, or None."""
    where = f"record {r.shard}#{r.seq} (decision {r.decision_id})"
    if r.seq > a.first_seq:
        gap = f"#{a.first_seq}" if r.seq == a.first_seq + 1 else f"#{a.first_seq}..#{r.seq - 1}"
        return (f"{where}: the record(s) before it ({gap}) are missing (deleted): the shard's "
                f"latest prune anchor starts its chain at #{a.first_seq}, so they were deleted "
                "after the prune, or a later prune's anchor was deleted")
    if r.seq < a.first_seq:
        return (f"{where}: stored although the shard's prune anchor starts its chain at "
                f"#{a.first_seq} (records put back after a prune, or the anchor inserted)")
    if r.prev_hash != a.prev_hash:
        return (f"{where}: its previous hash is not the one its prune anchor names (the "
                "anchor or the record was edited)")
    return None


class _Limits:
    """What a keyring's earlier keys may sign (`Keys`); the first key is the current one."""

    def __init__(self, ring: dict[str, Ed25519PublicKey], rotation: bool,
                 cps: dict[tuple[str, int], list[Checkpoint]]) -> None:
        self.current = next(iter(ring), None)
        self.on = len(ring) > 1 and not rotation
        self.last: dict[str, int] = {}  # shard -> its latest checkpoint by the current key
        if self.current is None or not self.on:
            return
        k = ring[self.current]
        for (shard, seq), cp_list in sorted(cps.items(), reverse=True):
            if shard not in self.last and any(
                    cp.key_id == self.current and check_signature(k, cp) for cp in cp_list):
                self.last[shard] = seq

    def checkpoint(self, cp: Checkpoint, rep: Report) -> str | None:
        if cp.key_id == self.current:
            rep.current_signed[cp.shard] = cp.seq
            return None
        if not self.on or cp.seq <= self.last.get(cp.shard, 0):
            return None
        since = (f"after the current key {self.current}'s latest checkpoint of the shard "
                 f"(#{self.last[cp.shard]})" if cp.shard in self.last else
                 f"and the current key {self.current} has signed none of the shard")
        return (f"its checkpoint is signed by the earlier key {cp.key_id} {since}: an earlier "
                "key is trusted only below a checkpoint of the current key (at the change, "
                "`inferplane ledger-sign-heads --previous-key` signs every head with the new "
                "key; docs/evidence.md, changing the signing key)")

    def anchor(self, a: PruneAnchor) -> str | None:
        if not self.on or a.key_id == self.current:
            return None
        return (f"is signed by the earlier key {a.key_id}, not the current key {self.current} "
                "(the first --public-key): a shard's latest prune anchor must be signed by the "
                "current key (at the key change, `inferplane ledger-sign-heads --previous-key` "
                "re-signs it with the new key)")


def _check_anchor(a: PruneAnchor, ring: dict[str, Ed25519PublicKey]) -> str | None:
    k = ring.get(a.key_id)
    if k is None:
        return f"is signed by key {a.key_id}, not {_pinned(ring)}"
    if not check_anchor_signature(k, a):
        return "has a signature that is not valid (forged or edited)"
    return None


def describe_anchor(a: PruneAnchor) -> str:
    """``pruned 2026-12-07T19:00:00Z, records before 2026-09-01T00:00:00Z``."""
    return f"pruned {_iso(a.at_unix)}, records before {_iso(a.before_unix)}"


def _iso(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace(
            "+00:00", "Z")
    except (OverflowError, ValueError, OSError):
        return f"{t!r} (out of range)"


def _check_checkpoint(
    cp: Checkpoint, head: str, ring: dict[str, Ed25519PublicKey], rep: Report
) -> str | None:
    if cp.chain_hash != head:
        return "a checkpoint signed here names another chain hash (the chain was re-written)"
    if not ring:
        return None
    k = ring.get(cp.key_id)
    if k is None:
        return f"its checkpoint is signed by key {cp.key_id}, not {_pinned(ring)}"
    if not check_signature(k, cp):
        return "its checkpoint signature is not valid (forged or edited)"
    rep.checkpoints_checked += 1
    return None


def verify_sqlite(path: str, public_key: Keys, checkpoint_every: int | None = None,
                  rotation: bool = False) -> Report:
    """Verify a SQLite ledger file (read-only). Raises like `sqlite.open_readonly`."""
    from inferplane.ledger import sqlite

    conn = sqlite.open_readonly(path)
    try:
        return verify_rows(sqlite.iter_chain(conn), sqlite.read_checkpoints(conn),
                           sqlite.read_heads(conn), public_key, checkpoint_every,
                           sqlite.read_anchors(conn), rotation)
    finally:
        conn.close()


class NotAnExport(ValueError):
    """The file's first line is not JSON: not an NDJSON export at all."""


def verify_export(lines: Iterable[bytes], public_key: Keys, *,
                  filtered: bool = False) -> Report:
    """Verify an NDJSON export (``inferplane export``) from the file alone: each record's
    receipt (its canonical record re-hashed) and chain hash, the links between a shard's
    records, and where each shard starts: at #1 after 64 zeros, or at the prune anchor the
    export carries for it (``inferplane.prune/1`` lines, which come first), whose signature is
    checked with the key(s) when given.

    An export holds no checkpoints and no heads, so what it cannot show is a shard's tail cut
    off before the export was made (compare with a receipt, or verify the ledger itself).
    Records missing inside a shard fail, unless ``filtered`` (an export made with --since,
    --until or --tenant, whose gaps are expected): then each record is checked on its own, and
    links where records follow each other."""
    ring = keyring(public_key)
    keyed = bool(ring)
    rep = Report(keyed=keyed, key_ids=list(ring))
    starts: dict[str, PruneAnchor] = {}
    last: dict[str, tuple[int, str]] = {}
    for n, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            if not starts and not last:  # gzip, Parquet, CSV: not a tampered export
                raise NotAnExport("not an NDJSON export (verify --export reads NDJSON only: "
                                  f"line {n} is not JSON)") from None
            return rep.fail("", None, None, f"line {n}: not a JSON object")
        schema = obj.get("schema") if isinstance(obj, dict) else None
        if schema == ANCHOR_SCHEMA:
            a = _parse_anchor(obj)
            if isinstance(a, str):
                return rep.fail("", None, None, f"line {n}: a prune anchor {a}")
            if a.shard in starts or a.shard in last:
                return rep.fail(a.shard, a.first_seq, None, f"line {n}: a second prune anchor "
                                f"of shard {a.shard}, or one after its records (an export "
                                "carries each shard's latest anchor, before the records)")
            rep.anchors += 1
            rep.anchors_latest += 1
            if keyed:
                bad = _check_anchor(a, ring) or _Limits(ring, False, {}).anchor(a)
                if bad:
                    return rep.fail(a.shard, a.first_seq, None,
                                    f"shard {a.shard}: its prune anchor at #{a.first_seq} {bad}")
                rep.anchors_checked += 1
            starts[a.shard] = a
            continue
        if schema != EXPORT_SCHEMA:
            return rep.fail("", None, None, f"line {n}: schema {schema!r}, neither "
                            f"{EXPORT_SCHEMA} nor {ANCHOR_SCHEMA}")
        fields = [obj.get(f) for f in ("shard", "seq", "receipt", "prev_hash", "chain_hash")]
        record = obj.get("record")
        if not (type(fields[1]) is int and fields[1] >= 1 and isinstance(record, dict)
                and all(isinstance(f, str) for f in fields[:1] + fields[2:])):
            return rep.fail("", None, None, f"line {n}: a record without all its fields (or "
                            "one of the wrong type)")
        shard, seq, receipt, prev, head = (str(fields[0]), int(fields[1]), str(fields[2]),
                                           str(fields[3]), str(fields[4]))
        decision = record.get("decision_id")
        where = f"line {n}: record {shard}#{seq} (decision {decision})"
        if hashlib.sha256(orjson.dumps(record, option=orjson.OPT_SORT_KEYS)).hexdigest() \
                != receipt:
            return rep.fail(shard, seq, decision,
                            f"{where}: its content does not match its receipt (edited)")
        if chain_hash(shard, seq, prev, receipt) != head:
            return rep.fail(shard, seq, decision,
                            f"{where}: its chain hash does not follow from its content (edited)")
        bad = _export_link(shard, seq, prev, last.get(shard), starts.get(shard), filtered)
        if bad:
            return rep.fail(shard, seq, decision, f"{where}: {bad}")
        if shard not in last:
            start = starts.get(shard)
            rep.first[shard] = start.first_seq if start is not None else seq
            if start is not None:
                rep.pruned[shard] = start
        last[shard] = (seq, head)
        rep.records += 1
    rep.shards = {s: q for s, (q, _) in last.items()}
    rep.last_hash = {s: h for s, (_, h) in last.items()}
    for s, a in sorted(starts.items()):
        if s not in last:  # the shard's records all pruned (or none selected)
            rep.shards[s], rep.first[s], rep.pruned[s] = a.first_seq - 1, a.first_seq, a
        if not keyed:
            rep.warnings.append(
                f"shard {s}: the export starts it at #{a.first_seq} after a prune anchor "
                f"({describe_anchor(a)}) whose signature was not checked: no public key given")
    return rep


def _parse_anchor(obj: dict[str, Any]) -> PruneAnchor | str:
    """An export's ``inferplane.prune/1`` line as a PruneAnchor, or what is wrong with it."""
    strs = [obj.get(f) for f in ("shard", "prev_hash", "key_id", "signature")]
    first, times = obj.get("first_seq"), [obj.get("before_unix"), obj.get("at_unix")]
    if not (all(isinstance(v, str) for v in strs) and type(first) is int
            and all(type(t) in (int, float) for t in times)):
        return "without all its fields (or one of the wrong type)"
    assert isinstance(first, int)
    ts = [float(t) for t in times]  # type: ignore[arg-type]
    if first < 1 or not all(math.isfinite(t) and _MIN_T <= t <= _MAX_T for t in ts):
        return "with a time or record number out of range"
    return PruneAnchor(str(strs[0]), first, str(strs[1]), ts[0], ts[1], str(strs[2]),
                       str(strs[3]))


_MIN_T, _MAX_T = 0.0, 253402300799.0  # 1970 .. 9999-12-31T23:59:59Z


def _export_link(shard: str, seq: int, prev: str, last: tuple[int, str] | None,
                 anchor: PruneAnchor | None, filtered: bool) -> str | None:
    """Why record ``seq`` of an export cannot follow ``last`` (the shard's previous record in
    it; None: this is its first), or None."""
    gap_why = ("deleted, or the export was made with --since, --until or --tenant (then "
               "verify it with --filtered)")
    if last is None:
        if anchor is not None:
            if seq < anchor.first_seq:
                return (f"in the export although the shard's prune anchor starts its chain at "
                        f"#{anchor.first_seq}")
            if seq == anchor.first_seq:
                return None if prev == anchor.prev_hash else (
                    "its previous hash is not the one its prune anchor names (the anchor or "
                    "the record was edited)")
            return None if filtered else (
                f"the shard's prune anchor starts its chain at #{anchor.first_seq}, but the "
                f"export's first record is #{seq}: #{anchor.first_seq}..#{seq - 1} are missing "
                f"({gap_why})")
        if seq == 1:
            return None if prev == GENESIS else "the first record's previous hash is not 64 zeros"
        return None if filtered else (
            f"the shard's first record in the export, but #1..#{seq - 1} are missing and no "
            f"prune anchor accounts for them ({gap_why})")
    lseq, lhash = last
    if seq <= lseq:
        return f"seq {seq} again after #{lseq} (inserted, duplicated or reordered)"
    if seq == lseq + 1:
        return None if prev == lhash else (
            f"its previous hash is not the chain hash of record #{lseq} (a record was "
            "deleted, inserted or reordered)")
    gap = f"#{lseq + 1}" if seq == lseq + 2 else f"#{lseq + 1}..#{seq - 1}"
    return None if filtered else f"the record(s) before it ({gap}) are missing ({gap_why})"
