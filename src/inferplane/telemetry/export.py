"""Getting finished requests and the GenAI metrics out of the gateway: the gateway's `Batcher`
thread and the `ExporterProcess` it hands them to with ``telemetry.exporter: process``;
`run_exporter` is that process's loop (``python -m inferplane.telemetry.exporter``)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import marshal
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferplane.telemetry.otlp import (
    GrpcSender,
    Histogram,
    HttpSender,
    encode_metrics,
    send_with_retry,
)
from inferplane.telemetry.records import SCOPE, Record, encode_record, encode_spans, full

if TYPE_CHECKING:
    from inferplane.config.schema import FleetConfig, TelemetrySpec
    from inferplane.telemetry.otel import OtelTelemetry

log = logging.getLogger("inferplane.telemetry")

QUEUE_MAX = 16384
"""Finished requests waiting for the batcher; past it, requests are not traced (counted)."""
BATCH = 512
"""Sampled requests per export request; a full batch wakes the batcher early."""

LAYOUT_SOURCES = ("notes.py", "records.py", "otlp.py", "otel.py", "export.py")
"""The modules (of `inferplane.telemetry`) that make the records the gateway hands over, write
and read them, and encode them in the exporter process (`layout`)."""


def layout() -> str:
    """What the gateway's and the exporter process's records must agree on: the sha256 of
    `LAYOUT_SOURCES` (the compiled build is used only while they hash as it was built from:
    `inferplane.compiled`), or the package's version where they cannot be read. The gateway
    reads it when `export` is imported, and hands it over with the fleet config
    (`ExporterProcess.start`); an exporter process started later from changed code (a package
    upgraded in place: it starts with a gateway's first request, and again in every forked
    worker) sees another and drops what it is handed (`run_exporter`)."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    try:
        for name in LAYOUT_SOURCES:
            digest.update((here / name).read_bytes())
    except OSError:
        from inferplane import __version__

        return f"version {__version__}"
    return digest.hexdigest()[:16]


LAYOUT = layout()
"""This process's `layout`, read once (at import: the code this process runs)."""


def exporter_headers(spec: TelemetrySpec) -> dict[str, str]:
    from inferplane.telemetry.otel import parse_headers

    return parse_headers(os.environ.get(spec.headers_env, "")) if spec.headers_env else {}


def sender_for(spec: TelemetrySpec) -> HttpSender | GrpcSender:
    headers = exporter_headers(spec)
    if spec.protocol == "grpc":
        return GrpcSender(spec.endpoint, headers, spec.timeout_s)
    return HttpSender(spec.endpoint, headers, spec.timeout_s)


def export_spans(tel: OtelTelemetry, sender: HttpSender | GrpcSender, records: list[Record],
                 timeout_s: float) -> int:
    """Encode the spans of finished (sampled) requests from their records (`records.
    encode_record`: the common shape by its kind's layout) and send them, `BATCH` requests to
    an export request. A record that fails to encode costs only its own spans: it is encoded
    field by field (`records.encode_spans`) instead, or else left out, counted and logged
    (the first such error of the call with its traceback). Returns how many were left out."""
    skipped = 0
    first: BaseException | None = None
    for i in range(0, len(records), BATCH):
        body: list[bytes] = []
        for r in records[i:i + BATCH]:
            n = len(body)
            try:
                encode_record(tel, r, body)
            except Exception:
                del body[n:]
                try:
                    encode_spans(tel, full(r), body)
                except Exception as exc:
                    del body[n:]
                    skipped += 1
                    first = first or exc
        if body:
            send_with_retry(sender, "traces", tel.encoder.wrap(body), timeout_s)
    if skipped:
        log.warning("OTLP: %d of %d requests not traced (their spans could not be encoded)",
                    skipped, len(records), exc_info=first)
    return skipped


def export_metrics(tel: OtelTelemetry, sender: HttpSender | GrpcSender,
                   snapshot: tuple[list[Histogram], int, int], timeout_s: float) -> None:
    """Encode a copy of the GenAI histograms (`OtelTelemetry.metrics_snapshot`) and send it."""
    body = encode_metrics(tel.resource_attrs, SCOPE, *snapshot)
    if body is not None:
        send_with_retry(sender, "metrics", body, timeout_s)


class Batcher:
    """The gateway's background thread. Every ``min(5 s, export_interval_s)`` (or when `BATCH`
    sampled requests are waiting) it takes the finished requests' records, and every
    ``export_interval_s`` a copy of the GenAI histograms, and either hands them (`encode`: the
    records marshalled, the histograms pickled) to the exporter process (`ExporterProcess`,
    ``telemetry.exporter: process``; started with the thread), which encodes the records'
    spans and sends all, or itself does that (``thread``). Started by the first request that
    ends (so a process that forks after building the gateway gets its own)."""

    def __init__(self, tel: OtelTelemetry, sender: HttpSender | GrpcSender | None,
                 spec: TelemetrySpec, *, child: ExporterProcess | None = None) -> None:
        self.tel = tel
        self.sender = sender
        self.child = child
        self.delay_s = min(5.0, spec.export_interval_s)
        self.metrics_interval_s = spec.export_interval_s
        self.timeout_s = spec.timeout_s
        self.queue: deque[Record] = deque()
        self.dropped = 0
        self.started = False
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one drain at a time (the thread, or the shutdown)
        self._next_metrics = time.monotonic() + self.metrics_interval_s
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.queue.clear()
        self.started = False
        self._thread = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.tel.forked()
        if self.child is not None:  # the parent's exporter stays the parent's
            self.child = ExporterProcess(self.child.config)

    def add(self, record: Record) -> None:
        """Queue a sampled request's record unless `QUEUE_MAX` requests wait (then it is
        dropped and counted); start the thread with the first, wake it at `BATCH`."""
        q = self.queue
        n = len(q)
        if n >= QUEUE_MAX:
            self.dropped += 1
            return
        q.append(record)
        if not self.started:
            self.start()
        elif n >= BATCH - 1 and not self._wake.is_set():
            self._wake.set()

    def start(self) -> None:
        self.started = True
        self._thread = threading.Thread(target=self._run, name="inferplane-otlp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._lock:  # the exporter process starts now, not with the first batch
            if self.child is not None and self.child.proc is None and not self.child.start():
                self._child_gone()
        while not self._stop:
            self._wake.wait(self.delay_s)
            self._wake.clear()
            if self._stop:
                return
            try:
                self.flush(metrics=time.monotonic() >= self._next_metrics)
            except Exception:  # an export bug must not stop the exports
                log.exception("OTLP batcher failed")

    def flush(self, *, metrics: bool) -> None:
        """Hand over (or export) the queued records, and the metrics when ``metrics``."""
        with self._lock:
            q = self.queue
            records = [q.popleft() for _ in range(len(q))]
            snapshot = None
            if metrics and self.tel.histograms:
                self._next_metrics = time.monotonic() + self.metrics_interval_s
                snapshot = self.tel.metrics_snapshot()
            child = self.child
            if child is not None:
                if records and not child.send(("spans", records)):
                    self._child_gone()
                elif snapshot is not None and not child.send(("metrics", snapshot)):
                    self._child_gone()
                    records = []  # handed over already
                else:
                    return
            self._export(records, snapshot)

    def _child_gone(self) -> None:
        log.warning("OTLP exporter process is gone (or did not start): exporting from the "
                    "gateway itself")
        self.child = None

    def _export(self, records: list[Record],
                snapshot: tuple[list[Histogram], int, int] | None) -> None:
        sender = self.sender
        if sender is None:
            sender = self.sender = sender_for(self.tel.spec)
        if records:
            export_spans(self.tel, sender, records, self.timeout_s)
        if snapshot is not None:
            export_metrics(self.tel, sender, snapshot, self.timeout_s)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout_s + 5)
        try:
            self.flush(metrics=True)
        finally:
            if self.child is not None:
                self.child.close(self.timeout_s + 10)
            if self.sender is not None:
                self.sender.close()
        if self.dropped:
            log.warning("OTLP: %d requests were not traced (the export queue was full)",
                        self.dropped)


class ExporterProcess:
    """``python -m inferplane.telemetry.exporter``: a child process that sends the spans of the
    requests the gateway hands it (their records, whose spans it encodes: `records.
    encode_record`) and the GenAI histograms' copies, so that the spans' and the metrics'
    encoding and the sending are off the gateway's CPU. Messages on its stdin are
    length-prefixed: `LAYOUT` and the fleet config (a pickle: `hello`), then the records of a
    batch (`encode`:
    ``MARSHALLED`` and their `marshal` dump, or a pickle of ``("spans", records)``) and
    ``("metrics", (histograms, start_ns, now_ns))`` pickled. Started with the gateway's batcher
    thread; it sends what it holds and exits when its stdin closes."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        """Start the process and hand it the config; False if it cannot be."""
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "inferplane.telemetry.exporter"],
                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
            )
        except OSError:
            return False
        try:
            self._write(proc, hello(self.config))
        except (OSError, ValueError):
            proc.kill()
            proc.wait()
            return False
        self.proc = proc
        return True

    @staticmethod
    def _write(proc: subprocess.Popen[bytes], data: bytes) -> None:
        assert proc.stdin is not None
        proc.stdin.write(len(data).to_bytes(4, "big"))
        proc.stdin.write(data)
        proc.stdin.flush()

    def send(self, message: tuple[str, Any]) -> bool:
        """Hand a message over (`encode`); False when the process is gone."""
        try:
            if self.proc is None and not self.start():
                return False
            assert self.proc is not None
            self._write(self.proc, encode(message))
            return True
        except (OSError, ValueError):
            proc, self.proc = self.proc, None
            if proc is not None and proc.stdin is not None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.close()  # its unsent bytes go with it
                proc.wait()
            return False

    def close(self, timeout_s: float) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.warning("OTLP exporter process did not finish in %.0f s: killed", timeout_s)
            proc.kill()
            proc.wait()


def hello(config: FleetConfig) -> bytes:
    """The exporter process's first message: the gateway's `LAYOUT` and its fleet config."""
    return pickle.dumps((LAYOUT, config), protocol=pickle.HIGHEST_PROTOCOL)


def run_exporter(stream: Any) -> None:
    """The exporter process's loop (`telemetry.exporter`): the layout and the fleet config
    (`hello`), then messages, each exported as it comes (the gateway has batched them). When
    the gateway's `LAYOUT` is not this process's (its code changed in between), it logs that
    once and reads and drops every message: decoded against another layout the records would
    make wrong spans, or none."""

    def read() -> bytes | None:
        head = stream.read(4)
        if len(head) < 4:
            return None
        size = int.from_bytes(head, "big")
        data = stream.read(size)
        return data if len(data) == size else None

    from inferplane.telemetry.otel import OtelTelemetry

    first = read()
    if first is None:
        return
    try:
        message = pickle.loads(first)
    except Exception:  # a gateway of other code: its config may not load here
        message = None
    theirs: Any = "unknown"  # not a `hello`: a gateway of other code
    config: Any = None
    if type(message) is tuple and len(message) == 2:
        theirs, config = message
    if theirs != LAYOUT:
        log.error("OTLP exporter process: the gateway's telemetry code (layout %s) is not this "
                  "process's (%s; the package changed after the gateway started?): its spans "
                  "and metrics are dropped, not exported; restart the gateway", theirs, LAYOUT)
        while read() is not None:
            pass
        return
    tel = OtelTelemetry(config, exporter="none")
    sender = sender_for(tel.spec)
    try:
        while (data := read()) is not None:
            try:
                handle(tel, sender, data)
            except Exception:  # an export bug must not stop the exports
                log.exception("OTLP export failed")
    finally:
        sender.close()


MARSHALLED = b"M"
"""The first byte of a batch of records handed over with `marshal` (a pickle starts with
``\\x80``)."""


def encode(message: tuple[str, Any]) -> bytes:
    """A message for the exporter process as the gateway's batcher hands it over: a batch of
    records (``("spans", records)``) as `MARSHALLED` and the records' `marshal` dump — the
    records are tuples of plain values (str, bytes, int, float, bool, None, tuples), which marshal
    writes in about 0.61-0.76x the instructions pickle takes, each shared attribute group once
    (it keeps references to objects referenced more than once, as pickle's memo does) —;
    anything else, or records marshal refuses (a subclass of a plain type, an object), pickled.
    marshal keeps a value's type only for those exact plain types: it writes any object with
    the buffer protocol (``bytearray``, ``memoryview``, a numpy scalar, subclasses too) as
    ``bytes``, without an error. So the records must hold nothing else; nothing checks that
    per record here (it would cost the gateway a scan of every value): tests/test_otel_export.py
    holds the request path's records of every kind to it."""
    kind, payload = message
    if kind == "spans":
        try:
            return MARSHALLED + marshal.dumps(payload)
        except ValueError:  # an unmarshallable value: pickle takes any
            pass
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def decode(message: bytes) -> tuple[str, Any]:
    """The message `encode` made."""
    if message[:1] == MARSHALLED:
        return "spans", marshal.loads(memoryview(message)[1:])
    kind, payload = pickle.loads(message)
    return kind, payload


def handle(tel: OtelTelemetry, sender: HttpSender | GrpcSender, message: bytes) -> None:
    """One message from the gateway (`ExporterProcess`, `encode`), exported."""
    kind, payload = decode(message)
    timeout_s = tel.spec.timeout_s
    if kind == "spans":
        export_spans(tel, sender, payload, timeout_s)
    elif kind == "metrics":
        export_metrics(tel, sender, payload, timeout_s)
