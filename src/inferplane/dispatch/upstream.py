"""dispatch: call the chosen endpoint over pooled keep-alive connections and relay its answer.

Upstream client exceptions are translated to `UpstreamError` at one boundary (`_translate`);
``UpstreamAttemptFailed`` marks a failure *before the first byte*, which the pipeline may answer by
re-placing the request elsewhere. After the first byte a failure can only end the stream.

Per endpoint, the dispatcher joins the API path to the endpoint's URL (`Endpoint.api_url`: a base
path such as ``/openai/v1`` is kept, its ``/v1`` not repeated), sends the endpoint's key in its
dialect's header (from `dispatch.credentials`, never from the fleet model), renames the model to
its upstream name, and for an ``anthropic`` endpoint translates the request, the answer, the
stream and the errors (`dispatch.anthropic`). An upstream request carries the gateway's headers
only (the key, the content type, the trace context), none of the client's; of the answer's
headers the client sees only what `inferplane.upstream_headers` passes. An answer the gateway
cannot read (not JSON, an error in an unknown shape, a stream that is not SSE of the dialect) is
a 502 naming the endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Final

import aiohttp
import orjson

from inferplane.dispatch import anthropic, eager
from inferplane.dispatch.answer import (
    CLIENT_FAULT_TYPES,
    OpenAIEvents,
    StreamStats,
    UpstreamAttemptFailed,
    excerpt,
)
from inferplane.dispatch.credentials import auth_headers, redact, redact_cut
from inferplane.errors import (
    AuthenticationError,
    InvalidRequestError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitError,
    UpstreamError,
    UpstreamErrorEvent,
)
from inferplane.fleet.model import Endpoint
from inferplane.lograte import LogLimiter
from inferplane.looplag import MAX_STRETCH, LoopLag
from inferplane.upstream_headers import ResponseHeaderRule

log = logging.getLogger("inferplane.dispatch")

# 529: Anthropic's "overloaded"
RETRIABLE_STATUS = frozenset({429, 500, 502, 503, 504, 529})
#: the upstream refused the gateway's own credentials: not the client's fault, try elsewhere
CREDENTIAL_STATUS = frozenset({401, 403})


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


EMBEDDINGS_PATH = "/v1/embeddings"
SALTED_ENGINES = frozenset({"vllm", "sglang"})
"""Engines whose OpenAI-compatible server accepts a per-request ``cache_salt`` (vLLM; SGLang
since sgl-project/sglang#10317) and isolates its prefix cache by it."""


def with_cache_salt(body: bytes, salt: str) -> bytes:
    """``body`` (a JSON object) with ``"cache_salt": salt``, replacing the client's own (the
    salt already folds it in). Without one it is spliced in before the closing brace: no
    re-serialisation on the request path."""
    if b'"cache_salt"' not in body:
        end = body.rstrip()
        if end.endswith(b"}") and end[:-1].rstrip()[-1:] != b"{":
            return end[:-1] + b',"cache_salt":"' + salt.encode() + b'"}'
    obj = orjson.loads(body)
    obj["cache_salt"] = salt
    return orjson.dumps(obj)


class _translate:
    """Map aiohttp/asyncio exceptions to the gateway's error tree. (A class, not a generator:
    the request path enters three a request.)"""

    __slots__ = ("endpoint",)

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            return
        name = self.endpoint.name
        if issubclass(exc_type, TimeoutError):
            raise UpstreamAttemptFailed(
                "timed out before answering", upstream=name, reason="timeout"
            ) from None
        if isinstance(exc, aiohttp.ClientConnectorError):
            raise UpstreamAttemptFailed(
                f"cannot connect ({exc.os_error.strerror or exc.os_error})",
                upstream=name,
                reason="connect",
            ) from None
        if issubclass(exc_type, (aiohttp.ClientError, ConnectionError)):
            raise UpstreamAttemptFailed(
                f"connection failed ({exc_type.__name__})", upstream=name, reason="connection"
            ) from None


LAG_STRETCH = MAX_STRETCH
"""Without ``max_s``, a first-byte deadline never stretches past this × its own length (the
default of ``gateway.first_byte_timeout.max_stretch``, which the gateway passes)."""


class _first_byte_deadline:
    """Raise `UpstreamAttemptFailed` (reason ``first_byte_timeout``) when the block takes longer
    than ``seconds`` (None: no limit beyond the session's) of the gateway's *running* time: with
    ``lag``, time the gateway's own event loop lost (the process descheduled on a loaded host)
    does not count against the endpoint (`inferplane.looplag`) — but the block never takes more
    than ``max_s`` of wall time (``gateway.first_byte_timeout.max_stretch``): a loop that is
    merely busy looks late too, and a hung engine must still be timed out under load (without
    ``max_s``: `LAG_STRETCH` × ``seconds``). A timeout that is not this deadline's (the
    session's) leaves as it came, for `_translate` to name. (A class, not a generator: the
    request path enters two a request.)"""

    __slots__ = ("_cm", "_deadline", "_endpoint", "_seconds")

    def __init__(
        self,
        endpoint: Endpoint,
        seconds: float | None,
        lag: LoopLag | None = None,
        max_s: float | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._seconds = seconds
        self._cm: contextlib.AbstractAsyncContextManager[asyncio.Timeout] | None = None
        if seconds is not None:
            if max_s is None:
                max_s = LAG_STRETCH * seconds
            self._cm = (
                asyncio.timeout(min(seconds, max_s)) if lag is None
                else lag.deadline(seconds, max_s)
            )

    async def __aenter__(self) -> None:
        if self._cm is not None:
            self._deadline = await self._cm.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        cm = self._cm
        if cm is None:
            return
        try:
            await cm.__aexit__(exc_type, exc, tb)  # an expired deadline: TimeoutError
        except TimeoutError:
            self._expired()
            raise
        if exc_type is not None and issubclass(exc_type, TimeoutError):
            self._expired()

    def _expired(self) -> None:
        """A TimeoutError leaves the block: this deadline's becomes `UpstreamAttemptFailed`."""
        if self._deadline.expired():
            raise UpstreamAttemptFailed(
                f"sent no first byte within {self._seconds:.3g} s (first-byte timeout)",
                upstream=self._endpoint.name,
                reason="first_byte_timeout",
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

    #: a partial event longer than this is passed on unfiltered (a usage chunk is small)
    MAX_CARRY = 1 << 20

    def feed(self, chunk: bytes) -> bytes:
        data = self._carry + chunk if self._carry else chunk
        cut = data.rfind(b"\n\n")
        if cut < 0:
            if len(data) > self.MAX_CARRY:  # not a usage chunk: never held without bound
                self._carry = b""
                return data
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


@dataclass(frozen=True, slots=True)
class Opened:
    """An upstream answer whose status line is in; for a stream, also its first chunk and when
    it arrived (`Dispatcher.first_chunk`), which `Dispatcher.relay` sends first."""

    response: aiohttp.ClientResponse
    first: tuple[bytes, float] | None = None


DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
"""``gateway.max_upstream_body_bytes``: the largest non-streamed answer read (`read_body`)."""
ERROR_BODY_BYTES = 64 * 1024
"""What is read of a retriable or refused answer (429/5xx, 401/403): its first 2000 bytes are
kept for the record; the rest is not read, and the connection is closed."""


async def read_body(
    endpoint: Endpoint, resp: aiohttp.ClientResponse, limit: int, setting: str | None = None
) -> bytes:
    """The response body, at most ``limit`` bytes: a longer one (by its Content-Length, or as
    it arrives) raises `UpstreamError` naming the limit (``setting``), or with no ``setting``
    is cut at ``limit``. The caller releases the response (a body not read to its end closes
    the connection)."""
    length = resp.content_length
    if setting is not None and length is not None and length > limit:
        raise _too_large(endpoint, f"{length} bytes", limit, setting)
    parts: list[bytes] = []
    size = 0
    while chunk := await resp.content.read(min(1 << 20, limit + 1 - size)):
        parts.append(chunk)
        size += len(chunk)
        if size > limit:
            if setting is not None:
                raise _too_large(endpoint, f"more than {limit} bytes", limit, setting)
            return b"".join(parts)[:limit]
    return b"".join(parts)


def _too_large(endpoint: Endpoint, size: str, limit: int, setting: str) -> UpstreamError:
    return UpstreamError(
        f"answered with a body of {size}, over the limit of {limit} bytes ({setting})",
        upstream=endpoint.name,
    )


class Dispatcher:
    """Pooled upstream client shared by all requests of one gateway.

    ``streams`` is how many streams `relay` is relaying now and ``holds`` how many times it has
    held one (``gateway.stream_coalesce_ms``): plain ints of this gateway's dispatcher, read
    when ``/metrics`` is (the gauge ``inferplane_streams_relayed``, the counter
    ``inferplane_stream_coalesce_holds_total``)."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 2.0,
        total_timeout_s: float = 600.0,
        limit_per_host: int = 0,
        credentials: Mapping[str, str] | None = None,
        lag: LoopLag | None = None,
        response_headers: Iterable[str] = (),
        stream_idle_s: float | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        self._credentials = dict(credentials or {})
        self.stream_idle_s = stream_idle_s  # gateway.stream_idle_timeout_s
        self.max_body_bytes = max_body_bytes  # gateway.max_upstream_body_bytes
        # which upstream response headers a client sees (gateway.upstream_response_headers)
        self.passed = ResponseHeaderRule(response_headers)
        self.lag = lag  # first-byte deadlines count the gateway's running time only
        self._headers: dict[str, dict[str, str]] = {}
        self._connector_args = dict(
            limit=0,
            limit_per_host=limit_per_host,
            keepalive_timeout=60,
            enable_cleanup_closed=False,
        )
        self.timeout = aiohttp.ClientTimeout(total=total_timeout_s, sock_connect=connect_timeout_s)
        self.session: aiohttp.ClientSession | None = None
        self.streams = 0  # streams being relayed now (`relay`)
        self.holds = 0  # times `relay` held a stream's bytes (coalescing), since start
        # an engine that ends its streams without [DONE]: one line per endpoint per interval
        self.nodone_log = LogLimiter(log)

    async def start(self) -> aiohttp.ClientSession:
        if self.session is None:
            # on Python 3.11, a request's bytes go out when it is handed over, not after the
            # rest of a burst's pre-send work (3.12 does this itself)
            eager.install()
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(**self._connector_args),  # type: ignore[arg-type]
                timeout=self.timeout,
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
                # one session carries every tenant's requests, scrapes and probes: an
                # upstream's Set-Cookie is not kept and sent back (to anyone), and no jar is
                # filtered on each request (tests/test_upstream_cookies.py)
                cookie_jar=aiohttp.DummyCookieJar(),
                # aiohttp asks for gzip by default; the gateway reads what it relays (and its
                # scrapes) undecoded, so it asks for none: an engine or a proxy that compresses
                # would otherwise answer bytes the gateway cannot read (and spend CPU on them)
                headers={"Accept-Encoding": "identity"},
            )
        return self.session

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    def set_credentials(self, credentials: Mapping[str, str]) -> None:
        """The endpoints' keys after a fleet reload (cached request headers are rebuilt)."""
        self._credentials = dict(credentials)
        self._headers = {}

    def redact(self, endpoint: Endpoint, data: bytes) -> bytes:
        """``data`` without the endpoint's key (`dispatch.credentials.redact`)."""
        return redact(data, self._credentials.get(endpoint.name))

    def _scrub(self, endpoint: Endpoint, exc: UpstreamError) -> None:
        """Take the endpoint's key out of an error whose message quotes the upstream."""
        text = redact_cut(exc.message, self._credentials.get(endpoint.name))
        if text != exc.message:
            exc.message = text
            exc.args = (text,)

    def auth_headers(self, endpoint: Endpoint) -> dict[str, str]:
        """The headers that carry the endpoint's key in its dialect (empty without a key)."""
        return auth_headers(endpoint.dialect, self._credentials.get(endpoint.name))

    def _request_headers(self, endpoint: Endpoint) -> dict[str, str]:
        headers = self._headers.get(endpoint.name)
        if headers is None:
            headers = {"Content-Type": "application/json", **self.auth_headers(endpoint)}
            self._headers[endpoint.name] = headers
        return headers

    @staticmethod
    def upstream_request(
        endpoint: Endpoint,
        path: str,
        body: bytes,
        max_tokens: int = 4096,
        cache_salt: str | None = None,
    ) -> tuple[str, bytes]:
        """The URL and body sent to ``endpoint`` for an OpenAI API path and body: the model
        renamed to its upstream name, the request's ``cache_salt`` for an engine that isolates
        its prefix cache with one (`placement.isolation`), and for an ``anthropic`` endpoint the
        chat request as a Messages request (``max_tokens`` when the body names none). Raises
        `InvalidRequestError` for what the dialect cannot carry."""
        if endpoint.dialect == "anthropic":
            obj = orjson.loads(body)
            req = anthropic.to_messages_request(
                obj, model=endpoint.upstream_model(obj["model"]), default_max_tokens=max_tokens
            )
            return endpoint.api_url("/v1/messages"), orjson.dumps(req)
        if endpoint.renames_models:
            obj = orjson.loads(body)
            upstream = endpoint.upstream_model(obj["model"])
            if upstream != obj["model"]:
                obj["model"] = upstream
                body = orjson.dumps(obj)
        if cache_salt and endpoint.spec.engine in SALTED_ENGINES and path != EMBEDDINGS_PATH:
            body = with_cache_salt(body, cache_salt)
        return endpoint.api_url(path), body

    async def open(
        self,
        endpoint: Endpoint,
        path: str,
        body: bytes,
        *,
        max_tokens: int = 4096,
        first_byte_s: float | None = None,
        first_byte_max_s: float | None = None,
        cache_salt: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> aiohttp.ClientResponse:
        """Send the request; return the response once its status line is in.

        Raises `UpstreamAttemptFailed` if it fails before that, answers a retriable status
        (429/5xx, with the ``Retry-After`` it gave) or refuses the gateway's credentials
        (401/403); with reason ``first_byte_timeout`` when the status line took longer than
        ``first_byte_s`` of running time (``first_byte_max_s`` of wall time). Other statuses
        (a 400 from the engine) are returned for the caller to relay.
        """
        assert self.session is not None, "Dispatcher.start() not called"
        url, data = self.upstream_request(endpoint, path, body, max_tokens, cache_salt)
        sent = self._request_headers(endpoint)
        if headers:  # per request (the trace context): added to the endpoint's own
            sent = {**sent, **headers}
        with _translate(endpoint):
            async with _first_byte_deadline(endpoint, first_byte_s, self.lag, first_byte_max_s):
                resp = await self.session.post(url, data=data, headers=sent)
            if resp.status in RETRIABLE_STATUS or resp.status in CREDENTIAL_STATUS:
                try:
                    answer = await read_body(endpoint, resp, ERROR_BODY_BYTES)
                finally:
                    resp.release()
                if resp.status in CREDENTIAL_STATUS:
                    raise UpstreamAttemptFailed(
                        f"refused the gateway's credentials for it (HTTP {resp.status})",
                        upstream=endpoint.name,
                        reason="credentials",
                        status=resp.status,
                        body=self.redact(endpoint, answer)[:2000],
                    )
                retry_after = None
                if resp.status in (429, 503, 529):
                    retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                raise UpstreamAttemptFailed(
                    f"answered HTTP {resp.status}"
                    + (f" (Retry-After {retry_after:g} s)" if retry_after is not None else ""),
                    upstream=endpoint.name,
                    reason=f"http_{resp.status}",
                    status=resp.status,
                    body=self.redact(endpoint, answer)[:2000],
                    retry_after_s=retry_after,
                )
        return resp

    @staticmethod
    async def first_chunk(
        endpoint: Endpoint,
        resp: aiohttp.ClientResponse,
        first_byte_s: float | None,
        lag: LoopLag | None = None,
        max_s: float | None = None,
    ) -> tuple[bytes, float]:
        """Wait for a stream's first chunk (with the first-byte deadline) and return it with
        its arrival time, for `relay` to send first. Raises `UpstreamAttemptFailed` (the client
        has received nothing yet) and closes the response on any failure."""
        try:
            with _translate(endpoint):
                async with _first_byte_deadline(endpoint, first_byte_s, lag, max_s):
                    chunk = await resp.content.readany()
        except BaseException:
            resp.close()
            raise
        return chunk, time.perf_counter()

    def passthrough_headers(self, resp: aiohttp.ClientResponse) -> dict[str, str]:
        """The upstream's response headers that the client sees (`inferplane.upstream_headers`:
        content type, request id and ``gateway.upstream_response_headers``; never cookies,
        account ids, the provider key's rate-limit state or the gateway's own names)."""
        return self.passed(resp.headers)

    async def read_all(self, endpoint: Endpoint, resp: aiohttp.ClientResponse) -> bytes:
        """The whole (non-streaming) body in the OpenAI dialect; a failure here is after the
        first byte. Raises `UpstreamError` naming the endpoint when the answer cannot be read:
        not JSON (a 2xx), an error in an unknown shape (4xx), not the endpoint's dialect, or
        longer than `max_body_bytes` (``gateway.max_upstream_body_bytes``; not read on). An
        error answer, and the message of an error that quotes it, never carries the
        endpoint's key (`redact`)."""
        try:
            with _translate(endpoint):
                data = await read_body(endpoint, resp, self.max_body_bytes,
                                       "gateway.max_upstream_body_bytes")
        finally:
            resp.release()
        ok = 200 <= resp.status < 300
        if not ok:  # before any of it is quoted: an excerpt could cut a key in two
            data = self.redact(endpoint, data)
        try:
            return self._openai_answer(endpoint, resp, data, ok)
        except UpstreamError as exc:
            self._scrub(endpoint, exc)
            raise

    @staticmethod
    def _openai_answer(
        endpoint: Endpoint, resp: aiohttp.ClientResponse, data: bytes, ok: bool
    ) -> bytes:
        """`read_all`'s body in the OpenAI dialect (see there)."""
        if endpoint.dialect == "anthropic":
            try:
                obj = (
                    anthropic.to_chat_completion(data) if ok else anthropic.to_openai_error(data)
                )
            except anthropic.MessagesFormatError as exc:
                raise UpstreamError(
                    f"{exc} (HTTP {resp.status}): {excerpt(data)}", upstream=endpoint.name
                ) from None
            return orjson.dumps(obj)
        if ok:
            if data[:64].lstrip()[:1] != b"{":  # no copy of a large body
                raise UpstreamError(
                    f"answered HTTP {resp.status} with a body that is not JSON: {excerpt(data)}",
                    upstream=endpoint.name,
                )
        else:
            error = openai_error_body(data, resp.status)
            if error is None:
                raise UpstreamError(
                    f"answered HTTP {resp.status} with an error in an unknown format: "
                    f"{excerpt(data)}",
                    upstream=endpoint.name,
                )
            return error
        return data

    async def relay(
        self,
        endpoint: Endpoint,
        resp: aiohttp.ClientResponse,
        stats: StreamStats,
        first: tuple[bytes, float] | None = None,
        *,
        coalesce_s: float,
        min_streams: int,
    ) -> AsyncGenerator[bytes, None]:
        """Yield upstream chunks as they arrive (translated to OpenAI SSE for an ``anthropic``
        endpoint), recording timings and the usage line; ``first`` is a chunk `first_chunk`
        already read, with its arrival time. The first chunk is yielded at once, as ``b""``
        where its translation is empty (a partial event, a comment), so that the caller can
        send the response's head without waiting for the upstream's next read.

        With ``coalesce_s`` (``gateway.stream_coalesce_ms``) the tokens after the first are
        relayed in groups: after each chunk handed on, once a chunk with generated text has gone
        out and until one carries a ``finish_reason``, the upstream connection's reading is
        paused until ``coalesce_s`` after it, so what the engine sends meanwhile waits in the
        socket's buffer (on a plain-TCP upstream; TLS reads ahead) and arrives as one read,
        relayed as one write — one wake-up of the gateway for several events instead of one
        each. Nothing before the first text (a chat stream's role-only opening chunk) and
        nothing after the finish reason (the usage chunk, ``[DONE]``) is held: the time to first
        token and the end of the stream are unchanged; the tokens between reach the client in
        groups, each at most ``coalesce_s`` later than it would have.

        A hold happens only while this dispatcher relays at least ``min_streams`` streams
        (``gateway.stream_coalesce_min_streams``). ``streams`` counts each relay from its first
        ``__anext__`` (the gateway starts relaying once `first_chunk` has read the engine's first
        chunk) to its end, however it ends. With fewer streams, each chunk is relayed as it
        arrives, as without ``coalesce_s`` (with ``min_streams`` above 1, a lone stream's pacing
        is unchanged). Each hold that pauses the connection adds one to ``holds``.

        Raises `UpstreamError` if the upstream fails mid-stream (naming how: the connection
        broke, ``gateway.upstream_timeout_s`` passed), sends an error event or something that is
        not its dialect's SSE (an OpenAI-dialect ``data:`` line that is not JSON), ends without
        its dialect's end (``data: [DONE]``, or at least a finish reason, which the gateway then
        closes with its own ``[DONE]``; a Messages stream's ``message_stop``), or sends no
        event for ``stream_idle_s`` (``gateway.stream_idle_timeout_s``: `_IdleWatch`).
        """
        done = False
        translator = (
            anthropic.StreamTranslator(include_usage=True)
            if endpoint.dialect == "anthropic"
            else None
        )
        events = OpenAIEvents() if translator is None else None
        idle = _IdleWatch(self.stream_idle_s) if self.stream_idle_s else None
        self.streams += 1
        try:
            with _midstream(endpoint, stats, self.timeout.total, idle), _stream_errors(endpoint):
                pending = first if first is not None and first[0] else None
                handed = None  # when the last chunk was handed on (coalescing)
                ended = False  # a finish reason went out (coalescing stops)
                opened = False  # something was yielded
                while True:
                    if pending is not None:
                        (raw, now), pending = pending, None
                    else:
                        if idle is not None:
                            idle.reading = True
                        if (handed is not None and self.streams >= min_streams
                                and await _hold(resp, handed + coalesce_s)):
                            self.holds += 1
                        raw = await resp.content.readany()  # what iter_any() does
                        if idle is not None:
                            idle.reading = False
                        if not raw:
                            break
                        now = time.perf_counter()
                    if idle is not None and b"data:" in raw:
                        # the upstream's own events, before translation: a Messages stream's
                        # thinking, signature and ping events count though they translate to
                        # nothing
                        idle.heard()
                    if translator is not None:
                        chunk = translator.feed(raw)
                        if not chunk:
                            if not opened:  # the caller's first write sends the head
                                opened = True
                                yield b""
                            continue
                    else:
                        chunk = raw
                        assert events is not None
                        if (problem := events.feed(chunk)) is not None:
                            # the upstream's own error event: what came before it in this
                            # read goes out, the event becomes the gateway's (`forward`)
                            if events.error is not None and (before := chunk[: events.error_at]):
                                stats.observe(before, now)
                                opened = True
                                yield before
                            raise events.failure(problem, endpoint.name, stats.tokens)
                    stats.observe(chunk, now)
                    opened = True
                    yield chunk
                    if coalesce_s > 0:
                        # hold from the first text on, not after the finish (_FINISH)
                        ended = ended or _FINISH.search(chunk) is not None
                        handed = None if ended or not stats.tokens else time.perf_counter()
                if translator is not None:
                    translator.close()
                elif events is not None:
                    if (problem := events.close()) is not None:
                        raise UpstreamError(
                            f"{problem} after {stats.tokens} tokens", upstream=endpoint.name
                        )
                    if not events.done:  # complete (a finish reason came), only no [DONE]
                        self.nodone_log.warn(
                            endpoint.name,
                            "upstream %s ends its streams without data: [DONE] after the "
                            "finish reason (older TGI, llama.cpp forks); taken as complete, "
                            "the gateway sends the [DONE]", endpoint.name,
                        )
                        yield b"data: [DONE]\n\n"
                done = True
        except UpstreamError as exc:  # an error event's message, relayed to the client
            self._scrub(endpoint, exc)
            raise
        finally:
            self.streams -= 1
            if idle is not None:
                idle.close()
            if done:
                resp.release()  # fully read: the connection goes back to the pool
            else:
                resp.close()  # cut short (client gone, error): drop it so the engine aborts


class _IdleWatch:
    """``gateway.stream_idle_timeout_s`` for one relayed stream: when the upstream has sent no
    event (a read with a ``data:`` line, counted in the upstream's own bytes, before any
    translation) for ``limit`` seconds while the relay waits on it, the relaying task is
    cancelled and `relay` raises `UpstreamError` instead (`_midstream`).

    The clock starts at the first ``data:`` event, not at the first byte: a provider that sends
    only comments while the model works (OpenRouter's ``: OPENROUTER PROCESSING``) is waited
    for under ``gateway.upstream_timeout_s``, as before the first event.

    One timer per stream, re-armed lazily (a chunk only stores the time, ``heard``): the
    timer fires at most once per ``limit`` while the stream lasts. Time the relay spends out of
    its read (the caller writing to a slow client) does not count: the watch checks
    ``reading``, which the relay sets around its read."""

    __slots__ = ("_base", "_handle", "_loop", "_off", "_task", "fired", "limit", "reading",
                 "since")

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        # the cancellations already pending on the task, which are not this watch's (as
        # asyncio.timeout records them)
        self._base = task.cancelling()
        self.since = self._loop.time()
        self.reading = False
        self.fired = False
        self._off = False
        self._handle: asyncio.TimerHandle | None = None  # armed by the first event

    def heard(self) -> None:
        self.since = self._loop.time()
        if self._handle is None and not self.fired and not self._off:
            self._handle = self._loop.call_at(self.since + self.limit, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if not self.reading:  # the caller is busy with the client: look again later
            self._handle = self._loop.call_at(max(now, self.since) + self.limit, self._check)
        elif now - self.since >= self.limit:
            self._handle = None
            self.fired = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(self.since + self.limit, self._check)

    def stalled(self) -> bool:
        """After a `CancelledError` in the relay: whether it was this watch's (then the
        cancellation is taken back), not the client's."""
        return self.fired and self._task.uncancel() <= self._base

    def close(self) -> None:
        self._off = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


@contextlib.contextmanager
def _midstream(
    endpoint: Endpoint, stats: StreamStats, total_s: float | None, idle: _IdleWatch | None
) -> Iterator[None]:
    """Map what can break a stream after its first byte to `UpstreamError`, saying what
    happened and how far the answer had come (not "connection failed": it had succeeded)."""
    try:
        yield
    except asyncio.CancelledError:
        if idle is not None and idle.stalled():
            raise UpstreamError(
                f"sent no stream event for {idle.limit:g} s mid-stream after {stats.tokens} "
                "tokens (gateway.stream_idle_timeout_s)",
                upstream=endpoint.name,
            ) from None
        raise
    except TimeoutError:
        raise UpstreamError(
            f"the stream was still running after {total_s:g} s (gateway.upstream_timeout_s) "
            f"after {stats.tokens} tokens",
            upstream=endpoint.name,
        ) from None
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        raise UpstreamError(
            f"the connection broke mid-stream after {stats.tokens} tokens: the engine closed "
            "it before the end of its answer",
            upstream=endpoint.name,
        ) from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise UpstreamError(
            f"the connection broke mid-stream after {stats.tokens} tokens "
            f"({type(exc).__name__}: {exc})",
            upstream=endpoint.name,
        ) from None


_FINISH = re.compile(rb'"finish_reason"\s*:\s*"')
"""A choice's finish reason (a string: not ``null``) in an OpenAI SSE chunk: the stream's last
token went out; what follows (the usage chunk, ``[DONE]``) is not held (`Dispatcher.relay`)."""


async def _hold(resp: aiohttp.ClientResponse, until: float) -> bool:
    """Leave the upstream's bytes in its socket until ``until`` (perf_counter seconds): its
    transport stops reading meanwhile. Returns False at once when the time has passed or the
    upstream has already ended its answer (nothing more to gather), True after a hold."""
    wait = until - time.perf_counter()
    if wait <= 0 or resp.content.is_eof():
        return False
    conn = resp.connection
    transport = conn.transport if conn is not None else None
    if transport is None or transport.is_closing():
        return False
    transport.pause_reading()
    try:
        await asyncio.sleep(wait)
    finally:
        if not transport.is_closing():
            transport.resume_reading()
    return True


@contextlib.contextmanager
def _stream_errors(endpoint: Endpoint) -> Iterator[None]:
    """Map a dialect stream's error event or malformed event to `UpstreamError`."""
    try:
        yield
    except anthropic.MessagesStreamError as exc:
        raise UpstreamErrorEvent(
            f"stream error: {exc}", upstream=endpoint.name,
            client_fault=exc.error_type in CLIENT_FAULT_TYPES,
        ) from None
    except anthropic.MessagesFormatError as exc:
        raise UpstreamError(str(exc), upstream=endpoint.name) from None


_OPENAI_TYPE = re.compile(r"[a-z][a-z0-9_]*")
"""An error ``type`` as OpenAI writes them (``invalid_request_error``); vLLM and SGLang send
their exception's class name (``BadRequestError``), which `openai_error_body` replaces."""

_STATUS_TYPES: Final = {
    e.status: e.error_type
    for e in (AuthenticationError, PermissionDeniedError, NotFoundError, RateLimitError)
}
"""The ``type`` of an engine's error by its status where the engine's own is not OpenAI's:
the gateway's own error's for these statuses; any other 4xx is an `InvalidRequestError`'s, a
5xx an `UpstreamError`'s."""


def openai_error_body(data: bytes, status: int) -> bytes | None:
    """An OpenAI-compatible server's error body in OpenAI's shape ``{"error": {"message",
    "type", "param", "code"}}`` with the server's message. A body ``{"error": {"message": str,
    ...}}`` keeps every key it has (a provider's own: Azure's ``innererror``, OpenRouter's
    ``metadata``, siblings of ``error``) and only ``type`` (when it is not a string in OpenAI's
    style: vLLM's and SGLang's ``BadRequestError``, Azure's null; then from the status),
    ``param`` and ``code`` (when they are not strings or null: vLLM's ``code: 400``; then
    null: OpenAI's typed clients read a string) are rewritten; when none needs it the body is
    returned as is, byte for byte. Other shapes are rebuilt: vLLM's older flat ``{"object":
    "error", "message", ...}``, ``{"error": "text"}``, FastAPI's ``{"detail": ...}``; None
    when it is in none of them."""
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    err = obj.get("error")
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        fields = _openai_fields(err, status)
        if all(err.get(k) == v for k, v in fields.items()):
            return data  # OpenAI's own (or as good): not serialised again
        return orjson.dumps({**obj, "error": {**err, **fields}})
    if isinstance(err, str):
        source = {"message": err}
    elif obj.get("object") == "error" and isinstance(obj.get("message"), str):
        source = obj
    elif "detail" in obj:
        detail = obj["detail"]
        source = {"message": detail if isinstance(detail, str) else orjson.dumps(detail).decode()}
    else:
        return None
    return orjson.dumps({"error": {"message": source["message"], **_openai_fields(source, status)}})


def _openai_fields(error: Mapping[str, object], status: int) -> dict[str, str | None]:
    """An error's ``type`` (its own where in OpenAI's style, else by `status`), ``param`` and
    ``code`` (each its own where a string, else null)."""
    kind, param, code = error.get("type"), error.get("param"), error.get("code")
    return {
        "type": kind if isinstance(kind, str) and _OPENAI_TYPE.fullmatch(kind) else (
            _status_type(status)),
        "param": param if isinstance(param, str) else None,
        "code": code if isinstance(code, str) else None,
    }


def _status_type(status: int) -> str:
    """The ``type`` of an engine's error whose own is not OpenAI's, by its status."""
    return _STATUS_TYPES.get(status) or (
        InvalidRequestError if 400 <= status < 500 else UpstreamError).error_type
