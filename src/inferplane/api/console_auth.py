"""The console's sessions and log-in throttle (docs/console.md, "Access").

A log-in with an admin key gets a session token, never the key: ``{id}.{expiry}.{mac}``, where
``id`` is random, ``expiry`` a Unix time and ``mac`` the HMAC-SHA256, under the process's console
secret, of the id, the expiry and the *hash* of the admin key that logged in. A token is valid
while it has not expired, was not logged out, and its MAC matches one of the admin keys
configured now (removing a key from ``gateway.metrics.api_keys`` ends its sessions). The secret
is ``INFERPLANE_CONSOLE_SECRET`` (hex) when set, else random per process; ``serve --workers``
sets one for all its workers, so a session opened on one worker is valid on the others.
Log-out revokes the session in the process that served it (and clears the cookie).

Failed log-ins are counted per client address: past `MAX_FAILURES` in `WINDOW_S`, the log-in
answers 429 with ``Retry-After`` until the oldest failure leaves the window.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Iterable

SECRET_ENV = "INFERPLANE_CONSOLE_SECRET"
MAX_FAILURES = 5
WINDOW_S = 60.0
MAX_ADDRESSES = 10_000
"""Addresses tracked at most (the oldest are forgotten first)."""


def console_secret() -> bytes:
    """The HMAC key: ``INFERPLANE_CONSOLE_SECRET`` (hex, ≥ 32 bytes) or 32 random bytes."""
    raw = os.environ.get(SECRET_ENV, "")
    try:
        secret = bytes.fromhex(raw)
    except ValueError:
        secret = b""
    return secret if len(secret) >= 32 else secrets.token_bytes(32)


def ensure_shared_secret() -> None:
    """Before forking workers: one secret for all of them (unless the operator set one)."""
    if len(os.environ.get(SECRET_ENV, "")) < 64:
        os.environ[SECRET_ENV] = secrets.token_hex(32)


def matching_hash(key_hash: str, hashes: Iterable[str]) -> str | None:
    """The configured hash equal to ``key_hash``, compared in constant time against every one
    (no early exit), or None."""
    found = None
    for h in hashes:
        if hmac.compare_digest(h.encode(), key_hash.encode()):
            found = h
    return found


class Sessions:
    """Issues and checks session tokens (stateless but for the log-outs of this process)."""

    def __init__(self, secret: bytes, ttl_s: float) -> None:
        self.secret = secret
        self.ttl_s = ttl_s
        self.revoked: dict[str, float] = {}  # session id -> expiry

    def _mac(self, sid: str, expiry: int, admin_hash: str) -> str:
        digest = hmac.new(self.secret, f"{sid}.{expiry}.{admin_hash}".encode(),
                          hashlib.sha256).digest()
        return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    def issue(self, admin_hash: str, now: float | None = None) -> str:
        sid = secrets.token_urlsafe(18)
        expiry = int((time.time() if now is None else now) + self.ttl_s)
        return f"{sid}.{expiry}.{self._mac(sid, expiry, admin_hash)}"

    def check(self, token: str, hashes: Iterable[str], now: float | None = None) -> bool:
        parts = token.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return False
        sid, exp, mac = parts
        expiry = int(exp)
        if expiry <= (time.time() if now is None else now) or sid in self.revoked:
            return False
        ok = False
        for h in hashes:  # every configured key, no early exit
            ok |= hmac.compare_digest(self._mac(sid, expiry, h), mac)
        return ok

    def revoke(self, token: str, now: float | None = None) -> None:
        parts = token.split(".")
        if len(parts) != 3 or not parts[1].isdigit():
            return
        t = time.time() if now is None else now
        self.revoked = {s: e for s, e in self.revoked.items() if e > t}
        self.revoked[parts[0]] = float(parts[1])


class LoginThrottle:
    """Failed log-ins per client address in a sliding window."""

    def __init__(self, max_failures: int = MAX_FAILURES, window_s: float = WINDOW_S) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self.failures: dict[str, deque[float]] = {}

    def retry_after(self, address: str, now: float | None = None) -> int | None:
        """Seconds until ``address`` may try again, or None when it may now."""
        t = time.monotonic() if now is None else now
        seen = self.failures.get(address)
        if seen is None:
            return None
        while seen and seen[0] <= t - self.window_s:
            seen.popleft()
        if not seen:
            del self.failures[address]
            return None
        if len(seen) < self.max_failures:
            return None
        return max(1, math.ceil(seen[0] + self.window_s - t))

    def failed(self, address: str, now: float | None = None) -> None:
        t = time.monotonic() if now is None else now
        if address not in self.failures and len(self.failures) >= MAX_ADDRESSES:
            del self.failures[next(iter(self.failures))]
        self.failures.setdefault(address, deque()).append(t)
