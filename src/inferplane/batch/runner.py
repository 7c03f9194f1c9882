"""One batch line through the gateway's own pipeline: classify → admit → place → dispatch →
account, exactly as a direct non-streaming request, with the batch's tenant and API key and the
batch workload class. Nothing here talks HTTP to the client; the answer becomes an output or
error file line.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from inferplane.admission.controller import Ticket
from inferplane.admission.queue import PoolKey, QueueTimeoutError
from inferplane.batch.jsonl import ENDPOINTS
from inferplane.config.schema import TenantSpec
from inferplane.core.plane import API_PATHS, Core
from inferplane.dispatch.upstream import Dispatcher
from inferplane.errors import GatewayError, RateLimitError
from inferplane.placement.profile import RequestProfile

RETRYABLE_CODES = frozenset({"rate_limit_exceeded", "load_shed", "retry_shed", "queue_timeout"})
"""Refusals for capacity: the line waits and runs again later instead of failing."""


class Retry(Exception):
    """The line was refused for capacity; run it again after ``after_s``."""

    def __init__(self, message: str, after_s: float) -> None:
        super().__init__(message)
        self.after_s = after_s


@dataclass(frozen=True, slots=True)
class Prepared:
    """A line classified and ready for admission; ``pool`` is what the spare-capacity gate
    reads."""

    profile: RequestProfile
    body: dict[str, Any]
    raw: bytes
    pool: PoolKey


def prepare(gw: Core, tenant: TenantSpec, cls: str, url: str, raw: bytes) -> Prepared:
    body = orjson.loads(raw)
    profile = gw.classify(ENDPOINTS[url], body, headers(cls), tenant)
    if profile.model_alias is not None:  # a tier was chosen: forward its model's name
        raw = orjson.dumps(body)
    return Prepared(profile, body, raw, gw.admission.pool_of(profile))


def headers(cls: str) -> dict[str, str]:
    return {"x-inferplane-class": cls}


def result_line(custom_id: str, *, status: int = 200, request_id: str = "",
                body: Any = None, error: tuple[str, str] | None = None) -> bytes:
    """An output line (``error`` None) or an error line, in OpenAI's shape."""
    rid = "batch_req_" + os.urandom(12).hex()
    if error is not None:
        return orjson.dumps({
            "id": rid, "custom_id": custom_id, "response": None,
            "error": {"code": error[0], "message": error[1]},
        })
    return orjson.dumps({
        "id": rid, "custom_id": custom_id,
        "response": {"status_code": status, "request_id": request_id, "body": body},
        "error": None,
    })


async def execute(gw: Core, dispatcher: Dispatcher, tenant: TenantSpec, key_hash: str, cls: str,
                  url: str, custom_id: str, p: Prepared, retry_after_s: float,
                  on_admitted: Callable[[], None]) -> tuple[bool, bytes]:
    """Run one prepared line; ``(ok, result line)``, or raises `Retry`. ``on_admitted`` runs
    right before placement, which reserves the endpoint synchronously (so from then on the
    line counts in the pool's in-flight)."""
    api = ENDPOINTS[url]
    try:
        ticket = await gw.admission.admit(
            api, p.body, p.raw, headers(cls), tenant, key_hash, p.profile
        )
    except (RateLimitError, QueueTimeoutError) as exc:
        if exc.code in RETRYABLE_CODES:
            after = exc.headers.get("Retry-After")
            raise Retry(exc.message, float(after) if after else retry_after_s) from None
        return False, result_line(custom_id, error=(exc.code or exc.error_type, exc.message))
    except GatewayError as exc:
        return False, result_line(custom_id, error=(exc.code or exc.error_type, exc.message))
    try:
        on_admitted()
        return await _dispatch(gw, dispatcher, api, ticket, ticket.body or p.raw, custom_id)
    except GatewayError as exc:
        return False, result_line(custom_id, error=(exc.code or exc.error_type, exc.message))
    finally:
        await gw.admission.finish(ticket)


async def _dispatch(gw: Core, dispatcher: Dispatcher, api: Any, ticket: Ticket, raw: bytes,
                    custom_id: str) -> tuple[bool, bytes]:
    started = time.perf_counter()
    path = API_PATHS[api]
    max_tokens = ticket.profile.max_output_tokens
    attempt = await gw.open_with(
        ticket.profile,
        lambda endpoint, first_byte_s: dispatcher.open(
            endpoint, path, raw, max_tokens=max_tokens, first_byte_s=first_byte_s,
            cache_salt=ticket.profile.cache_salt,
        ),
        ticket,
    )
    resp = attempt.response
    data, ended = await gw.read_with(
        attempt, started,
        lambda: dispatcher.read_all(attempt.endpoint, resp),
    )
    gw.account_body(attempt, data, status=resp.status, started=started, ended=ended)
    try:
        body: Any = orjson.loads(data)
    except orjson.JSONDecodeError:
        body = data.decode(errors="replace")
    rid = attempt.decision.decision_id
    if 200 <= resp.status < 300:
        return True, result_line(custom_id, status=resp.status, request_id=rid, body=body)
    err = body.get("error") if isinstance(body, dict) else None
    message = (err.get("message") if isinstance(err, dict) else None) or str(body)[:500]
    code = (err.get("code") or err.get("type")) if isinstance(err, dict) else None
    return False, result_line(
        custom_id, error=(str(code or f"upstream_status_{resp.status}"), str(message))
    )
