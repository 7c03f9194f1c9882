"""bench/null_picker: an ext_proc server that does no work, for `bench/envoy_epp.py`.

The floor of a Python picker on grpcio's asyncio server: it answers each message of Envoy's
picker filter at once (request headers: continue; request body: the same destination every
time, or each of several in turn, set the way `inferplane epp` sets it; response headers:
continue) and drains the observer filter's messages without answering. No authentication,
parsing, placement or accounting. The difference between ``envoy+null`` and ``envoy-direct``
is what Envoy's ext_proc filter and grpcio cost; between ``envoy+epp`` and ``envoy+null``,
what inferplane's pipeline costs.

    python bench/null_picker.py --port 9002 --destination 127.0.0.1:8000[,127.0.0.1:8001,...]
                                [--server grpclib]

Several destinations (comma-separated) are picked in turn, request by request (round robin): the
``envoy null-picker round_robin`` setup of the real-engine bench (bench/peers/peers.py).

``--server grpclib`` serves the same with grpclib (pure-Python HTTP/2 on the event loop, no
gRPC core threads) instead of grpcio, to compare the two servers' cost per message (grpclib is
not a dependency: ``pip install grpclib`` first).
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as pb_grpc
from google.protobuf import struct_pb2

ORIGINAL_DST_CLUSTER = "inferplane_original_dst"


def _set(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class NullProcessor(pb_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    def __init__(self, destination: str) -> None:
        self.bodies = [self._body(d) for d in destination.split(",")]
        self.turn = -1  # the first pick is the first destination
        self.body = self.bodies[0]
        self.headers = pb.ProcessingResponse(request_headers=pb.HeadersResponse())
        self.response = pb.ProcessingResponse(response_headers=pb.HeadersResponse())

    @staticmethod
    def _body(destination: str) -> Any:
        common = pb.CommonResponse(clear_route_cache=True)
        common.header_mutation.set_headers.extend([
            _set("x-gateway-destination-endpoint", destination),
            _set("x-inferplane-cluster", ORIGINAL_DST_CLUSTER),
        ])
        common.header_mutation.remove_headers.append("authorization")
        md = struct_pb2.Struct()
        md.fields["envoy.lb"].struct_value.fields[
            "x-gateway-destination-endpoint"].string_value = destination
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common),
                                     dynamic_metadata=md)

    def pick(self) -> Any:
        """The body answer: the one destination, or the next of several in turn."""
        if len(self.bodies) == 1:
            return self.body
        self.turn = (self.turn + 1) % len(self.bodies)
        return self.bodies[self.turn]

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        async for req in requests:
            if req.observability_mode:
                continue
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                yield self.headers
            elif kind == "request_body":
                yield self.pick()
            elif kind == "response_headers":
                yield self.response


class NullProcessorRW(NullProcessor):
    """The same answers from a coroutine handler that reads and writes through the context
    (grpcio's other stream-stream style) instead of an async generator."""

    async def Process(self, requests: AsyncIterator[Any], context: Any) -> None:  # type: ignore[override]
        while True:
            req = await context.read()
            if req is grpc.aio.EOF:
                return
            if req.observability_mode:
                continue
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                await context.write(self.headers)
            elif kind == "request_body":
                await context.write(self.pick())
            elif kind == "response_headers":
                await context.write(self.response)


class GrpclibProcessor:
    """The same answers served by grpclib."""

    def __init__(self, destination: str) -> None:
        self.answers = NullProcessor(destination)

    def __mapping__(self) -> dict[str, Any]:
        from grpclib.const import Cardinality, Handler

        return {"/envoy.service.ext_proc.v3.ExternalProcessor/Process": Handler(
            self.Process, Cardinality.STREAM_STREAM, pb.ProcessingRequest,
            pb.ProcessingResponse)}

    async def Process(self, stream: Any) -> None:
        a = self.answers
        async for req in stream:
            if req.observability_mode:
                continue
            kind = req.WhichOneof("request")
            if kind == "request_headers":
                await stream.send_message(a.headers)
            elif kind == "request_body":
                await stream.send_message(a.pick())
            elif kind == "response_headers":
                await stream.send_message(a.response)


async def main_grpclib(port: int, destination: str) -> None:
    from grpclib.server import Server

    server = Server([GrpclibProcessor(destination)])
    await server.start("127.0.0.1", port)
    await server.wait_closed()


async def main(port: int, destination: str, kind: str = "grpcio") -> None:
    if kind == "grpclib":
        await main_grpclib(port, destination)
        return
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    servicer = NullProcessorRW(destination) if kind == "grpcio-rw" else NullProcessor(destination)
    pb_grpc.add_ExternalProcessorServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--destination", required=True)
    ap.add_argument("--server", choices=("grpcio", "grpcio-rw", "grpclib"), default="grpcio")
    a = ap.parse_args()
    if os.environ.get("INFERPLANE_EVENT_LOOP", "uvloop") == "uvloop":
        import uvloop

        uvloop.run(main(a.port, a.destination, a.server))
    else:
        asyncio.run(main(a.port, a.destination, a.server))
