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
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

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
from inferplane.ledger.query import ExportRow, column_mismatch


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

    def fail(self, shard: str, seq: int | None, decision: str | None, problem: str) -> Report:
        self.ok = False
        self.bad_shard, self.bad_seq, self.bad_decision = shard, seq, decision
        self.problem = problem
        return self


def verify_rows(
    rows: Iterable[ExportRow],
    checkpoints: Iterable[Checkpoint],
    heads: dict[str, tuple[int, str]],
    public_key: Ed25519PublicKey | None,
    checkpoint_every: int | None = None,
    anchors: Iterable[PruneAnchor] = (),
) -> Report:
    """Verify ``rows`` (ordered by shard, then seq) against ``checkpoints``, the recorded
    shard ``heads`` (shard → (seq, chain_hash)) and the prune ``anchors``. The report names the
    first bad record.

    With a public key and ``checkpoint_every``, a shard with ``checkpoint_every`` or more
    records after its last valid checkpoint (or with no checkpoint at all) fails: every writer
    commits the checkpoint of each multiple of ``checkpoint_every`` in the transaction that
    writes that record, so an honest shard's unsigned tail is at most ``checkpoint_every - 1``
    records, whenever and however its writers stopped (docs/evidence.md)."""
    rep = Report(keyed=public_key is not None,
                 checkpoint_every=checkpoint_every if public_key is not None else None)
    cps: dict[tuple[str, int], list[Checkpoint]] = {}
    for cp in checkpoints:
        cps.setdefault((cp.shard, cp.seq), []).append(cp)
        rep.checkpoints += 1
    if rep.checkpoints and public_key is None:
        rep.warnings.append(
            f"{rep.checkpoints} signed checkpoints not checked: no public key given "
            "(--public-key FILE, or --config with the signing key)"
        )
    pinned = key_id(public_key) if public_key is not None else None
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
        if public_key is not None:
            bad = _check_anchor(a, public_key, pinned)
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
                if public_key is not None:
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
            bad = _check_checkpoint(cp, r.chain_hash, public_key, pinned, rep)
            if bad:
                return rep.fail(r.shard, r.seq, r.decision_id, f"{where}: {bad}")
            if public_key is not None:
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
        if public_key is None:
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
        if public_key is not None and not check_signature(public_key, cp):
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


def _check_anchor(a: PruneAnchor, public_key: Ed25519PublicKey, pinned: str | None) -> str | None:
    if a.key_id != pinned:
        return f"is signed by key {a.key_id}, not the pinned key {pinned}"
    if not check_anchor_signature(public_key, a):
        return "has a signature that is not valid (forged or edited)"
    return None


def describe_anchor(a: PruneAnchor) -> str:
    """``pruned 2026-12-07T19:00:00Z, records before 2026-09-01T00:00:00Z``."""
    return f"pruned {_iso(a.at_unix)}, records before {_iso(a.before_unix)}"


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _check_checkpoint(
    cp: Checkpoint, head: str, public_key: Ed25519PublicKey | None, pinned: str | None, rep: Report
) -> str | None:
    if cp.chain_hash != head:
        return "a checkpoint signed here names another chain hash (the chain was re-written)"
    if public_key is None:
        return None
    if cp.key_id != pinned:
        return f"its checkpoint is signed by key {cp.key_id}, not the pinned key {pinned}"
    if not check_signature(public_key, cp):
        return "its checkpoint signature is not valid (forged or edited)"
    rep.checkpoints_checked += 1
    return None


def verify_sqlite(
    path: str, public_key: Ed25519PublicKey | None, checkpoint_every: int | None = None
) -> Report:
    """Verify a SQLite ledger file (read-only). Raises like `sqlite.open_readonly`."""
    from inferplane.ledger import sqlite

    conn = sqlite.open_readonly(path)
    try:
        return verify_rows(sqlite.iter_chain(conn), sqlite.read_checkpoints(conn),
                           sqlite.read_heads(conn), public_key, checkpoint_every,
                           sqlite.read_anchors(conn))
    finally:
        conn.close()
