"""OTLP output without the OpenTelemetry SDK's per-span objects: finished spans as plain tuples,
encoded in batches straight to the protobuf wire format of ``ExportTraceServiceRequest``
(opentelemetry-proto's ``trace.proto``); GenAI histograms aggregated in plain lists and encoded
the same way (``metrics.proto``); both sent over OTLP/HTTP or OTLP/gRPC.

Why by hand: the SDK spends ≈ 0.3 ms creating and ending a request's four spans and ≈ 0.45 ms
encoding them (docs/benchmarks.md, "OpenTelemetry CPU overhead"), more than the gateway spends on
the request itself. The wire format is small and stable: a span is a handful of tagged fields,
and an attribute with a low-cardinality value (a model, a pool, an endpoint) is the same bytes
every time, so it is encoded once and reused. ``tests/test_otel_encoding.py`` checks that every
batch parses as ``ExportTraceServiceRequest`` equal to what the SDK's own encoder makes of the
same spans.

Field numbers (``opentelemetry/proto/trace/v1/trace.proto``): ExportTraceServiceRequest
{1 resource_spans}; ResourceSpans {1 resource, 2 scope_spans}; ScopeSpans {1 scope, 2 spans};
Span {1 trace_id, 2 span_id, 3 trace_state, 4 parent_span_id, 5 name, 6 kind, 7 start (fixed64),
8 end (fixed64), 9 attributes, 15 status, 16 flags (fixed32)}; Status {2 message, 3 code};
KeyValue {1 key, 2 value}; AnyValue {1 string, 2 bool, 3 int, 4 double}.
"""

from __future__ import annotations

import bisect
import http.client
import logging
import math
import struct
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar, NamedTuple
from urllib.parse import urlsplit

log = logging.getLogger("inferplane.telemetry")

SPAN_KIND = {"internal": 1, "server": 2, "client": 3}
STATUS_ERROR = 2
FLAGS_HAS_IS_REMOTE = 0x100
FLAGS_IS_REMOTE = 0x200
MASK64 = (1 << 64) - 1

_pack_q = struct.Struct("<Q").pack
_pack_d = struct.Struct("<d").pack
_pack_i = struct.Struct("<I").pack


def _varint_slow(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_VARINTS = [_varint_slow(i) for i in range(1 << 14)]


def varint(n: int) -> bytes:
    return _VARINTS[n] if n < 16384 else _varint_slow(n)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, length, payload."""
    return tag + varint(len(payload)) + payload


class Attrs:
    """A fixed group of span attributes, encoded once (the attributes an endpoint's attempt spans
    all carry, say): ``pairs`` for SDK exporters, ``data`` the same as span field 9 bytes."""

    __slots__ = ("data", "pairs")

    def __init__(self, pairs: Sequence[tuple[str, Any]]) -> None:
        self.pairs = tuple(pairs)
        self.data = b"".join(attribute(k, v) for k, v in self.pairs)


NO_ATTRS = Attrs(())


class SpanData(NamedTuple):
    """One finished span, as the batcher encodes it (and `to_readable` hands to SDK
    exporters). Its attributes are ``fixed`` (pre-encoded) followed by ``attributes``."""

    trace_id: int
    span_id: int
    parent_id: int  # 0: a root span
    parent_remote: bool
    trace_state: str  # "k=v,k2=v2" or ""
    name: str
    kind: int  # SPAN_KIND
    start_ns: int
    end_ns: int
    fixed: tuple[Attrs, ...]
    attributes: Sequence[tuple[str, Any]]
    error: bool  # status ERROR
    message: str | None  # the status description (errors only)


def any_value(value: Any) -> bytes:
    """An ``AnyValue`` message (str, bool, int, float)."""
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + varint(value & MASK64)
    if isinstance(value, float):
        return b"\x21" + _pack_d(value)
    return _field(b"\x0a", str(value).encode())


def key_value(key: str, value: Any) -> bytes:
    """A ``KeyValue`` message."""
    return _field(b"\x0a", key.encode()) + _field(b"\x12", any_value(value))


def attribute(key: str, value: Any) -> bytes:
    """Span field 9 (one ``KeyValue``)."""
    return _field(b"\x4a", key_value(key, value))


_KEYS: dict[str, bytes] = {}


def _key(key: str) -> bytes:
    k = _KEYS.get(key)
    if k is None:
        k = _KEYS[key] = _field(b"\x0a", key.encode())
    return k


def _number(key: str, value: Any) -> bytes:
    """Span field 9 of an int or float attribute (the common dynamic ones: tokens, times)."""
    if type(value) is int:
        v = b"\x18" + varint(value & MASK64)
    elif type(value) is float:
        v = b"\x21" + _pack_d(value)
    else:
        return attribute(key, value)
    kv = _key(key) + b"\x12" + _VARINTS[len(v)] + v
    return b"\x4a" + _VARINTS[len(kv)] + kv


class SpanEncoder:
    """Encodes batches of `SpanData` for one resource and instrumentation scope. String- and
    int-valued dynamic attributes are encoded once and reused (bounded: the cache is cleared
    past `CACHE_MAX`); floats are encoded with their key's bytes cached; `unique` encodes a
    value that never repeats (an id) without caching it."""

    CACHE_MAX = 8192

    def __init__(self, resource: Mapping[str, Any], scope: str) -> None:
        attrs = b"".join(_field(b"\x0a", key_value(k, v)) for k, v in resource.items())
        self._resource = _field(b"\x0a", attrs)  # ResourceSpans.resource
        self._scope = _field(b"\x0a", _field(b"\x0a", scope.encode()))  # ScopeSpans.scope
        self._strs: dict[tuple[str, str | int], bytes] = {}
        self._names: dict[str, bytes] = {}
        self._named: dict[tuple[str, bytes], bytes] = {}
        self.memo: dict[tuple[Any, ...], tuple[bytes, bytes]] = {}
        """`records.encode_spans`' parts of a span that repeat from request to request, by what
        they are made of (bounded as the other caches; `remember` adds)."""
        self.shapes: dict[tuple[Any, ...], tuple[Any, ...]] = {}
        """`records.encode_compact`'s layouts, by the kind of request (empty: a kind it does not
        lay out; bounded as the others)."""
        self.groups: dict[int, tuple[Any, int]] = {}
        """Attribute groups' tokens in those layouts' keys, by the group's identity (the group
        held with it: `records._group`)."""
        self.typed: dict[tuple[Any, ...], int] = {}
        """Those keys' tokens, by value (`records._group`)."""
        self.tokens = 0
        """The last token given (`records._group`: never given again)."""

    def remember(self, key: tuple[Any, ...], value: tuple[bytes, bytes]) -> tuple[bytes, bytes]:
        if len(self.memo) >= self.CACHE_MAX:
            self.memo.clear()
        self.memo[key] = value
        return value

    def named(self, name: str, kind: bytes) -> bytes:
        """Span fields 5 and 6 and field 7's tag: the name (`name`) and ``kind``, a value of
        ``_KINDS`` (cached)."""
        data = self._named.get((name, kind))
        if data is None:
            if len(self._named) >= self.CACHE_MAX:
                self._named.clear()
            data = self._named[(name, kind)] = self.name(name) + kind
        return data

    def attribute(self, key: str, value: Any) -> bytes:
        """Span field 9: one attribute."""
        if type(value) is str or type(value) is int:  # not a bool (True == 1), not a float
            cached = self._strs.get((key, value))
            if cached is None:
                if len(self._strs) >= self.CACHE_MAX:
                    self._strs.clear()
                cached = self._strs[(key, value)] = attribute(key, value)
            return cached
        return _number(key, value)

    @staticmethod
    def unique(key: str, value: str) -> bytes:
        """Span field 9 of a string attribute that does not repeat (not cached)."""
        v = value.encode()
        v = b"\x0a" + varint(len(v)) + v
        kv = _key(key) + b"\x12" + varint(len(v)) + v
        return b"\x4a" + varint(len(kv)) + kv

    def span(self, s: SpanData) -> bytes:
        """One ``Span`` message."""
        name = self.name(s.name)
        attribute = self.attribute
        parts = [b"\x0a\x10", s.trace_id.to_bytes(16, "big"), b"\x12\x08",
                 s.span_id.to_bytes(8, "big")]
        if s.trace_state:
            parts.append(_field(b"\x1a", s.trace_state.encode()))
        if s.parent_id:
            parts += (b"\x22\x08", s.parent_id.to_bytes(8, "big"))
        parts += (name, _KINDS[s.kind], _pack_q(s.start_ns), b"\x41", _pack_q(s.end_ns))
        parts += [a.data for a in s.fixed]
        parts += [attribute(k, v) for k, v in s.attributes]
        if s.error:
            status = b"\x18\x02" if s.message is None else (
                _field(b"\x12", s.message.encode()) + b"\x18\x02")
            parts.append(_field(b"\x7a", status))
        else:
            parts.append(b"\x7a\x00")  # an unset status, as the SDK encodes it
        parts.append(_FLAGS_REMOTE if s.parent_remote else _FLAGS_LOCAL)
        return b"".join(parts)

    def request(self, spans: Iterable[SpanData]) -> bytes:
        """An ``ExportTraceServiceRequest`` with all ``spans`` (one resource, one scope)."""
        span = self.span
        body: list[bytes] = []
        for s in spans:
            data = span(s)
            body += (b"\x12", varint(len(data)), data)
        return self.wrap(body)

    def wrap(self, body: list[bytes]) -> bytes:
        """An ``ExportTraceServiceRequest`` of encoded ``ScopeSpans.spans`` fields (each a
        ``b"\\x12"``, the length, a ``Span``), as `request` and `records.encode_spans` make
        them.

        The message is joined once, its two enclosing lengths summed beforehand: a batch is
        ≈ 0.7 MB (512 requests), and every concatenation copied all of it into a new buffer
        (seven copies, ≈ 4 µs of the exporter's ≈ 7.4 µs per request, most in page faults on
        the fresh buffers)."""
        scope = self._scope
        scope_len = len(scope) + sum(map(len, body))  # ScopeSpans' length
        scope_head = b"\x12" + varint(scope_len)
        resource = self._resource
        return b"".join((b"\x0a", varint(len(resource) + len(scope_head) + scope_len), resource,
                         scope_head, scope, *body))

    def name(self, name: str) -> bytes:
        """Span field 5 (cached)."""
        data = self._names.get(name)
        if data is None:
            if len(self._names) >= self.CACHE_MAX:
                self._names.clear()
            data = self._names[name] = _field(b"\x2a", name.encode()) if name else b""
        return data


_KINDS = {k: b"\x30" + bytes([k]) + b"\x39" for k in SPAN_KIND.values()}  # kind, start's tag
_FLAGS_LOCAL = b"\x85\x01" + _pack_i(FLAGS_HAS_IS_REMOTE)
_FLAGS_REMOTE = b"\x85\x01" + _pack_i(FLAGS_HAS_IS_REMOTE | FLAGS_IS_REMOTE)


# -- metrics ---------------------------------------------------------------------------------
class Histogram:
    """A cumulative explicit-bucket histogram per attribute set (``key``: a tuple of
    (name, value) pairs), as OTLP's ``HistogramDataPoint`` carries it. A point's values can
    be recorded at once (`record`, `add`) or appended to its pending list (``point[5]``, one
    ``append`` on the request path) and added in bulk later (`fold`, in the batcher's thread:
    the bucket search, the counting, sum, min and max run in C)."""

    __slots__ = ("bounds", "description", "name", "points", "unit")

    def __init__(self, name: str, unit: str, description: str, bounds: Sequence[float]) -> None:
        self.name, self.unit, self.description = name, unit, description
        self.bounds = list(bounds)
        # key -> [bucket counts, count, sum, min, max, pending values]
        self.points: dict[tuple[tuple[str, Any], ...], list[Any]] = {}

    def copy(self) -> Histogram:
        """The histogram as it stands (its points copied; pending values not counted: `fold`
        them first). It iterates the points: hold the lock under which points are made
        (`OtelTelemetry.metrics_lock`)."""
        h = Histogram(self.name, self.unit, self.description, self.bounds)
        h.points = {k: [list(p[0]), p[1], p[2], p[3], p[4], []] for k, p in self.points.items()}
        return h

    def point(self, key: tuple[tuple[str, Any], ...]) -> list[Any]:
        """The point of an attribute set (created empty: an empty point is not exported)."""
        p = self.points.get(key)
        if p is None:
            p = self.points[key] = [[0] * (len(self.bounds) + 1), 0, 0.0, math.inf, -math.inf,
                                    []]
        return p

    def record(self, value: float, key: tuple[tuple[str, Any], ...]) -> None:
        add(self.point(key), self.bounds, value)

    def fold(self) -> None:
        """Add every point's pending values (`add` of each, in order, in bulk). One thread at a
        time; others may append meanwhile: what they append after the take stays pending.

        Lock-free, and sound only under the GIL (CPython's default build): the
        request path's ``pending.append`` is one atomic step, and so are ``pending[:n]`` and
        ``del pending[:n]`` here, so an append between the two lands after index n and stays
        for the next fold (nothing lost, nothing counted twice); ``list(self.points.values())``
        copies in one step too while `point` may insert. A free-threaded build (3.13t) gives
        none of this: there the appends and this take would need a lock.
        tests/test_otel_encoding.py's threaded test holds count and sum to what was appended."""
        find = partial(bisect.bisect_left, self.bounds)
        for p in list(self.points.values()):
            pending = p[5]
            n = len(pending)
            if not n:
                continue
            values = pending[:n]
            del pending[:n]  # one step each (the GIL): an append between them lands after n
            buckets = p[0]
            for i, k in Counter(map(find, values)).items():
                buckets[i] += k
            p[1] += n
            # from the sum so far: on 3.11 left to right, as `add`'s do (equal to them); on
            # 3.12+ sum() compensates float rounding (as close or closer to the exact sum)
            p[2] = sum(values, p[2])
            low, high = min(values), max(values)
            if low < p[3]:
                p[3] = low
            if high > p[4]:
                p[4] = high


def add(p: list[Any], bounds: Sequence[float], value: float) -> None:
    """Record ``value`` in a histogram's point ([bucket counts, count, sum, min, max]); bucket
    i holds (bounds[i-1], bounds[i]]."""
    p[0][bisect.bisect_left(bounds, value)] += 1
    p[1] += 1
    p[2] += value
    if value < p[3]:
        p[3] = value
    if value > p[4]:
        p[4] = value


def encode_metrics(
    resource: Mapping[str, Any], scope: str, histograms: Sequence[Histogram], start_ns: int,
    now_ns: int,
) -> bytes | None:
    """An ``ExportMetricsServiceRequest`` of every histogram with points (None: none has),
    encoded by hand as the spans are (``metrics.proto``: ResourceMetrics {1 resource, 2
    scope_metrics}; ScopeMetrics {1 scope, 2 metrics}; Metric {1 name, 2 description, 3 unit,
    9 histogram}; Histogram {1 data_points, 2 aggregation_temporality}; HistogramDataPoint
    {2 start (fixed64), 3 time (fixed64), 4 count (fixed64), 5 sum (double), 6 bucket_counts
    (packed fixed64), 7 explicit_bounds (packed double), 9 attributes, 11 min, 12 max}).
    tests/test_otel_encoding.py holds it to opentelemetry-proto's message classes."""
    times = b"\x11" + _pack_q(start_ns) + b"\x19" + _pack_q(now_ns)
    metrics: list[bytes] = []
    for h in histograms:
        head = _METRIC_HEADS.get((h.name, h.description, h.unit, *h.bounds))
        if head is None:
            head = _metric_head(h)
        name, bounds, buckets = head
        points = []
        for key, p in h.points.items():
            if not p[1]:
                continue
            cache_key = typed_key(key)
            attrs = _POINT_ATTRS.get(cache_key)
            if attrs is None:
                if len(_POINT_ATTRS) >= 4096:
                    _POINT_ATTRS.clear()
                attrs = _POINT_ATTRS[cache_key] = b"".join(
                    _field(b"\x4a", key_value(k, v)) for k, v in key)
            point = b"".join((times, b"\x21", _pack_q(p[1]), b"\x29", _pack_d(p[2]),
                              buckets(*p[0]), bounds, attrs, b"\x59", _pack_d(p[3]), b"\x61",
                              _pack_d(p[4])))
            points.append(_field(b"\x0a", point))
        if not points:
            continue
        histogram = b"".join(points) + b"\x10\x02"  # aggregation temporality: cumulative
        metrics.append(_field(b"\x12", name + _field(b"\x4a", histogram)))
    if not metrics:
        return None
    attrs = b"".join(_field(b"\x0a", key_value(k, v)) for k, v in resource.items())
    scope_metrics = _field(b"\x0a", _field(b"\x0a", scope.encode())) + b"".join(metrics)
    return _field(b"\x0a", _field(b"\x0a", attrs) + _field(b"\x12", scope_metrics))


_METRIC_HEADS: dict[tuple[Any, ...], tuple[bytes, bytes, Any]] = {}
_POINT_ATTRS: dict[tuple[tuple[Any, ...], ...], bytes] = {}  # a point's attributes, encoded


def typed_key(pairs: tuple[tuple[str, Any], ...]) -> tuple[tuple[Any, ...], ...]:
    """``pairs`` as a key for a cache of their encoding: 1, 1.0 and True are equal and hash
    alike, but encode as int, double and bool, so a pair whose value is no string carries its
    type too ((name, type, value)); string-valued pairs (the gateway's) are their own key."""
    for _, v in pairs:
        if type(v) is not str:
            return tuple([(k, type(v), v) for k, v in pairs])
    return pairs


def _metric_head(h: Histogram) -> tuple[bytes, bytes, Any]:
    """What every export of a histogram repeats (cached): its Metric name, description and
    unit fields; its points' explicit bounds field; the packer of their bucket counts field
    (``\\x32``, the length, the counts as fixed64)."""
    name = b"".join(_field(tag, text.encode()) for tag, text in (
        (b"\x0a", h.name), (b"\x12", h.description), (b"\x1a", h.unit)) if text)
    n = len(h.bounds)
    bounds = _field(b"\x3a", struct.pack(f"<{n}d", *h.bounds))
    prefix = b"\x32" + varint(8 * (n + 1))
    buckets = struct.Struct(f"<{len(prefix)}s{n + 1}Q")
    head = (name, bounds, partial(buckets.pack, prefix))
    if len(_METRIC_HEADS) >= 64:
        _METRIC_HEADS.clear()
    _METRIC_HEADS[(h.name, h.description, h.unit, *h.bounds)] = head
    return head


# -- transports ------------------------------------------------------------------------------
class ExportError(Exception):
    """One export failed; ``retry`` says whether trying again may help."""

    def __init__(self, message: str, retry: bool) -> None:
        super().__init__(message)
        self.retry = retry


class HttpSender:
    """OTLP/HTTP with protobuf bodies (``POST {endpoint}/v1/traces`` and ``/v1/metrics``) on one
    kept-alive connection, reopened after an error."""

    RETRY_STATUS = frozenset({429, 502, 503, 504})

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout_s: float) -> None:
        parts = urlsplit(endpoint.rstrip("/"))
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.https else 80)
        self.base = parts.path
        self.headers = {**headers, "Content-Type": "application/x-protobuf"}
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self._conn = cls(self.host, self.port, timeout=self.timeout_s)
        return self._conn

    def send(self, signal: str, body: bytes) -> None:
        conn = self._connection()
        try:
            conn.request("POST", f"{self.base}/v1/{signal}", body=body, headers=self.headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ExportError(f"{type(exc).__name__}: {exc}", retry=True) from None
        if resp.status >= 300:
            raise ExportError(f"HTTP {resp.status}: {data[:200]!r}",
                              retry=resp.status in self.RETRY_STATUS)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class GrpcSender:
    """OTLP/gRPC: the collector services' ``Export`` methods called with the already-encoded
    request bytes (grpcio passes bytes through when no serializer is given)."""

    METHODS: ClassVar[dict[str, str]] = {
        "traces": "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
        "metrics": "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
    }

    def __init__(self, endpoint: str, headers: Mapping[str, str], timeout_s: float) -> None:
        import grpc

        parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        target = f"{parts.hostname}:{parts.port or 4317}"
        if parts.scheme == "https":
            self.channel = grpc.secure_channel(target, grpc.ssl_channel_credentials())
        else:
            self.channel = grpc.insecure_channel(target)
        self.calls = {s: self.channel.unary_unary(m) for s, m in self.METHODS.items()}
        self.metadata = tuple((k.lower(), v) for k, v in headers.items())
        self.timeout_s = timeout_s
        self._grpc = grpc

    def send(self, signal: str, body: bytes) -> None:
        grpc = self._grpc
        try:
            self.calls[signal](body, timeout=self.timeout_s, metadata=self.metadata)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            retry = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                             grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED)
            raise ExportError(f"gRPC {code}", retry=retry) from None

    def close(self) -> None:
        self.channel.close()


def send_with_retry(sender: HttpSender | GrpcSender, signal: str, body: bytes,
                    timeout_s: float) -> bool:
    """Send; retry a retryable failure with backoff (1, 2, 4 … s) within ``timeout_s``.
    False (and a warning) when the data is dropped."""
    deadline = time.monotonic() + timeout_s
    delay = 1.0
    while True:
        try:
            sender.send(signal, body)
            return True
        except ExportError as exc:
            if not exc.retry or time.monotonic() + delay > deadline:
                log.warning("OTLP export of %s failed, dropped: %s", signal, exc)
                return False
        time.sleep(delay)
        delay *= 2
