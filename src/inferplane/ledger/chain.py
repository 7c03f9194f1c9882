"""The ledger's evidence layer: canonical records, receipts, the hash chain, signed checkpoints.

Everything here is pure (no I/O besides reading a key file), shared by every ledger backend and
by ``inferplane verify``. The formats are versioned and specified in docs/evidence.md:

- **canonical record (canon/1)**: the record object as compact JSON with keys sorted at every
  level, UTF-8, floats in their shortest round-trip form (what ``orjson.dumps`` with
  ``OPT_SORT_KEYS`` writes). The stored record text *is* these bytes.
- **receipt** = ``sha256(canonical record bytes)`` in hex; the ``x-inferplane-receipt`` header.
- **chain (chain/1)**: per writer shard, record ``seq`` (1, 2, …) has
  ``chain_hash = sha256("inferplane-chain/1\\n{shard}\\n{seq}\\n{prev_hash}\\n{receipt}")`` where
  ``prev_hash`` is the previous record's ``chain_hash`` (64 zeros before the first).
- **checkpoint (checkpoint/1)**: an Ed25519 signature over
  ``"inferplane-checkpoint/1\\n{shard}\\n{seq}\\n{chain_hash}\\n{at_unix:.6f}"``, the chain head
  at ``seq``. A whole re-written chain no longer matches a checkpoint signed with the key.
- **prune anchor (prune/1)**: an Ed25519 signature over
  ``"inferplane-prune/1\\n{shard}\\n{first_seq}\\n{prev_hash}\\n{before_unix:.6f}\\n{at_unix:.6f}"``:
  the key holder's statement that records before ``first_seq`` of ``shard`` were deleted on
  purpose (``inferplane ledger-prune --before``) and that the chain goes on from ``prev_hash``.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

CANON_VERSION = 1
CHAIN_VERSION = 1
CHECKPOINT_VERSION = 1
PRUNE_VERSION = 1
GENESIS = "0" * 64
"""The ``prev_hash`` of the first record of every shard."""


def canonical(record: Any) -> bytes:
    """The canon/1 bytes of a record (sorted keys, compact, UTF-8; dataclasses as objects)."""
    return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)


def receipt_of(canonical_bytes: bytes) -> str:
    """The receipt (record hash) of a record's canonical bytes."""
    return hashlib.sha256(canonical_bytes).hexdigest()


def chain_hash(shard: str, seq: int, prev_hash: str, receipt: str) -> str:
    """The chain/1 hash of record ``seq`` of ``shard``."""
    text = f"inferplane-chain/{CHAIN_VERSION}\n{shard}\n{seq}\n{prev_hash}\n{receipt}"
    return hashlib.sha256(text.encode()).hexdigest()


def checkpoint_message(shard: str, seq: int, head: str, at_unix: float) -> bytes:
    """What a checkpoint signs."""
    text = f"inferplane-checkpoint/{CHECKPOINT_VERSION}\n{shard}\n{seq}\n{head}\n{at_unix:.6f}"
    return text.encode()


def anchor_message(
    shard: str, first_seq: int, prev_hash: str, before_unix: float, at_unix: float
) -> bytes:
    """What a prune anchor signs (its own domain: a checkpoint's signature is never one)."""
    text = (f"inferplane-prune/{PRUNE_VERSION}\n{shard}\n{first_seq}\n{prev_hash}\n"
            f"{before_unix:.6f}\n{at_unix:.6f}")
    return text.encode()


class KeyError_(Exception):
    """A signing or public key that cannot be loaded (the message names where it came from)."""


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed chain head."""

    shard: str
    seq: int
    chain_hash: str
    at_unix: float
    key_id: str
    signature: str  # base64


@dataclass(frozen=True, slots=True)
class PruneAnchor:
    """A signed start of a pruned chain: records before ``first_seq`` were deleted by the key
    holder (records made before ``before_unix``, pruned at ``at_unix``); record ``first_seq``
    follows ``prev_hash``, the chain hash of the last pruned record."""

    shard: str
    first_seq: int
    prev_hash: str
    before_unix: float
    at_unix: float
    key_id: str
    signature: str  # base64


def latest_anchors(anchors: Iterable[PruneAnchor]) -> dict[str, PruneAnchor]:
    """Each pruned shard's latest anchor (the highest ``first_seq``): the start of its chain.
    The earlier ones are the shard's prune history."""
    out: dict[str, PruneAnchor] = {}
    for a in anchors:
        if a.shard not in out or a.first_seq >= out[a.shard].first_seq:
            out[a.shard] = a
    return out


def key_id(public: Ed25519PublicKey) -> str:
    """A short, stable name of a public key: the first 16 hex digits of sha256(raw bytes)."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class Signer:
    """Signs checkpoints with an Ed25519 private key."""

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key()
        self.key_id = key_id(self.public)

    def sign(self, shard: str, seq: int, head: str, at_unix: float) -> Checkpoint:
        sig = self.private.sign(checkpoint_message(shard, seq, head, at_unix))
        return Checkpoint(shard, seq, head, at_unix, self.key_id, base64.b64encode(sig).decode())

    def sign_anchor(self, shard: str, first_seq: int, prev_hash: str, before_unix: float,
                    at_unix: float) -> PruneAnchor:
        sig = self.private.sign(anchor_message(shard, first_seq, prev_hash, before_unix, at_unix))
        return PruneAnchor(shard, first_seq, prev_hash, before_unix, at_unix, self.key_id,
                           base64.b64encode(sig).decode())


def check_signature(public: Ed25519PublicKey, cp: Checkpoint) -> bool:
    try:
        sig = base64.b64decode(cp.signature, validate=True)
        public.verify(sig, checkpoint_message(cp.shard, cp.seq, cp.chain_hash, cp.at_unix))
    except (InvalidSignature, ValueError):
        return False
    return True


def check_anchor_signature(public: Ed25519PublicKey, a: PruneAnchor) -> bool:
    try:
        sig = base64.b64decode(a.signature, validate=True)
        public.verify(sig, anchor_message(a.shard, a.first_seq, a.prev_hash, a.before_unix,
                                          a.at_unix))
    except (InvalidSignature, ValueError):
        return False
    return True


def generate_private_pem() -> bytes:
    """A new Ed25519 private key, PKCS#8 PEM (``inferplane ledger-keygen``)."""
    return Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def public_pem(public: Ed25519PublicKey) -> bytes:
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private(data: bytes, where: str) -> Ed25519PrivateKey:
    """An Ed25519 private key from PKCS#8 PEM, or the raw 32-byte seed in hex or base64."""
    key: object
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = Ed25519PrivateKey.from_private_bytes(_raw32(data))
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"{where}: not an Ed25519 private key ({exc})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyError_(f"{where}: a {type(key).__name__}, not an Ed25519 private key")
    return key


def load_public(data: bytes, where: str) -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (or the private key it belongs to), or 32 raw bytes."""
    if b"PRIVATE KEY" in data:
        return load_private(data, where).public_key()
    key: object
    try:
        if b"-----BEGIN" in data:
            key = serialization.load_pem_public_key(data)
        else:
            key = Ed25519PublicKey.from_public_bytes(_raw32(data))
    except (ValueError, TypeError) as exc:
        raise KeyError_(f"{where}: not an Ed25519 public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyError_(f"{where}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def _raw32(data: bytes) -> bytes:
    text = data.strip()
    if len(text) == 64:
        try:
            return bytes.fromhex(text.decode())
        except ValueError:
            pass
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError(f"expected 32 bytes, got {len(raw)}")
    return raw


def signer_from(key_file: str | None, key_env: str | None, where: str) -> Signer | None:
    """The checkpoint signer a config names (a file, or an environment variable holding the
    key itself), or None when neither is set. Raises `KeyError_` naming the source."""
    if key_file:
        p = Path(key_file)
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise KeyError_(f"{where}: signing_key_file {p}: {exc.strerror or exc}") from None
        return Signer(load_private(data, f"{where}: signing_key_file {p}"))
    if key_env:
        value = os.environ.get(key_env)
        if not value:
            raise KeyError_(f"{where}: signing_key_env: ${key_env} is not set")
        return Signer(load_private(value.encode(), f"{where}: signing_key_env ${key_env}"))
    return None
