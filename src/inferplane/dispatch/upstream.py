"""dispatch: call the chosen endpoint over pooled keep-alive connections and relay its answer.

Upstream client exceptions are translated to `UpstreamError` at one boundary (`_translate`);
``UpstreamAttemptFailed`` marks a failure *before the first byte*, which the pipeline may answer by
re-placing the request elsewhere. After the first byte a failure can only end the stream.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import AsyncGenerator, Iterator

import aiohttp

from inferplane.dispatch.answer import StreamStats, UpstreamAttemptFailed
from inferplane.fleet.model import Endpoint

RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504})
_HOP_HEADERS = frozenset(
    {
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "content-encoding",
        "date",
        "server",
    }
)


@contextlib.contextmanager
def _translate(endpoint: Endpoint) -> Iterator[None]:
    """Map aiohttp/asyncio exceptions to the gateway's error tree."""
    try:
        yield
    except TimeoutError:
        raise UpstreamAttemptFailed(
            "timed out before answering", upstream=endpoint.name, reason="timeout"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamAttemptFailed(
            f"cannot connect ({exc.os_error.strerror or exc.os_error})",
            upstream=endpoint.name,
            reason="connect",
        ) from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise UpstreamAttemptFailed(
            f"connection failed ({type(exc).__name__})", upstream=endpoint.name, reason="connection"
        ) from None


_USAGE_ONLY = re.compile(rb'"choices"\s*:\s*\[\s*\]')


class SSEUsageFilter:
    """Removes usage-only SSE events (``"choices": []`` with ``"usage"``) from a relayed stream,
    for clients that did not ask for ``stream_options.include_usage`` when the gateway did.

    Complete events pass straight through; only a trailing partial event is held back until its
    end (``\n\n``) arrives, so nothing is buffered beyond one event.
    """

    __slots__ = ("_carry",)

    def __init__(self) -> None:
        self._carry = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._carry = data
            return b""
        complete, self._carry = data[: cut + 2], data[cut + 2 :]
        if b'"usage"' not in complete:
            return complete
        kept = [
            ev
            for ev in complete.split(b"\n\n")
            if ev and not (b'"usage"' in ev and _USAGE_ONLY.search(ev))
        ]
        return b"".join(ev + b"\n\n" for ev in kept)

    def flush(self) -> bytes:
        rest, self._carry = self._carry, b""
        return rest


class Dispatcher:
    """Pooled upstream client shared by all requests of one gateway."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 2.0,
        total_timeout_s: float = 600.0,
        limit_per_host: int = 0,
    ) -> None:
        self._connector_args = dict(
            limit=0,
            limit_per_host=limit_per_host,
            keepalive_timeout=60,
            enable_cleanup_closed=False,
        )
        self.timeout = aiohttp.ClientTimeout(total=total_timeout_s, sock_connect=connect_timeout_s)
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> aiohttp.ClientSession:
        if self.session is None:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(**self._connector_args),  # type: ignore[arg-type]
                timeout=self.timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def open(self, endpoint: Endpoint, path: str, body: bytes) -> aiohttp.ClientResponse:
        """Send the request; return the response once its status line is in.

        Raises `UpstreamAttemptFailed` if it fails before that or answers a retriable status
        (429/5xx). Other statuses (a 400 from the engine) are returned for the caller to relay.
        """
        assert self.session is not None, "Dispatcher.start() not called"
        headers = {"Content-Type": "application/json"}
        if endpoint.spec.api_key:
            headers["Authorization"] = f"Bearer {endpoint.spec.api_key}"
        with _translate(endpoint):
            resp = await self.session.post(f"{endpoint.url}{path}", data=body, headers=headers)
            if resp.status in RETRIABLE_STATUS:
                try:
                    data = await resp.read()
                finally:
                    resp.release()
                raise UpstreamAttemptFailed(
                    f"answered HTTP {resp.status}",
                    upstream=endpoint.name,
                    reason=f"http_{resp.status}",
                    status=resp.status,
                    body=data[:2000],
                )
        return resp

    @staticmethod
    def passthrough_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
        return {k: v for k, v in resp.headers.items() if k.lower() not in _HOP_HEADERS}

    @staticmethod
    async def read_all(endpoint: Endpoint, resp: aiohttp.ClientResponse) -> bytes:
        """The whole (non-streaming) body; a failure here is after the first byte."""
        try:
            with _translate(endpoint):
                return await resp.read()
        finally:
            resp.release()

    @staticmethod
    async def relay(
        endpoint: Endpoint, resp: aiohttp.ClientResponse, stats: StreamStats
    ) -> AsyncGenerator[bytes, None]:
        """Yield upstream chunks as they arrive, recording timings and the usage line.

        Raises `UpstreamError` if the upstream fails mid-stream.
        """
        done = False
        try:
            with _translate(endpoint):
                async for chunk in resp.content.iter_any():
                    stats.observe(chunk, time.perf_counter())
                    yield chunk
                done = True
        finally:
            if done:
                resp.release()  # fully read: the connection goes back to the pool
            else:
                resp.close()  # cut short (client gone, error): drop it so the engine aborts
