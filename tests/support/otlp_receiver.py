"""A small OTLP/HTTP receiver for tests: ``POST /v1/traces`` and ``POST /v1/metrics`` with
protobuf bodies (optionally gzip), decoded with opentelemetry-proto and kept in memory. It runs
its own event loop in a thread, so a synchronous test can drive a real gateway process against
it."""

from __future__ import annotations

import asyncio
import gzip
import threading
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from tests.support.procs import free_port


class OtlpReceiver:
    def __init__(self) -> None:
        self.port = free_port()
        self.traces: list[Any] = []
        self.metrics: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._runner: web.AppRunner | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _receive(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415, text="protobuf only")
        data = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            data = gzip.decompress(data)
        traces = request.path == "/v1/traces"
        msg: Any = ExportTraceServiceRequest() if traces else ExportMetricsServiceRequest()
        msg.ParseFromString(data)
        with self._lock:
            (self.traces if traces else self.metrics).append(msg)
            self.headers.append({k.lower(): v for k, v in request.headers.items()})
        answer: Any = ExportTraceServiceResponse() if traces else ExportMetricsServiceResponse()
        return web.Response(body=answer.SerializeToString(),
                            content_type="application/x-protobuf")

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        app = web.Application()
        app.router.add_post("/v1/traces", self._receive)
        app.router.add_post("/v1/metrics", self._receive)
        self._runner = web.AppRunner(app, access_log=None)
        self._loop.run_until_complete(self._runner.setup())
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        self._loop.run_until_complete(site.start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> OtlpReceiver:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("OTLP receiver did not start")
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """Every received span with its resource attributes."""
        out = []
        with self._lock:
            for req in self.traces:
                for rs in req.resource_spans:
                    res = attributes(rs.resource.attributes)
                    for ss in rs.scope_spans:
                        out.extend((res, s) for s in ss.spans)
        return out

    def metric_names(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        with self._lock:
            for req in self.metrics:
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for m in sm.metrics:
                            out[m.name] = m
        return out


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = getattr(v, kind) if kind else None
    return out
