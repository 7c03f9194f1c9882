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
does the same (`twin.engine`). The gateway's own placement state is per scope too, so that B
cannot infer A's prompts from where (or how fast) its own requests are placed either:

- the prompt block hashes that feed the learned prefix index are seeded with the salt;
- the engine block hashes matched against the KV-event mirror start at the salt's root, as the
  engine's chain does, and the mirror keys each engine's blocks in the scope that stored them
  (`fleet.salts`);
- session affinity is keyed by (salt, session id) (`session_key`): the same ``x-session-id``
  in two scopes is two sessions.
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


def session_key(salt: str | None, session_id: str) -> str:
    """The key of a session in the gateway's affinity state (local and shared): the session id
    within its cache scope, hashed (32 hex digits) so that no raw id reaches a shared store."""
    return blake2b(f"{salt or ''}\0{session_id}".encode(), digest_size=16).hexdigest()
