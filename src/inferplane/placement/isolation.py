"""Prefix-cache isolation between tenants (issue 12 item 6).

A prefix cache shared by two tenants is a side channel: tenant B learns whether tenant A just sent
a prompt from ``usage.prompt_tokens_details.cached_tokens`` (or from the latency). So every
request gets a *cache salt* derived from its tenant's cache scope:

- the scope is the tenant (``tenant:<name>``) unless the tenant opts into a shared
  ``cache_group`` (``group:<name>``): tenants naming the same group share prefix caches, and can
  infer each other's prompts;
- a salt the client sends itself (``cache_salt``, vLLM's and SGLang's field) narrows its scope
  further, never widens it: the salt sent on is ``H(scope, client salt)``.

The salt is forwarded as ``cache_salt`` to engines that accept it (vLLM, SGLang:
`dispatch.upstream.SALTED_ENGINES`), which mix it into their block hashes; the emulated engine
does the same (`twin.engine`). It also seeds the gateway's own prompt block hashes, so the learned
prefix index and the affinity it drives are per scope.

Not per scope: the precise index fed by KV events. An engine's ``BlockStored`` event does not
carry the salt (a first block has no parent), so the subscriber keys blocks by content and a
request's engine block hashes stay unsalted to match them: a tenant's request may be placed where
another scope's blocks are (predicted as a hit, served as a miss). It reveals no cached_tokens;
it does move placement (``x-inferplane-endpoint``).
"""

from __future__ import annotations

from hashlib import blake2b
from typing import Any


def cache_scope(tenant: str, cache_group: str | None) -> str:
    """Who shares a prefix cache with this tenant: itself, or its opt-in group."""
    return f"group:{cache_group}" if cache_group else f"tenant:{tenant}"


def cache_salt(scope: str, client_salt: Any = None) -> str:
    """The salt sent to engines for a request of ``scope`` (32 hex digits, never empty)."""
    extra = client_salt if isinstance(client_salt, str) else ""
    return blake2b(f"{scope}\0{extra}".encode(), digest_size=16).hexdigest()
