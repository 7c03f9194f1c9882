"""A finished request's record, one tuple of plain values (`Record`; fields `R_SAMPLED` …), and
its spans encoded from it to OTLP protobuf in the exporter (`encode_record`): for the common
shape by one precompiled `struct` layout per kind of request (`encode_trace`), for any other
field by field (`encode_spans`); or its spans as span objects (`spans_of`). A record is cheap
to keep and to pickle; the attribute groups in it (`Pairs`) are shared tuples, so a pickled
batch carries each once."""

from __future__ import annotations

import random
import struct
import sys
from typing import TYPE_CHECKING, Any, Final

from inferplane.telemetry.otlp import (
    _FLAGS_LOCAL,
    _FLAGS_REMOTE,
    _KINDS,
    _VARINTS,
    SPAN_KIND,
    SpanData,
    SpanEncoder,
    _field,
    _key,
    _pack_d,
    attribute,
    typed_key,
    varint,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import ReadableSpan

    from inferplane.telemetry.otel import OtelTelemetry

_bits: Final = random.getrandbits

Pairs = tuple[tuple[str, Any], ...]
"""Attributes as (name, value) pairs; the same tuple object for the same group, so a pickled
batch carries each group once and `OtelTelemetry.attrs` encodes it once."""

SCOPE = "inferplane"
"""The instrumentation scope of every span."""


Record = tuple[Any, ...]
(R_SAMPLED, R_TRACE, R_SPAN, R_PARENT, R_REMOTE, R_STATE, R_START, R_END, R_SERVER, R_MAX_TOKENS,
 R_DECISION, R_DECISION_ID, R_SPILL, R_STATUS, R_ERROR, R_ERROR_TYPE, R_PROMPT, R_COMPLETION,
 R_TTFT, R_TPOT, R_RESPONSE_MODEL, R_PROVIDER, R_STAGES, R_ATTEMPTS) = range(24)


COMPACT = "compact"
"""The tag (first value) of a compact record: the hand-over of a request with two stages and
one attempt, the second stage with its placement's attributes (`placement`: the common case),
`OtelTrace.handed` — the tag, then the record's fields with none nested (its server tuple's
seven, each stage's, the attempt's in place; no `R_SAMPLED`: only sampled requests are handed
over), except that the second stage's attributes are its candidates count (an int: the
decision id and the spillover reason are the record's own), cheaper to build and to marshal,
and untracked by the garbage collector in its first collection (no tuple made for the request
in it), and that its eight times (the request's start and end, each stage's, the attempt's) are
one `bytes` value, `TIMES` packed: marshal writes and reads a 61-bit int as five 15-bit digits,
≈ 250 instructions each way per time, and the exporter copies the packed times into the spans
as they are (a span's times are fixed64 too). A record
(`Record`) starts with `R_SAMPLED`, a bool, so the tag tells the two apart whatever their
lengths. `expand` makes the record of it; `full` takes either."""

TIMES: Final = struct.Struct(
    "8L" if sys.byteorder == "little" and struct.calcsize("L") == 8 else "<8Q")
"""A compact record's times (`COMPACT`): start, end, the two stages' starts and ends, the
attempt's start and end (0: not ended), eight little-endian fixed64 — the exporter copies them
into the spans as they are (a time that is not one makes no compact record). Where an unsigned
long is 64 bits and little-endian, as native unsigned longs: CPython 3.11 converts an int of
more than one digit for a ``Q`` through `_PyLong_AsByteArray`, ≈ 170 instructions a time, for
an ``L`` in a few."""
_unpack_times: Final = TIMES.unpack
_NO_TIME: Final = bytes(8)


def placement(decision_id: str | None, candidates: int, spill: str | None) -> Pairs:
    """The attributes a placement gives the stage it is made in (`OtelTrace.placed`)."""
    if spill is None:
        return (("inferplane.decision_id", decision_id), ("inferplane.candidates", candidates))
    return (("inferplane.decision_id", decision_id), ("inferplane.candidates", candidates),
            ("inferplane.spillover.reason", spill))


def expand(c: tuple[Any, ...]) -> Record:
    """The record (`Record`) a compact record (`COMPACT`) stands for."""
    start, end, admit0, admit1, place0, place1, call0, call1 = _unpack_times(c[6])
    return (True, *c[1:6], start, end, c[7:14], *c[14:27],
            ((c[27], admit0, admit1, c[28], c[29]),
             (c[30], place0, place1, c[31], placement(c[16], c[32], c[17]))),
            ((*c[33:37], call0, call1, *c[37:40]),))


def full(r: tuple[Any, ...]) -> Record:
    """The record of a hand-over (`OtelTrace.handed`): ``r`` itself, or `expand` of it when it
    is compact (tagged `COMPACT`)."""
    return expand(r) if r[0] == COMPACT else r


def _usage(r: Record) -> Pairs:
    usage: list[tuple[str, Any]] = []
    if r[R_STATUS] is not None:
        usage.append(("http.response.status_code", r[R_STATUS]))
    if r[R_RESPONSE_MODEL] is not None:
        usage.append(("gen_ai.response.model", r[R_RESPONSE_MODEL]))
    if r[R_PROMPT] is not None:
        usage.append(("gen_ai.usage.input_tokens", r[R_PROMPT]))
    if r[R_COMPLETION] is not None:
        usage.append(("gen_ai.usage.output_tokens", r[R_COMPLETION]))
    if r[R_TTFT] is not None:
        usage.append(("inferplane.ttft_s", r[R_TTFT]))
    if r[R_TPOT] is not None:
        usage.append(("inferplane.tpot_s", r[R_TPOT]))
    return tuple(usage)


def spans_of(tel: OtelTelemetry, r: Record) -> list[SpanData]:
    """A request's spans from its record: admit and place, the attempts, the server span
    last."""
    tid, sid, state, end = r[R_TRACE], r[R_SPAN], r[R_STATE], r[R_END]
    op = r[R_SERVER][0]
    out: list[SpanData] = []
    for name, start_ns, end_ns, error_type, attrs in r[R_STAGES]:
        if error_type is not None:
            attrs = (*attrs, ("error.type", error_type))
        out.append(SpanData(tid, _bits(64) or 1, sid, False, state, name, SPAN_KIND["internal"],
                            start_ns, end_ns, (), attrs, error_type is not None, None))
    usage: Pairs = ()
    for span_id, fixed, model, number, start_ns, end_ns, err, status, finished in r[R_ATTEMPTS]:
        attrs = (("inferplane.attempt", number),)
        if finished:
            usage = _usage(r)
            attrs += usage
        if err is not None:
            if status is not None and not finished:
                attrs += (("http.response.status_code", status),)
            attrs += (("error.type", err),)
        out.append(SpanData(tid, span_id, sid, False, state, f"{op} {model}",
                            SPAN_KIND["client"], start_ns, end_ns or end, (tel.attrs(fixed),),
                            attrs, err is not None, r[R_ERROR] if finished else None))
    server: list[tuple[str, Any]] = []
    model = r[R_SERVER][3]
    name = op if model is None else f"{op} {model}"
    if model is not None and r[R_MAX_TOKENS] is not None:
        server.append(("gen_ai.request.max_tokens", r[R_MAX_TOKENS]))
    if r[R_DECISION_ID] is not None:
        server.append(("inferplane.decision_id", r[R_DECISION_ID]))
    if r[R_SPILL] is not None:
        server.append(("inferplane.spillover.reason", r[R_SPILL]))
    attempts = r[R_ATTEMPTS]
    if attempts:
        server.append(("inferplane.attempts", len(attempts)))
    if attempts and attempts[-1][8]:  # the last attempt was accounted: its usage
        server += usage
    elif r[R_STATUS] is not None:
        server.append(("http.response.status_code", r[R_STATUS]))
    error = False
    if r[R_ERROR_TYPE] is not None:
        server.append(("error.type", r[R_ERROR_TYPE]))
        error = r[R_STATUS] is not None and r[R_STATUS] >= 500
    out.append(SpanData(tid, sid, r[R_PARENT], r[R_REMOTE], state, name, SPAN_KIND["server"],
                        r[R_START], end, (tel.server_attrs(r[R_SERVER]), tel.attrs(r[R_DECISION])),
                        server, error, r[R_ERROR] if error else None))
    return out


def encode_spans(tel: OtelTelemetry, r: Record, out: list[bytes]) -> None:
    """The spans `spans_of` makes of a record, encoded straight to ``ScopeSpans.spans`` fields
    appended to ``out`` (for `SpanEncoder.wrap`): the same bytes as ``SpanEncoder.request`` of
    `spans_of`'s spans (tests/test_otel_encoding.py checks it), without building them. What
    every span of the request shares (trace id, trace state, the server span's id as the
    parent, the decision id) and the usage attributes (on the server span and the last
    attempt) are encoded once; what repeats from request to request (a span's name and kind,
    an attempt's or the server span's attribute groups) comes from the encoder's caches, and
    the times are packed with their tags in one call."""
    enc = tel.encoder
    attribute = enc.attribute
    memo = enc.memo
    head = b"\x0a\x10" + r[R_TRACE].to_bytes(16, "big") + b"\x12\x08"  # trace id, span id tag
    state = r[R_STATE]
    sid = r[R_SPAN].to_bytes(8, "big")
    after_id = (_field(b"\x1a", state.encode()) + b"\x22\x08" + sid) if state else \
        b"\x22\x08" + sid
    end = r[R_END]
    server = r[R_SERVER]
    op = server[0]
    decision_id = r[R_DECISION_ID]
    did = b"" if decision_id is None else enc.unique("inferplane.decision_id", decision_id)
    for name, start_ns, end_ns, error_type, attrs in r[R_STAGES]:
        parts = [head, (_bits(64) or 1).to_bytes(8, "big"), after_id, enc.named(name, _INTERNAL),
                 _pack_times(start_ns, 0x41, end_ns)]
        for k, v in attrs:
            if k == "inferplane.decision_id" and type(v) is str:  # one per request: not cached
                parts.append(did if v == decision_id else enc.unique(k, v))
            else:
                parts.append(attribute(k, v))
        if error_type is not None:
            parts += (attribute("error.type", error_type), _STATUS_ERROR_ONLY, _FLAGS_LOCAL)
        else:
            parts.append(_TAIL_LOCAL)
        data = b"".join(parts)
        n = len(data)
        out += (_SPAN_TAGS[n] if n < 16384 else b"\x12" + varint(n), data)
    usage = b""
    for span_id, fixed, model, number, start_ns, end_ns, err, status, finished in r[R_ATTEMPTS]:
        key = (op, model, fixed, number)
        pre = memo.get(key)
        if pre is None:  # its name and kind; its endpoint's attributes and its number
            pre = enc.remember(key, (enc.named(f"{op} {model}", _CLIENT), tel.attrs(fixed).data
                                     + attribute("inferplane.attempt", number)))
        parts = [head, span_id.to_bytes(8, "big"), after_id, pre[0],
                 _pack_times(start_ns, 0x41, end_ns or end), pre[1]]
        if finished:
            usage = _usage_data(enc, r)
            parts.append(usage)
        if err is not None:
            if status is not None and not finished:
                parts.append(attribute("http.response.status_code", status))
            parts += (attribute("error.type", err),
                      _status_error(r[R_ERROR] if finished else None), _FLAGS_LOCAL)
        else:
            parts.append(_TAIL_LOCAL)
        data = b"".join(parts)
        n = len(data)
        out += (_SPAN_TAGS[n] if n < 16384 else b"\x12" + varint(n), data)
    model = server[3]
    max_tokens = r[R_MAX_TOKENS] if model is not None else None
    key = (server, r[R_DECISION], max_tokens, type(max_tokens))  # 16 and 16.0 differ
    pre = memo.get(key)
    if pre is None:  # its name and kind; the attributes that repeat from request to request
        data = tel.server_attrs(server).data + tel.attrs(r[R_DECISION]).data
        if max_tokens is not None:
            data += attribute("gen_ai.request.max_tokens", max_tokens)
        pre = enc.remember(key, (enc.named(op if model is None else f"{op} {model}", _SERVER),
                                 data))
    parts = [head, sid]
    if state:
        parts.append(_field(b"\x1a", state.encode()))
    if r[R_PARENT]:
        parts += (b"\x22\x08", r[R_PARENT].to_bytes(8, "big"))
    parts += (pre[0], _pack_times(r[R_START], 0x41, end), pre[1], did)
    if r[R_SPILL] is not None:
        parts.append(attribute("inferplane.spillover.reason", r[R_SPILL]))
    attempts = r[R_ATTEMPTS]
    if attempts:
        parts.append(attribute("inferplane.attempts", len(attempts)))
    if attempts and attempts[-1][8]:  # the last attempt was accounted: its usage
        parts.append(usage)
    elif r[R_STATUS] is not None:
        parts.append(attribute("http.response.status_code", r[R_STATUS]))
    if r[R_ERROR_TYPE] is not None:
        parts.append(attribute("error.type", r[R_ERROR_TYPE]))
        if r[R_STATUS] is not None and r[R_STATUS] >= 500:
            parts.append(_status_error(r[R_ERROR]))
        else:
            parts.append(_STATUS_UNSET)
        parts.append(_FLAGS_REMOTE if r[R_REMOTE] else _FLAGS_LOCAL)
    else:
        parts.append(_TAIL_REMOTE if r[R_REMOTE] else _TAIL_LOCAL)
    data = b"".join(parts)
    n = len(data)
    out += (_SPAN_TAGS[n] if n < 16384 else b"\x12" + varint(n), data)


_DID = "inferplane.decision_id"


def compact(r: Record) -> tuple[Any, ...] | None:
    """The compact record (`COMPACT`) of a record with two stages and one attempt (the inverse
    of `expand`), else None."""
    stages, attempts = r[R_STAGES], r[R_ATTEMPTS]
    if len(stages) != 2 or len(attempts) != 1:
        return None
    attrs = stages[1][4]
    if (len(attrs) < 2 or type(attrs[1][1]) is not int
            or attrs != placement(r[R_DECISION_ID], attrs[1][1], r[R_SPILL])
            or (len(attrs) > 2 and type(attrs[2][1]) is not str)
            or type(attrs[0][1]) is not type(r[R_DECISION_ID])):
        return None  # not the attributes of its placement (`placement`)
    (name0, s0, e0, error0, attrs0), (name1, s1, e1, error1, _) = stages
    a = attempts[0]
    try:
        times = TIMES.pack(r[R_START], r[R_END], s0, e0, s1, e1, a[4], a[5])
    except struct.error:
        return None  # a time that is no fixed64
    return (COMPACT, *r[R_TRACE:R_START], times, *r[R_SERVER], *r[R_MAX_TOKENS:R_STAGES], name0,
            error0, attrs0, name1, error1, attrs[1][1], *a[:4], *a[6:])


def encode_trace(tel: OtelTelemetry, r: Record) -> bytes | None:
    """A finished sampled request's spans encoded as `encode_spans` encodes its record (the same
    bytes: tests/test_otel_encoding.py checks it), when the request has the common shape
    (`encode_compact` of its compact record); None for any other request."""
    c = compact(r)
    return None if c is None else encode_compact(tel, c)


def encode_compact(tel: OtelTelemetry, c: tuple[Any, ...]) -> bytes | None:
    """A compact record's spans (`COMPACT`: two stages, one attempt) encoded as `encode_spans`
    encodes its record (`expand`), read from the compact record itself, when the request has the
    common shape: an ``admit`` and a ``place`` stage without error, one upstream attempt that
    was accounted without error, no error on the request, token counts ints and times floats
    (or absent). None for any other request (`encode_record` then uses `encode_spans`).

    Every such request of the same kind (the same model, endpoint and decision attributes,
    status, and the same lengths of what varies) is laid out alike: one `struct.Struct` per
    kind, compiled on its first request (`_shape`), packs the request's ids, times, decision
    id, token counts and TTFT/TPOT between the kind's constant bytes in one call. The kind's
    key is flat and cheap to hash: the kind's attribute groups stand in it as a token each,
    an int found by the group's identity (`_group`), the server's seven fields in place, and
    the place stage's attributes as what `placement` makes them of (the candidates count,
    the spillover reason, with their types), not as the tuples themselves (hashing those
    nested tuples was ≈ 3,000 of the exporter's ≈ 42,000 instructions per request;
    bench/otel_callgrind.py, docs/benchmarks.md, session 12)."""
    (_, trace_id, sid_, parent, remote, state, times, op, address, port, model, tier, class_,
     tenant, max_tokens, decision, did, spill, status, _, error_type, prompt, completion, ttft,
     tpot, response_model, _, admit, e0, attrs0, place, e1, candidates, span_id, fixed,
     upstream_model, number, err, _, finished) = c
    if (error_type is not None or e0 is not None or e1 is not None or attrs0 or not finished
            or err is not None or type(did) is not str or type(times) is not bytes
            or len(times) != 64
            or (prompt is not None and type(prompt) is not int)
            or (completion is not None and type(completion) is not int)
            or (ttft is not None and type(ttft) is not float)
            or (tpot is not None and type(tpot) is not float)):
        return None
    enc = tel.encoder
    d = did.encode()
    st = state.encode() if state else b""
    inp = b"" if prompt is None else (
        _INPUT.get(prompt) or _cached(enc, _INPUT, "gen_ai.usage.input_tokens", prompt))
    out = b"" if completion is None else (
        _OUTPUT.get(completion) or _cached(enc, _OUTPUT, "gen_ai.usage.output_tokens", completion))
    if model is None:
        max_tokens = None
    # the place attributes' values by type too (1, 1.0 and True are equal keys)
    key = (op, address, port, model, tier, class_, tenant, _group(enc, decision), max_tokens,
           type(max_tokens), admit, place, candidates, type(candidates), spill, type(spill),
           _group(enc, fixed), upstream_model, number, status, response_model, remote,
           parent == 0, len(d), len(st), len(inp), len(out), ttft is None, tpot is None)
    shape = enc.shapes.get(key)
    if shape is None:
        shape = _shape(tel, key, c[7:14], decision, fixed,
                       placement(did, candidates, spill)[1:]) or ()
        if len(enc.shapes) >= SpanEncoder.CACHE_MAX:
            enc.shapes.clear()
        enc.shapes[key] = shape
    if not shape:
        return None
    (pack, k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14, k15, k16, k17, k18,
     ttft_key, tpot_key) = shape
    try:
        tb: bytes = times  # eight little-endian fixed64: the spans' bytes as they are
        start, end, c1 = tb[:8], tb[8:16], tb[56:]
        # the ids big-endian by `struct`, fewer instructions than `int.to_bytes` (an id past
        # its bits, or below 0, fails)
        head = _pack_head(b"\x0a\x10", trace_id >> 64, trace_id & _MASK64, b"\x12\x08")
        sid = _be64(sid_)
        after = b"\x22\x08" + sid  # a child span's fields after its own id: its parent
        if st:
            after = b"\x1a" + varint(len(st)) + st + after  # and the trace state before it
        aid = _be64(_bits(64) or 1)  # the stages' span ids, drawn in encode_spans' order
        pid = _be64(_bits(64) or 1)
        par = _be64(parent) if parent else b""
        usage = b"".join((inp, out, ttft_key, b"" if ttft is None else _pack_d(ttft), tpot_key,
                          b"" if tpot is None else _pack_d(tpot)))
        return pack(  # type: ignore[no-any-return]
            k0, head, aid, after, k1, tb[16:24], k2, tb[24:32],
            k3, head, pid, after, k4, tb[32:40], k5, tb[40:48], k6, d,
            k7, head, _be64(span_id), after, k8, tb[48:56], k9,
            end if c1 == _NO_TIME else c1, k10, usage,
            k11, head, sid, k12, st, k13, par, k14, start, k15, end, k16, d, k17, usage,
            k18)
    except struct.error:  # an id out of range: the record's encoding says what it does
        return None


def encode_record(tel: OtelTelemetry, r: Record, out: list[bytes]) -> None:
    """A finished sampled request's spans appended to ``out`` (``ScopeSpans.spans`` fields, for
    `SpanEncoder.wrap`): by its kind's layout (`encode_compact`) when it has the common shape,
    else by `encode_spans`. ``r`` may be compact (`COMPACT`), as the hand-over makes it."""
    c: tuple[Any, ...] | None = r if r[0] == COMPACT else compact(r)
    data = None if c is None else encode_compact(tel, c)
    if data is None:
        encode_spans(tel, full(r), out)
    else:
        out.append(data)


def _group(enc: SpanEncoder, pairs: Pairs) -> int:
    """An attribute group (shared by the requests of one batch) as a key of `encode_compact`'s
    layouts: a token for the value of `otlp.typed_key` of it (an int, never given to another
    value: a key holding it hashes and compares as cheaply as an int), looked up by the group's
    identity (a batch's requests share the object)."""
    hit = enc.groups.get(id(pairs))
    if hit is None or hit[0] is not pairs:
        if len(enc.groups) >= 256:
            enc.groups.clear()
        key = typed_key(pairs)
        token = enc.typed.get(key)
        if token is None:
            if len(enc.typed) >= 256:
                enc.typed.clear()  # a value seen again gets a new token: its layouts are made
            enc.tokens += 1        # again, never another value's
            token = enc.typed[key] = enc.tokens
        hit = enc.groups[id(pairs)] = (pairs, token)  # holds it: the id stays its
    return hit[1]


_TRACE_ARGS = ("", "head", "aid", "after", "", "a0", "", "a1",
               "", "head", "pid", "after", "", "p0", "", "p1", "", "d",
               "", "head", "cid", "after", "", "c0", "", "c1", "", "usage",
               "", "head", "sid", "", "st", "", "par", "", "s0", "", "s1", "", "d", "", "usage",
               "")
"""What `encode_trace` packs, in order: its kind's constants ("") and the request's values."""


class _Var:
    __slots__ = ("code", "name", "size")

    def __init__(self, name: str, size: int, code: str | None = None) -> None:
        self.name, self.size, self.code = name, size, code or f"{size}s"


def _shape(tel: OtelTelemetry, key: tuple[Any, ...], server: tuple[Any, ...], decision: Pairs,
           fixed: Pairs, place_attrs: Pairs) -> tuple[Any, ...] | None:
    """The layout of `encode_compact`'s kind ``key`` (its server fields ``server``, groups
    ``decision`` and ``fixed``, and its place stage's attributes after the decision id,
    ``place_attrs``): the `struct.Struct` pack, the 19 constants that go between the request's
    values (`_TRACE_ARGS`), and the TTFT and TPOT attributes' keys (empty when the kind has
    none), made of the same pieces as `encode_spans` makes (None: a request `encode_compact`
    does not lay out)."""
    enc = tel.encoder
    (op, _, _, model, _, _, _, _, max_tokens, _, admit, place, _, _, spill, _, _, upstream_model,
     number, status, response_model, remote, local, d_len, st_len, inp_len, out_len, no_ttft,
     no_tpot) = key
    if remote == local:
        return None
    ttft_key = b"" if no_ttft else _TTFT
    tpot_key = b"" if no_tpot else _TPOT
    usage_len = (inp_len + out_len + len(ttft_key) + len(tpot_key) + (0 if no_ttft else 8)
                 + (0 if no_tpot else 8))
    state = b"\x1a" + varint(st_len) if st_len else b""  # the trace state's tag and length
    head, after = _Var("head", 20), _Var("after", len(state) + st_len + 10)
    usage: list[Any] = [enc.attribute("http.response.status_code", status)]
    if response_model is not None:
        usage.append(enc.attribute("gen_ai.response.model", response_model))
    usage.append(_Var("usage", usage_len))
    value = b"\x0a" + varint(d_len)  # the decision id's attribute (`unique`), less its bytes
    kv_len = len(_key(_DID)) + 1 + len(varint(len(value) + d_len)) + len(value) + d_len
    did = [b"\x4a" + varint(kv_len) + _key(_DID) + b"\x12" + varint(len(value) + d_len) + value,
           _Var("d", d_len)]
    server_attrs = tel.server_attrs(server).data + tel.attrs(decision).data
    if max_tokens is not None:
        server_attrs += attribute("gen_ai.request.max_tokens", max_tokens)
    spans = [
        [head, _Var("aid", 8), after, enc.named(admit, _INTERNAL), _Var("a0", 8), b"\x41",
         _Var("a1", 8), _TAIL_LOCAL],
        [head, _Var("pid", 8), after, enc.named(place, _INTERNAL), _Var("p0", 8), b"\x41",
         _Var("p1", 8), *did, *(enc.attribute(k, x) for k, x in place_attrs),
         _TAIL_LOCAL],
        [head, _Var("cid", 8), after, enc.named(f"{op} {upstream_model}", _CLIENT),
         _Var("c0", 8), b"\x41", _Var("c1", 8), tel.attrs(fixed).data,
         attribute("inferplane.attempt", number), *usage, _TAIL_LOCAL],
        [head, _Var("sid", 8), state, _Var("st", st_len), b"" if local else b"\x22\x08",
         _Var("par", 0 if local else 8),
         enc.named(op if model is None else f"{op} {model}", _SERVER), _Var("s0", 8),
         b"\x41", _Var("s1", 8), server_attrs, *did,
         enc.attribute("inferplane.spillover.reason", spill) if spill is not None else b"",
         enc.attribute("inferplane.attempts", 1), *usage,
         _TAIL_REMOTE if remote else _TAIL_LOCAL],
    ]
    items: list[Any] = []
    for span in spans:
        n = sum(p.size if type(p) is _Var else len(p) for p in span)
        for p in (_SPAN_TAGS[n] if n < 16384 else b"\x12" + varint(n), *span):
            if type(p) is bytes and items and type(items[-1]) is bytes:
                items[-1] += p
            else:
                items.append(p)
    if tuple("" if type(p) is bytes else p.name for p in items) != _TRACE_ARGS:
        return None
    pack = struct.Struct("<" + "".join(f"{len(p)}s" if type(p) is bytes else p.code
                                       for p in items)).pack
    return (pack, *(p for p in items if type(p) is bytes), ttft_key, tpot_key)


def _usage_data(enc: SpanEncoder, r: Record) -> bytes:
    """The usage attributes (`_usage`) encoded: the status and response model as one cached
    group, the token counts from their keys' caches, the floats after their pre-encoded key."""
    prompt, completion, ttft, tpot, response_model = r[R_PROMPT:R_PROVIDER]
    status = r[R_STATUS]
    memo = enc.memo
    key = ("usage", status, response_model)
    head = memo.get(key) if type(status) is int or status is None else None
    if head is None:
        data = b""
        if status is not None:
            data += enc.attribute("http.response.status_code", status)
        if response_model is not None:
            data += enc.attribute("gen_ai.response.model", response_model)
        head = enc.remember(key, (data, b""))
    parts = [head[0]]
    if prompt is not None:
        parts.append((type(prompt) is int and _INPUT.get(prompt))
                     or _cached(enc, _INPUT, "gen_ai.usage.input_tokens", prompt))
    if completion is not None:
        parts.append((type(completion) is int and _OUTPUT.get(completion))
                     or _cached(enc, _OUTPUT, "gen_ai.usage.output_tokens", completion))
    if ttft is not None:
        parts.append(_TTFT + _pack_d(ttft) if type(ttft) is float
                     else enc.attribute("inferplane.ttft_s", ttft))
    if tpot is not None:
        parts.append(_TPOT + _pack_d(tpot) if type(tpot) is float
                     else enc.attribute("inferplane.tpot_s", tpot))
    return b"".join(parts)


_INPUT: Final[dict[int, bytes]] = {}  # token counts' attributes, by count (process-wide: no
_OUTPUT: Final[dict[int, bytes]] = {}  # resource)


def _cached(enc: SpanEncoder, cache: dict[int, bytes], key: str, value: Any) -> bytes:
    data = enc.attribute(key, value)
    if type(value) is int:
        if len(cache) >= SpanEncoder.CACHE_MAX:
            cache.clear()
        cache[value] = data
    return data


def _status_error(message: str | None) -> bytes:
    """Span field 15: status ERROR, with its message."""
    if message is None:
        return _STATUS_ERROR_ONLY
    return _field(b"\x7a", _field(b"\x12", message.encode()) + b"\x18\x02")


_STATUS_UNSET = b"\x7a\x00"  # as the SDK encodes an unset status
_STATUS_ERROR_ONLY = _field(b"\x7a", b"\x18\x02")
_INTERNAL, _SERVER, _CLIENT = (_KINDS[SPAN_KIND[k]] for k in ("internal", "server", "client"))
_TAIL_LOCAL = _STATUS_UNSET + _FLAGS_LOCAL  # a span's last fields: status unset, flags
_TAIL_REMOTE = _STATUS_UNSET + _FLAGS_REMOTE
_SPAN_TAGS = [b"\x12" + v for v in _VARINTS]  # ScopeSpans.spans' tag and a span's length
_pack_times = struct.Struct("<QBQ").pack  # start (fixed64), end's tag (0x41), end (fixed64)
# `Final`: compiled, C statics instead of a module dictionary lookup per use
_pack_head: Final = struct.Struct(">2sQQ2s").pack  # a span's trace id field, its span id's tag
_be64: Final = struct.Struct(">Q").pack  # a span id
_MASK64: Final = (1 << 64) - 1
_TTFT: Final = attribute("inferplane.ttft_s", 0.0)[:-8]  # a float attribute less its 8 value
_TPOT: Final = attribute("inferplane.tpot_s", 0.0)[:-8]  # bytes


def to_readable(s: SpanData, tel: OtelTelemetry) -> ReadableSpan:
    """An SDK ``ReadableSpan`` of the same span (for SDK span exporters)."""
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
    from opentelemetry.trace.span import TraceState

    state = TraceState([tuple(kv.split("=", 1)) for kv in s.trace_state.split(",")]  # type: ignore[misc]
                       ) if s.trace_state else None
    flags = TraceFlags(TraceFlags.SAMPLED)
    parent = (SpanContext(s.trace_id, s.parent_id, is_remote=s.parent_remote, trace_flags=flags,
                          trace_state=state) if s.parent_id else None)
    kind = {1: SpanKind.INTERNAL, 2: SpanKind.SERVER, 3: SpanKind.CLIENT}[s.kind]
    return ReadableSpan(
        name=s.name,
        context=SpanContext(s.trace_id, s.span_id, is_remote=False, trace_flags=flags,
                            trace_state=state),
        parent=parent,
        resource=tel.resource,
        attributes={**{k: v for a in s.fixed for k, v in a.pairs}, **dict(s.attributes)},
        kind=kind,
        status=Status(StatusCode.ERROR, s.message) if s.error else Status(StatusCode.UNSET),
        start_time=s.start_ns,
        end_time=s.end_ns,
        instrumentation_scope=InstrumentationScope(SCOPE),
    )


