"""Small OTLP receivers for tests, decoding with opentelemetry-proto and keeping what they get in
memory: `OtlpReceiver` (OTLP/HTTP: ``POST /v1/traces`` and ``POST /v1/metrics`` with protobuf
bodies, optionally gzip; its own event loop in a thread) and `GrpcOtlpReceiver` (OTLP/gRPC: the
collector's ``TraceService`` and ``MetricsService`` on a grpcio server). A synchronous test can
drive a real gateway process against either."""

from __future__ import annotations

import asyncio
import gzip
import threading
from concurrent import futures
from typing import Any

import grpc
from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2_grpc import (
    MetricsServiceServicer,
    add_MetricsServiceServicer_to_server,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc import (
    TraceServiceServicer,
    add_TraceServiceServicer_to_server,
)

from tests.support.procs import free_port


class _Received:
    """What a receiver got: decoded export requests and each request's headers (metadata)."""

    def __init__(self) -> None:
        self.traces: list[Any] = []
        self.metrics: list[Any] = []
        self.headers: list[dict[str, str]] = []
        self._lock = threading.Lock()

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


class OtlpReceiver(_Received):
    protocol = "http/protobuf"

    def __init__(self) -> None:
        super().__init__()
        self.port = free_port()
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

class GrpcOtlpReceiver(_Received):
    """OTLP/gRPC on 127.0.0.1 (a free port), plaintext."""

    protocol = "grpc"

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        received = self

        class Traces(TraceServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                received._keep(received.traces, request, context)
                return ExportTraceServiceResponse()

        class Metrics(MetricsServiceServicer):  # type: ignore[misc]
            def Export(self, request: Any, context: Any) -> Any:
                received._keep(received.metrics, request, context)
                return ExportMetricsServiceResponse()

        add_TraceServiceServicer_to_server(Traces(), self._server)
        add_MetricsServiceServicer_to_server(Metrics(), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    def _keep(self, into: list[Any], request: Any, context: Any) -> None:
        with self._lock:
            into.append(request)
            self.headers.append({k.lower(): v for k, v in context.invocation_metadata()})

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> GrpcOtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=None).wait(10)


def attributes(kvs: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in kvs:
        v = kv.value
        kind = v.WhichOneof("value")
        out[kv.key] = getattr(v, kind) if kind else None
    return out
