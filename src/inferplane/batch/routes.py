"""The batch lane's HTTP surface, compatible with OpenAI's Files and Batch APIs.

=================================  =============================================================
``POST /v1/files``                 multipart upload (``purpose=batch``, ``file``: JSONL); every
                                   line checked, a bad one is a 400 naming its line number
``GET /v1/files/{id}``             the file object
``GET /v1/files/{id}/content``     the file's bytes (input, output or error file)
``POST /v1/batches``               ``{input_file_id, endpoint, completion_window: "24h",
                                   metadata}`` → a batch (``validating``)
``GET /v1/batches``                the caller's batches, newest first (``limit``, ``after``)
``GET /v1/batches/{id}``           one batch
``POST /v1/batches/{id}/cancel``   → ``cancelling``, then ``cancelled``
=================================  =============================================================

A tenant sees only its own files and batches: another tenant's id is a 404, as is an unknown
one. Errors are raised as `GatewayError` and rendered by the app's one error middleware.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import orjson
from aiohttp import BodyPartReader, web

from inferplane.batch.jsonl import ENDPOINTS, check_input
from inferplane.batch.sqlite_store import SqliteBatchStore
from inferplane.batch.store import ACTIVE, BatchStore, public
from inferplane.batch.worker import BatchWorker, new_id
from inferplane.config.dsn import postgres_dsn
from inferplane.config.files import writable_file_problem
from inferplane.config.schema import FleetConfig
from inferplane.core.plane import Core
from inferplane.core.process import worker_index
from inferplane.core.validation import parse_json
from inferplane.dispatch.upstream import Dispatcher
from inferplane.errors import (
    ConfigError,
    GatewayError,
    InvalidRequestError,
    NotFoundError,
    PayloadTooLargeError,
)
from inferplane.httpio import idle, read_body, within

WINDOW_S = {"24h": 24 * 3600}


def store_path(config: FleetConfig) -> str | None:
    """The SQLite batch store's file (``batch.path``, default
    ``<gateway.ledger_path>.batches.sqlite``); None: in memory, unless PostgreSQL is set."""
    path = config.batch.path
    if path is None and config.gateway.ledger_path:
        path = config.gateway.ledger_path + ".batches.sqlite"
    return path


def in_memory(config: FleetConfig) -> bool:
    """Whether `make_store` gives a store in memory (lost on restart, one process's): no
    PostgreSQL DSN (nor its variable) and no file. ``serve`` warns of it and ``--workers``
    refuses it (cli.py); whether the batch lane is on is the caller's question."""
    spec = config.batch
    return not (spec.postgres_dsn or spec.postgres_dsn_env) and store_path(config) is None


def store_field(config: FleetConfig) -> str:
    """The field that names the SQLite batch store's file (`store_path`)."""
    return "batch.path" if config.batch.path is not None else "gateway.ledger_path"


def _file_problem(config: FleetConfig) -> tuple[str, str] | None:
    path = store_path(config)
    problem = None if path is None else writable_file_problem(path)
    return None if problem is None else (store_field(config), f"{path}: {problem}")


def store_problems(config: FleetConfig, file: str) -> list[tuple[str, str]]:
    """What `make_store` would refuse in this environment, each as (field, problem), without
    opening a file or a connection (`inferplane check` reports them); none with the batch lane
    off."""
    if not config.batch.enabled:
        return []
    try:
        if postgres_dsn(config, "batch", file):
            return []
    except ConfigError as exc:
        return exc.problems
    problem = _file_problem(config)
    return [] if problem is None else [problem]


def make_store(config: FleetConfig, file: str = "<config>") -> BatchStore:
    """The configured batch store: PostgreSQL (``batch.postgres_dsn`` or ``_env``), else the
    SQLite file (``batch.path``, default ``<gateway.ledger_path>.batches.sqlite``), else
    memory. A DSN variable that is not set, and a file the gateway cannot create or write
    (its directory missing, ...), are a `ConfigError` naming the field."""
    spec = config.batch
    dsn = postgres_dsn(config, "batch", file)
    if dsn:
        from inferplane.batch.postgres_store import PostgresBatchStore

        return PostgresBatchStore(
            dsn, schema=spec.postgres_schema, prefix=spec.table_prefix, source=file
        )
    path = store_path(config)
    if path is None:
        return SqliteBatchStore(None)
    problem = _file_problem(config)
    if problem is not None:
        raise ConfigError(file, [problem])
    return SqliteBatchStore(Path(path), source=file, field=store_field(config))


class BatchService:
    """The store, the worker and the routes of one gateway's batch lane."""

    def __init__(self, gw: Core, dispatcher: Dispatcher) -> None:
        spec = gw.config.batch
        if spec.workload_class not in gw.classifier.classes:
            known = ", ".join(sorted(gw.classifier.classes))
            msg = f"unknown class {spec.workload_class!r}; known: {known}"
            raise ConfigError("<config>", [("batch.workload_class", msg)])
        self.gw = gw
        self.spec = spec
        self.store = make_store(gw.config)
        self.worker = BatchWorker(gw, dispatcher, self.store, spec)

    async def start(self) -> None:
        await self.store.start()
        # every process sharing the store runs batches (lines are claimed, `batch.store`); a
        # store in memory belongs to one process (`serve --workers N` refuses it; worker 0's)
        if self.store.shared or worker_index() in (None, 0):
            self.worker.start()

    async def stop(self) -> None:
        await self.worker.stop()
        await self.store.close()

    def _tenant(self, request: web.Request) -> tuple[str, str]:
        tenant, key_hash = self.gw.authenticate_key(request.headers.get("Authorization"))
        return tenant.name, key_hash

    # -- files ----------------------------------------------------------------------------
    async def upload(self, request: web.Request) -> web.Response:
        """Stream the ``file`` part to a temporary file on disk (never whole in memory) within
        ``batch.max_file_bytes``, check it line by line, then copy it into the store. Malformed
        multipart is a 400; a pause of more than ``gateway.body_timeout_s`` between chunks, or
        an upload not whole within ``gateway.upload_timeout_s``, a 408."""
        tenant, _ = self._tenant(request)
        if not request.content_type.startswith("multipart/"):
            raise InvalidRequestError(
                "upload a file as multipart/form-data with fields 'purpose' and 'file'"
            )
        with tempfile.TemporaryFile(prefix="inferplane-upload-") as spool:
            try:
                purpose, filename, size = await within(
                    self._receive(request, spool), self.gw.config.gateway.upload_timeout_s,
                    request)
            except (GatewayError, ConnectionError):
                raise
            except Exception as exc:  # whatever aiohttp's multipart reader makes of the bytes
                raise InvalidRequestError(
                    f"malformed multipart upload: {type(exc).__name__}: {exc}"
                ) from None
            if purpose != "batch":
                raise InvalidRequestError(
                    f"'purpose' must be \"batch\", got {purpose!r}", param="purpose"
                )
            if size is None:
                raise InvalidRequestError("'file' is required", param="file")
            spool.seek(0)
            await asyncio.to_thread(check_input, spool, self.spec.max_lines)
            obj = await self.store.add_file_from(
                new_id("file-"), tenant, purpose, filename, spool, size, int(time.time())
            )
        return _json(obj)

    async def _receive(
        self, request: web.Request, spool: BinaryIO
    ) -> tuple[str | None, str, int | None]:
        """(purpose, filename, size of the file part written to ``spool``)."""
        reader = await request.multipart()
        purpose: str | None = None
        size: int | None = None
        filename = "upload.jsonl"
        limit = self.spec.max_file_bytes
        pause = self.gw.config.gateway.body_timeout_s
        while (part := await idle(reader.next(), pause, request)) is not None:
            if not isinstance(part, BodyPartReader):
                raise InvalidRequestError("nested multipart parts are not accepted")
            if part.name == "purpose":
                raw = await idle(part.read(), pause, request)
                if len(raw) > 64:
                    raise InvalidRequestError("'purpose' is too long", param="purpose")
                purpose = raw.decode("utf-8", "replace").strip()
            elif part.name == "file":
                filename = part.filename or filename
                size = 0
                while chunk := await idle(part.read_chunk(1 << 16), pause, request):
                    size += len(chunk)
                    if size > limit:
                        raise PayloadTooLargeError(
                            f"file exceeds the limit of {limit} bytes (batch.max_file_bytes)"
                        )
                    spool.write(chunk)
            else:
                await idle(part.release(), pause, request)
        return purpose, filename, size

    async def get_file(self, request: web.Request) -> web.Response:
        tenant, _ = self._tenant(request)
        obj = await self.store.get_file(request.match_info["file_id"], tenant)
        if obj is None:
            raise NotFoundError("no such file", param="file_id")
        return _json(obj)

    async def file_content(self, request: web.Request) -> web.Response:
        tenant, _ = self._tenant(request)
        data = await self.store.file_content(request.match_info["file_id"], tenant)
        if data is None:
            raise NotFoundError("no such file", param="file_id")
        return web.Response(body=data, content_type="application/jsonl")

    # -- batches --------------------------------------------------------------------------
    async def create(self, request: web.Request) -> web.Response:
        tenant, key_hash = self._tenant(request)
        body = parse_json(await read_body(request, self.gw.config.gateway.body_timeout_s))
        fid = body.get("input_file_id")
        if not isinstance(fid, str) or not fid:
            raise InvalidRequestError("'input_file_id' must be a file id", param="input_file_id")
        endpoint = body.get("endpoint")
        if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
            raise InvalidRequestError(
                f"'endpoint' must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}",
                param="endpoint",
            )
        window = body.get("completion_window")
        if not isinstance(window, str) or window not in WINDOW_S:
            raise InvalidRequestError(
                f"'completion_window' must be \"24h\", got {window!r}", param="completion_window"
            )
        metadata = _metadata(body.get("metadata"))
        f = await self.store.get_file(fid, tenant)
        if f is None:
            raise NotFoundError(f"no such file {fid!r}", param="input_file_id")
        if f["purpose"] != "batch":
            raise InvalidRequestError(
                f"file {fid!r} has purpose {f['purpose']!r}, not 'batch'", param="input_file_id"
            )
        now = int(time.time())
        b = {
            "id": new_id("batch_"),
            "endpoint": endpoint,
            "input_file_id": fid,
            "completion_window": window,
            "status": "validating",
            "metadata": metadata,
            "created_at": now,
            "expires_at": now + WINDOW_S[str(window)],
        }
        await self.store.add_batch(b, key_hash, tenant)
        self.worker.wake()
        return _json(await self._batch(str(b["id"]), tenant))

    async def get(self, request: web.Request) -> web.Response:
        tenant, _ = self._tenant(request)
        return _json(await self._batch(request.match_info["batch_id"], tenant))

    async def list(self, request: web.Request) -> web.Response:
        tenant, _ = self._tenant(request)
        raw = request.query.get("limit", "20")
        if not raw.isdigit() or not 1 <= int(raw) <= 100:
            raise InvalidRequestError("'limit' must be an integer from 1 to 100", param="limit")
        data, more = await self.store.list_batches(tenant, int(raw), request.query.get("after"))
        rows = [public(b) for b in data]
        return _json({
            "object": "list",
            "data": rows,
            "first_id": rows[0]["id"] if rows else None,
            "last_id": rows[-1]["id"] if rows else None,
            "has_more": more,
        })

    async def cancel(self, request: web.Request) -> web.Response:
        tenant, _ = self._tenant(request)
        bid = request.match_info["batch_id"]
        b = await self._batch(bid, tenant)
        if b["status"] not in ("cancelling", "cancelled"):
            moved = await self.store.set_status(
                bid, "cancelling", int(time.time()), only_from=("validating", "in_progress")
            )
            if not moved:
                raise InvalidRequestError(
                    f"batch {bid!r} is {b['status']!r} and can no longer be cancelled",
                    param="batch_id",
                )
            self.worker.wake()
        return _json(await self._batch(bid, tenant))

    async def _batch(self, bid: str, tenant: str) -> dict[str, Any]:
        b = await self.store.get_batch(bid, tenant)
        if b is None:
            raise NotFoundError("no such batch", param="batch_id")
        return public(b)


def _metadata(v: Any) -> dict[str, str] | None:
    if v is None:
        return None
    ok = (
        isinstance(v, dict)
        and len(v) <= 16
        and all(isinstance(k, str) and len(k) <= 64 for k in v)
        and all(isinstance(x, str) and len(x) <= 512 for x in v.values())
    )
    if not ok:
        raise InvalidRequestError(
            "'metadata' must be an object of at most 16 string keys (≤ 64 chars) with string "
            "values (≤ 512 chars)",
            param="metadata",
        )
    return dict(v)


def _json(obj: Any) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


BATCH_KEY: web.AppKey[BatchService] = web.AppKey("batch", BatchService)


def setup(app: web.Application, gw: Core, dispatcher: Dispatcher) -> BatchService | None:
    """Add the batch routes to ``app`` and run the worker with it (when ``batch.enabled``)."""
    if not gw.config.batch.enabled:
        return None
    svc = BatchService(gw, dispatcher)
    app[BATCH_KEY] = svc
    app.router.add_post("/v1/files", svc.upload)
    app.router.add_get("/v1/files/{file_id}", svc.get_file)
    app.router.add_get("/v1/files/{file_id}/content", svc.file_content)
    app.router.add_post("/v1/batches", svc.create)
    app.router.add_get("/v1/batches", svc.list)
    app.router.add_get("/v1/batches/{batch_id}", svc.get)
    app.router.add_post("/v1/batches/{batch_id}/cancel", svc.cancel)

    async def start(app: web.Application) -> None:
        await svc.start()

    async def stop(app: web.Application) -> None:
        await svc.stop()

    app.on_startup.append(start)
    app.on_cleanup.insert(0, stop)
    return svc


__all__ = ["ACTIVE", "BATCH_KEY", "BatchService", "setup"]
