"""The OpenAPI 3.1 description of the gateway's own API, generated from its routes.

`build_spec` walks the aiohttp router, so a route added without a description here fails
(`MissingOperation`, and tests/test_openapi.py); each operation names its request model and its
answer's model (pydantic, below), from which the JSON Schemas come. Every operation declares
``default``: the OpenAI error body, which every error of the gateway has (`errors`).

The request models describe what the gateway accepts as it checks it (`core.validation`): the
fields it reads are typed, anything else passes through to the engine. The answer models are as
loose as the upstream engines' answers are (extra fields allowed) and as strict as what the gateway
itself writes. Served as ``GET /openapi.json`` and printed by ``inferplane openapi``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from inferplane import __version__


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors -------------------------------------------------------------------------------------
class ErrorDetail(_Closed):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(_Closed):
    """Every error answer of the gateway, whatever its status."""

    error: ErrorDetail


# -- inference requests -------------------------------------------------------------------------
PositiveInt = Field(None, ge=1)
TokenIds = list[int]
PromptLike = str | list[str] | list[int] | list[list[int]]


class StreamOptions(_Open):
    include_usage: bool | None = None


class ChatMessage(_Open):
    role: str
    content: str | list[dict[str, Any]] | None = None


class _Generation(_Open):
    model: str = Field(min_length=1)
    max_tokens: int | None = PositiveInt
    max_completion_tokens: int | None = PositiveInt
    n: int | None = PositiveInt
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    cache_salt: str | None = Field(
        None, description="narrows the tenant's prefix-cache scope (never widens it)"
    )


class ChatCompletionRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Generation):
    prompt: PromptLike


class EmbeddingRequest(_Open):
    model: str = Field(min_length=1)
    input: PromptLike


# -- inference answers (the engine's, relayed) --------------------------------------------------
class Usage(_Open):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class ChatCompletion(_Open):
    id: str
    object: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class Completion(_Open):
    id: str
    object: str
    choices: list[dict[str, Any]]
    usage: Usage | None = None


class EmbeddingList(_Open):
    object: str
    data: list[dict[str, Any]]


# -- the gateway's own answers ------------------------------------------------------------------
class ModelInfo(_Closed):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    variants: list[str]
    max_context: int


class ModelList(_Closed):
    object: Literal["list"]
    data: list[ModelInfo]


class DecisionList(_Closed):
    object: Literal["list"]
    data: list[dict[str, Any]]
    has_more: bool
    next_cursor: str | None


class DecisionRecord(_Open):
    """A decision record (docs/evidence.md): its shape belongs to the ledger."""


class UsageReport(_Closed):
    object: Literal["list"]
    tenant: str
    group_by: list[str]
    data: list[dict[str, Any]]
    total: dict[str, Any]


class FleetHealth(_Closed):
    object: Literal["fleet.health"]
    endpoints: list[dict[str, Any]]
    pools: list[dict[str, Any]]


class Liveness(_Closed):
    status: Literal["ok"]


class Readiness(_Closed):
    ready: bool
    draining: bool
    usable_endpoints: int
    endpoints: int


class FileObject(_Closed):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str


class BatchCreate(_Open):
    input_file_id: str = Field(min_length=1)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = None


class Batch(_Open):
    id: str
    object: Literal["batch"]
    endpoint: str
    input_file_id: str
    completion_window: str
    status: str


class BatchList(_Closed):
    object: Literal["list"]
    data: list[Batch]
    first_id: str | None
    last_id: str | None
    has_more: bool


# -- operations ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    summary: str
    tag: str
    answer: type[BaseModel] | None = None  # None: the 200 is not JSON (``media``)
    body: type[BaseModel] | None = None
    media: str = "application/json"
    stream: bool = False  # may answer text/event-stream
    auth: Literal["tenant", "admin", "none"] = "tenant"
    multipart: bool = False
    query: tuple[tuple[str, str], ...] = ()  # (name, description)
    description: str = ""  # who may call it, where `auth` is not "tenant"


OPERATIONS: dict[tuple[str, str], Operation] = {
    ("POST", "/v1/chat/completions"): Operation(
        "Chat completion, placed on the fleet", "inference", ChatCompletion,
        ChatCompletionRequest, stream=True),
    ("POST", "/v1/completions"): Operation(
        "Text completion, placed on the fleet", "inference", Completion, CompletionRequest,
        stream=True),
    ("POST", "/v1/embeddings"): Operation(
        "Embeddings, placed on the fleet", "inference", EmbeddingList, EmbeddingRequest),
    ("GET", "/v1/models"): Operation("The fleet's models", "inference", ModelList),
    ("GET", "/v1/decisions"): Operation(
        "The caller's decision records, oldest first", "evidence", DecisionList,
        query=(("since", "from this time (unix seconds or ISO 8601)"),
               ("until", "up to this time"), ("class", "workload class"), ("model", "model"),
               ("substrate", "substrate"), ("limit", "records per page"),
               ("cursor", "next_cursor of the previous page"))),
    ("GET", "/v1/decisions/{decision_id}"): Operation(
        "One decision record and its outcome", "evidence", DecisionRecord),
    ("GET", "/v1/usage"): Operation(
        "The caller's attributed usage and cost", "evidence", UsageReport,
        query=(("group_by", "comma list of day, workflow, model, class, key"),)),
    ("GET", "/v1/fleet/health"): Operation(
        "Every endpoint's and pool's health (an admin key)", "operations", FleetHealth,
        auth="admin",
        description="Every endpoint's load, queue, KV-cache use and error rate, in every "
        "jurisdiction: what /metrics shows, so it needs an admin key "
        "(gateway.metrics.api_keys); a tenant's key is refused (403) unless "
        "gateway.metrics.fleet_health_for_tenants is set. gateway.metrics.public does not "
        "open it."),
    ("GET", "/health"): Operation("Liveness", "operations", Liveness, auth="none"),
    ("GET", "/ready"): Operation(
        "Readiness (503 when no endpoint is usable, or while draining)", "operations",
        Readiness, auth="none",
        query=(("scope", "fleet (the default): 503 when no endpoint is usable or while the "
                         "gateway drains; process: 503 only while it drains (a load balancer's "
                         "readiness probe: engines restarting do not take every replica out)"),)),
    ("GET", "/metrics"): Operation(
        "Prometheus metrics (an admin key, or the metrics listener)", "operations", None,
        media="text/plain", auth="admin",
        description="The gateway's own metrics (docs/metrics.md): an admin key "
        "(gateway.metrics.api_keys), unless gateway.metrics.public; the gateway.metrics.port "
        "listener serves it with no key."),
    ("GET", "/openapi.json"): Operation(
        "This description", "operations", None, media="application/json", auth="none"),
    ("POST", "/v1/files"): Operation(
        "Upload a batch input file (JSONL)", "batch", FileObject, multipart=True),
    ("GET", "/v1/files/{file_id}"): Operation("A file", "batch", FileObject),
    ("GET", "/v1/files/{file_id}/content"): Operation(
        "A file's bytes", "batch", None, media="application/jsonl"),
    ("POST", "/v1/batches"): Operation("Create a batch", "batch", Batch, BatchCreate),
    ("GET", "/v1/batches"): Operation(
        "The caller's batches, newest first", "batch", BatchList,
        query=(("limit", "1 to 100"), ("after", "a batch id"))),
    ("GET", "/v1/batches/{batch_id}"): Operation("A batch", "batch", Batch),
    ("POST", "/v1/batches/{batch_id}/cancel"): Operation("Cancel a batch", "batch", Batch),
}


class MissingOperation(Exception):
    """A route has no entry in `OPERATIONS`."""


def build_spec(routes: list[tuple[str, str]]) -> dict[str, Any]:
    """The OpenAPI document for ``routes`` (method, path) as the router holds them."""
    schemas: dict[str, Any] = {}

    def ref(model: type[BaseModel]) -> dict[str, Any]:
        doc = model.model_json_schema(ref_template="#/components/schemas/{model}")
        for name, sub in doc.pop("$defs", {}).items():
            schemas[name] = sub
        schemas[model.__name__] = doc
        return {"$ref": f"#/components/schemas/{model.__name__}"}

    error = {"application/json": {"schema": ref(ErrorBody)}}
    paths: dict[str, dict[str, Any]] = {}
    for method, path in routes:
        if method == "HEAD":
            continue
        op = OPERATIONS.get((method, path))
        if op is None:
            raise MissingOperation(f"{method} {path} has no OpenAPI description (api/openapi.py)")
        content: dict[str, Any]
        if op.answer is not None:
            content = {"application/json": {"schema": ref(op.answer)}}
        else:
            content = {op.media: {"schema": {"type": "string"} if op.media != "application/json"
                                  else {"type": "object"}}}
        if op.stream:
            content["text/event-stream"] = {"schema": {"type": "string"}}
        op_id = method.lower() + "".join(c if c.isalnum() else "_" for c in path if c not in "{}")
        item: dict[str, Any] = {
            "summary": op.summary,
            "operationId": op_id,
            "tags": [op.tag],
            "responses": {
                "200": {"description": "OK", "content": content},
                "default": {"description": "an error, in OpenAI's shape", "content": error},
            },
        }
        if op.description:
            item["description"] = op.description
        if op.auth == "none":
            item["security"] = []
        params = [
            {"name": seg[1:-1], "in": "path", "required": True,
             "schema": {"type": "string", "minLength": 1}}
            for seg in path.split("/") if seg.startswith("{")
        ]
        params += [
            {"name": name, "in": "query", "required": False, "description": desc,
             "schema": {"type": "string"}}
            for name, desc in op.query
        ]
        if params:
            item["parameters"] = params
        if op.body is not None:
            item["requestBody"] = {
                "required": True, "content": {"application/json": {"schema": ref(op.body)}}
            }
        elif op.multipart:
            item["requestBody"] = {"required": True, "content": {"multipart/form-data": {
                "schema": {
                    "type": "object", "required": ["purpose", "file"],
                    "properties": {"purpose": {"type": "string", "enum": ["batch"]},
                                   "file": {"type": "string", "format": "binary"}},
                }}}}
        paths.setdefault(path, {})[method.lower()] = item
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "inferplane gateway",
            "version": __version__,
            "description": "The OpenAI-compatible gateway of the inference execution plane, and "
            "its own evidence, batch and operations routes. Every error is "
            '{"error": {"message", "type", "param", "code"}}.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
