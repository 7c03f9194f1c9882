"""Per-request limits decided from the request alone: admission headers, token ceilings, agent
loop depth and tool fan-out, and the token buckets a request draws from.

Headers read here (each validated; a bad value is a 400 naming the header):

====================================  ==========================================================
``x-inferplane-workflow``             workflow id for budgets, loop counting and usage: 1-128
                                      of ``A-Z a-z 0-9 . _ : / -``
``Idempotency-Key``                   client retry marker: 1-255 printable ASCII characters
``x-inferplane-agent-step``           agent loop step (checked by classify; compared here)
====================================  ==========================================================
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inferplane.admission.state import BucketDemand
from inferplane.config.schema import TenantSpec, WorkloadClass
from inferplane.errors import InvalidRequestError
from inferplane.types import ApiKind

_WORKFLOW = re.compile(r"^[A-Za-z0-9._:/-]{1,128}$")
_IDEM = re.compile(r"^[\x21-\x7e]{1,255}$")


def workflow_header(headers: Mapping[str, str]) -> str | None:
    raw = headers.get("x-inferplane-workflow")
    if raw is None:
        return None
    if not _WORKFLOW.match(raw):
        raise InvalidRequestError(
            "header x-inferplane-workflow must be 1-128 characters of A-Z a-z 0-9 . _ : / -, "
            f"got {raw[:40]!r}",
            param="x-inferplane-workflow",
        )
    return raw


def idempotency_header(headers: Mapping[str, str]) -> str | None:
    raw = headers.get("Idempotency-Key")
    if raw is None:
        return None
    if not _IDEM.match(raw):
        raise InvalidRequestError(
            "header Idempotency-Key must be 1-255 printable ASCII characters without spaces",
            param="Idempotency-Key",
        )
    return raw


def agent_step(headers: Mapping[str, str]) -> int | None:
    raw = headers.get("x-inferplane-agent-step")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 9:
        raise InvalidRequestError(
            f"header x-inferplane-agent-step must be a non-negative integer, got {raw[:20]!r}",
            param="x-inferplane-agent-step",
        )
    return int(raw)


@dataclass(frozen=True, slots=True)
class Ceiling:
    """What the token ceiling did: the output cap, whether the body must be rewritten, and the
    ``old->new`` value of the clamp header when a client's value was clamped."""

    max_tokens: int
    rewrite: bool
    clamped: str | None = None


def apply_ceiling(
    api: ApiKind,
    body: dict[str, Any],
    default_max: int,
    cls: WorkloadClass,
    tenant: TenantSpec,
) -> Ceiling:
    """Clamp (or reject) ``max_tokens`` above the class/tenant ceiling; make the body carry the
    effective value when the client sent none. Mutates ``body`` only when ``rewrite`` is true."""
    if api == "embeddings":
        return Ceiling(0, False)
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    asked = body.get(field)
    caps = [c for c in (cls.max_tokens_ceiling, tenant.max_tokens_ceiling) if c is not None]
    ceiling = min(caps) if caps else None
    value = asked if isinstance(asked, int) else default_max
    clamped = None
    if ceiling is not None and value > ceiling:
        if asked is not None and tenant.max_tokens_policy == "reject":
            raise InvalidRequestError(
                f"'{field}' is {value}, above the ceiling of {ceiling} tokens for class "
                f"{cls.name!r} and tenant {tenant.name!r}",
                param=field,
                code="max_tokens_above_ceiling",
            )
        if asked is not None:
            clamped = f"{value}->{ceiling}"
        value = ceiling
    if asked is not None and clamped is None:
        return Ceiling(value, False)
    body[field] = value
    if field == "max_completion_tokens" and "max_tokens" in body:
        body["max_tokens"] = value
    return Ceiling(value, True, clamped)


def tool_fanout(api: ApiKind, body: Mapping[str, Any]) -> tuple[int, int]:
    """(tools offered, tool results in this step): ``len(tools)`` and the ``tool`` messages
    after the last assistant message."""
    tools = body.get("tools")
    offered = len(tools) if isinstance(tools, list) else 0
    results = 0
    if api == "chat":
        for m in reversed(body.get("messages") or []):
            role = m.get("role") if isinstance(m, dict) else None
            if role == "tool":
                results += 1
            elif role == "assistant":
                break
    return offered, results


def buckets(tenant: TenantSpec, key_hash: str, tokens: int) -> list[BucketDemand]:
    """The token buckets this request draws from (one per limit per scope)."""
    out: list[BucketDemand] = []
    for i, rl in enumerate(tenant.rate_limits):
        subject = tenant.name if rl.scope == "tenant" else f"{tenant.name}:{key_hash[7:23]}"
        if rl.requests_per_min is not None:
            n = float(rl.requests_per_min)
            out.append(BucketDemand(f"rl:{subject}:{i}:rpm", n, n / 60.0, 1.0))
        if rl.tokens_per_min is not None:
            n = float(rl.tokens_per_min)
            if tokens > n:
                raise InvalidRequestError(
                    f"this request needs up to {tokens} tokens (prompt + max_tokens), more than "
                    f"the {rl.scope} limit of {rl.tokens_per_min} tokens per minute; "
                    "lower max_tokens",
                    param="max_tokens",
                    code="tokens_per_min_exceeded",
                )
            out.append(BucketDemand(f"rl:{subject}:{i}:tpm", n, n / 60.0, float(tokens)))
    return out
