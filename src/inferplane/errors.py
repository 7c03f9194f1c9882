"""The one error hierarchy of inferplane.

Every layer raises these; only ``api/`` renders them, always in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``::

    GatewayError                      500 internal_error
    ├── InvalidRequestError           400 invalid_request_error   (bad JSON, field or header)
    ├── AuthenticationError           401 authentication_error    (missing or unknown API key)
    ├── PermissionDeniedError         403 permission_error        (another tenant's decision, ...)
    ├── NotFoundError                 404 not_found_error
    │   └── ModelNotFoundError        404 model_not_found
    ├── RequestTimeoutError           408 request_timeout         (the body came too slowly)
    ├── PayloadTooLargeError          413 payload_too_large
    ├── UnsupportedMediaTypeError     415 unsupported_media_type  (a body that says it is not JSON)
    ├── RateLimitError                429 rate_limit_exceeded     (carries Retry-After)
    │   └── BudgetExceededError       429 budget_exceeded
    ├── UpstreamError                 502 upstream_error          (names the upstream)
    │   ├── UpstreamErrorEvent                                     (its stream's error event)
    │   └── UpstreamRateLimitedError  429 upstream_rate_limited   (its 429, nowhere else to go)
    ├── NoEligibleEndpointError       503 no_eligible_endpoint    (names filters and counts)
    │   └── EndpointsRateLimitedError 429 upstream_rate_limited   (all out after their 429s)
    └── StoreUnavailableError         503 service_unavailable     (shared store down; Retry-After)

Configuration errors are not gateway errors: ``ConfigError`` names the file, the path inside it
and the problem, and the CLI prints it without a stack trace.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Protocol, Self

DECISION_HEADER = "x-inferplane-decision-id"
"""The answer header naming the request's decision record (`GatewayError.answer_headers`)."""
RECEIPT_HEADER = "x-inferplane-receipt"
"""The answer header (an SSE comment at the end of a stream) holding the record's hash."""


QUOTE_LIMIT = 64
"""The most characters of a client's string an error message quotes (`quoted`)."""


def quoted(text: str, limit: int = QUOTE_LIMIT) -> str:
    """``text`` as an error message quotes a client's string: its repr, cut to ``limit``
    characters (then ``…``), so a message never echoes a large value back."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def described(exc: BaseException) -> str:
    """``exc`` as a one-line log or error message gives it: its type, and its text if any."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def first_line(exc: BaseException, *, typed: bool = False) -> str:
    """The first line of ``exc``'s text (a database driver's runs to several), or its type's
    name when it has none; ``typed`` puts the type's name before the line too."""
    lines = str(exc).strip().splitlines()
    if not lines:
        return type(exc).__name__
    return f"{type(exc).__name__}: {lines[0]}" if typed else lines[0]


class Recorded(Protocol):
    """The receipt of a decision record (`inferplane.ledger.record.Receipt`), as an error that
    has one holds it."""

    hash: str

    async def durable(self, timeout_s: float | None = None) -> bool: ...


class GatewayError(Exception):
    """Base of every error the gateway answers with. Carries its HTTP status and OpenAI type,
    and, when the request has a decision record (it was placed, or placement found nothing),
    that record's id and receipt (`recorded`): the front end names them on the answer."""

    status: int = 500
    error_type: str = "internal_error"
    code: str | None = None
    decision_id: str | None = None
    receipt: Recorded | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def recorded(self, decision_id: str, receipt: Recorded) -> Self:
        """Note the decision record this error's answer has (its id and receipt)."""
        self.decision_id, self.receipt = decision_id, receipt
        return self

    def answer_headers(self) -> dict[str, str]:
        """The headers of this error's answer: its own (``Retry-After``...) and, when the
        request has a record, ``x-inferplane-decision-id`` and ``x-inferplane-receipt``. Every
        front end (HTTP, the EPP's ImmediateResponse) answers with these."""
        headers = dict(self.headers)
        if self.decision_id is not None:
            headers[DECISION_HEADER] = self.decision_id
            if self.receipt is not None and self.receipt.hash:
                headers[RECEIPT_HEADER] = self.receipt.hash
        return headers

    def to_body(self) -> dict[str, dict[str, str | None]]:
        """The OpenAI error body."""
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


class InvalidRequestError(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class AuthenticationError(GatewayError):
    status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(GatewayError):
    status = 403
    error_type = "permission_error"


class NotFoundError(GatewayError):
    status = 404
    error_type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    error_type = "invalid_request_error"
    code = "model_not_found"


class RequestTimeoutError(GatewayError):
    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLargeError(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaTypeError(GatewayError):
    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitError(GatewayError):
    status = 429
    error_type = "rate_limit_exceeded"


class BudgetExceededError(RateLimitError):
    error_type = "budget_exceeded"


class UpstreamError(GatewayError):
    """The chosen upstream failed. ``upstream`` names the endpoint."""

    status = 502
    error_type = "upstream_error"

    def __init__(self, message: str, *, upstream: str, **kwargs: object) -> None:
        super().__init__(f"upstream {upstream!r}: {message}", **kwargs)  # type: ignore[arg-type]
        self.upstream = upstream


class UpstreamErrorEvent(UpstreamError):
    """The upstream's stream ended in an error event of its own, well framed (an OpenAI-dialect
    ``data: {"error": {...}}`` as vLLM, SGLang and OpenAI send on a mid-stream failure, a
    Messages stream's ``error`` event): a stream error as any other, and the client's stream
    ends as the upstream's did, with the error event and ``data: [DONE]``. ``client_fault``:
    the event says the request was at fault (a 4xx ``code``, vLLM's ``BadRequestError``, an
    ``invalid_request_error``): recorded as an error, but not against the endpoint's health."""

    def __init__(self, message: str, *, upstream: str, client_fault: bool = False) -> None:
        super().__init__(message, upstream=upstream)
        self.client_fault = client_fault


class UpstreamRateLimitedError(UpstreamError):
    """The last attempt's upstream answered 429 and no other endpoint could take the request:
    a 429 with the gateway's own ``Retry-After`` (`retry_after_header`), when the first
    endpoint that can serve the model is back, so that OpenAI clients retry then."""

    status = 429
    error_type = "rate_limit_exceeded"
    code = "upstream_rate_limited"


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` for a wait of ``seconds``: whole seconds rounded up, at least 1."""
    return {"Retry-After": str(max(1, math.ceil(seconds)))}


class NoEligibleEndpointError(GatewayError):
    """Filters left no candidate. ``removed`` maps filter name to endpoints it removed."""

    status = 503
    error_type = "no_eligible_endpoint"

    def __init__(self, total: int, removed: Mapping[str, int], detail: str = "") -> None:
        parts = ", ".join(f"{n} {name}" for name, n in removed.items() if n)
        message = f"0/{total} endpoints eligible: {parts or 'none configured'}"
        if detail:
            message = f"{message} ({detail})"
        super().__init__(message, code=self.code or "no_eligible_endpoint")
        self.total = total
        self.removed = dict(removed)


class EndpointsRateLimitedError(NoEligibleEndpointError):
    """Every endpoint that serves the model and was filtered out is ejected after its 429
    (`fleet.passive`): a 429 with ``Retry-After`` when the first of them is back. When some
    were filtered out for other reasons the answer stays a 503 and carries that
    ``Retry-After`` alone (`core.plane.Core.decide`)."""

    status = 429
    error_type = "rate_limit_exceeded"
    code = "upstream_rate_limited"


class StoreUnavailableError(GatewayError):
    """A shared store (Redis) cannot be reached and the answer needs it (a budget to check, a
    usage report); carries Retry-After. The outage policy is in docs/shared-state.md."""

    status = 503
    error_type = "service_unavailable"
    code = "store_unavailable"

    @classmethod
    def retry_after(cls, store: str, what: str, retry_after_s: float) -> Self:
        """``store`` (what is wrong with it) keeps ``what`` from being checked now: the answer
        names both and says when to retry, ``retry_after_s`` rounded up to whole seconds, at
        least 1, in the message and in ``Retry-After``."""
        wait = max(1, math.ceil(retry_after_s))
        return cls(
            f"{store}, so {what} cannot be checked now; retry after {wait} s",
            headers={"Retry-After": str(wait)},
        )


class ConfigError(Exception):
    """A configuration file is invalid. The message names file, path inside it and problem."""

    def __init__(self, file: str, problems: list[tuple[str, str]]) -> None:
        self.file = file
        self.problems = problems
        lines = [f"{file}: {path}: {msg}" if path else f"{file}: {msg}" for path, msg in problems]
        super().__init__("\n".join(lines))
