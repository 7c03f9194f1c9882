"""The console's sessions and log-in throttle (docs/console.md, "Access").

A log-in with an admin key gets a session token, never the key: ``{id}.{expiry}.{mac}``, where
``id`` is random, ``expiry`` a Unix time and ``mac`` the HMAC-SHA256, under the process's console
secret, of the id, the expiry and the *hash* of the admin key that logged in. A token is valid
while it has not expired, was not logged out, and its MAC matches one of the admin keys
configured now (removing a key from ``gateway.metrics.api_keys`` ends its sessions). The secret
is ``INFERPLANE_CONSOLE_SECRET`` (hex) when set, else random per process; ``serve --workers``
sets one for all its workers, so a session opened on one worker is valid on the others.
Log-out revokes the session in the process that served it (and clears the cookie); with
``admission.store: redis`` it also writes the revocation to Redis (`RedisRevocations`, a key
that expires with the session), and every replica checks there, so a copied cookie dies
everywhere. While Redis is unreachable each process falls back to its own revocations: a
log-out then holds in the process that served it, and is written to Redis once it answers again.

Failed log-ins are counted per client address: past `MAX_FAILURES` in `WINDOW_S`, the log-in
answers 429 with ``Retry-After`` until the oldest failure leaves the window. The client address
is the connection's peer, unless that peer is a trusted proxy (``gateway.trusted_proxies``):
then `client_address` takes the right-most address of ``X-Forwarded-For`` that is not a
trusted proxy.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import logging
import math
import os
import secrets
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

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


IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def client_address(
    peer: str | None, forwarded_for: Sequence[str], trusted: Sequence[IpNetwork]
) -> str:
    """The client's address: ``peer`` unless it is in ``trusted``; then the right-most address
    of the ``X-Forwarded-For`` values (``forwarded_for``, in header order) that is not trusted
    (a proxy appends the address it saw, so everything left of the first untrusted hop may be
    forged by the client). A malformed entry stops the walk at the last trusted hop; an
    all-trusted chain gives its left-most address."""
    address = peer or "?"
    if not trusted or not _trusted(address, trusted):
        return address
    hops = [h.strip() for v in forwarded_for for h in v.split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return address  # not an address: trust nothing further left
        address = hop
        if not _trusted(hop, trusted):
            return hop
    return address


def _trusted(address: str, trusted: Sequence[IpNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in trusted if net.version == ip.version)


class RedisRevocations:
    """Log-outs shared through Redis: one key per revoked session id, expiring with the session.

    Any Redis error falls back to the process's own revocations (`Sessions.revoked`); log-outs
    made meanwhile are written once Redis answers again."""

    def __init__(
        self, client: aioredis.Redis, prefix: str, up: Callable[[], bool] = lambda: True
    ) -> None:
        self.r = client
        self.prefix = f"{prefix}console:revoked:"
        self.up = up  # False while the admission store knows Redis is down: do not wait on it
        self.pending: dict[str, float] = {}  # session id -> expiry, not yet in Redis

    async def revoke(self, sid: str, expiry: float, now: float) -> bool:
        """Record a log-out; False when Redis could not be reached (kept for later)."""
        self.pending[sid] = expiry
        return await self._flush(now)

    async def _flush(self, now: float) -> bool:
        if not self.up():
            return False
        try:
            for sid, expiry in list(self.pending.items()):
                ms = int((expiry - now) * 1000)
                if ms > 0:
                    await self.r.set(self.prefix + sid, "1", px=ms)
                del self.pending[sid]
        except Exception as exc:  # Redis down or slow: the local revocations still hold
            log.warning("console: cannot write a log-out to Redis (%s); kept locally", exc)
            return False
        return True

    async def is_revoked(self, sid: str, now: float) -> bool | None:
        """Whether some replica logged ``sid`` out; None when Redis could not be asked."""
        if not self.up():
            return None
        try:
            if self.pending:
                await self._flush(now)
            return bool(await self.r.exists(self.prefix + sid))
        except Exception as exc:
            log.warning("console: cannot read log-outs from Redis (%s); local ones only", exc)
            return None


class Sessions:
    """Issues and checks session tokens (stateless but for log-outs: this process's, and with
    ``shared`` every replica's through Redis)."""

    def __init__(
        self, secret: bytes, ttl_s: float, shared: RedisRevocations | None = None
    ) -> None:
        self.secret = secret
        self.ttl_s = ttl_s
        self.revoked: dict[str, float] = {}  # session id -> expiry
        self.shared = shared

    async def check_shared(
        self, token: str, hashes: Iterable[str], now: float | None = None
    ) -> bool:
        """`check`, and not logged out on another replica (Redis; when it is unreachable, this
        process's log-outs only)."""
        t = time.time() if now is None else now
        if not self.check(token, hashes, now=t):
            return False
        if self.shared is None:
            return True
        return await self.shared.is_revoked(token.split(".")[0], t) is not True

    async def revoke_shared(self, token: str, now: float | None = None) -> None:
        """`revoke` here, and in Redis for every replica."""
        t = time.time() if now is None else now
        self.revoke(token, now=t)
        parts = token.split(".")
        if self.shared is not None and len(parts) == 3 and parts[1].isdigit():
            await self.shared.revoke(parts[0], float(parts[1]), t)

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
