"""Getting finished requests out of the gateway: the `Batcher` thread (in the gateway, and in
the exporter process) and the `ExporterProcess` it hands batches to with ``telemetry.exporter:
process``; `run_exporter` is that process's loop (``python -m inferplane.telemetry.exporter``)."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from inferplane.telemetry.otlp import GrpcSender, HttpSender, SpanData, send_with_retry
from inferplane.telemetry.records import R_SAMPLED, Record, spans_of

if TYPE_CHECKING:
    from inferplane.config.schema import FleetConfig, TelemetrySpec
    from inferplane.telemetry.otel import OtelTelemetry

log = logging.getLogger("inferplane.telemetry")

QUEUE_MAX = 16384
"""Finished requests waiting for the batcher; past it, requests are not traced (counted)."""
BATCH = 512
"""Requests per encoded batch; a full one wakes the batcher early."""


def exporter_headers(spec: TelemetrySpec) -> dict[str, str]:
    from inferplane.telemetry.otel import parse_headers

    return parse_headers(os.environ.get(spec.headers_env, "")) if spec.headers_env else {}


def sender_for(spec: TelemetrySpec) -> HttpSender | GrpcSender:
    headers = exporter_headers(spec)
    if spec.protocol == "grpc":
        return GrpcSender(spec.endpoint, headers, spec.timeout_s)
    return HttpSender(spec.endpoint, headers, spec.timeout_s)


class Batcher:
    """The background thread: every ``min(5 s, export_interval_s)`` (or when `BATCH` requests
    are waiting) it takes the finished requests and either hands them, pickled, to the exporter
    process (`ExporterProcess`, ``telemetry.exporter: process``) or itself builds their spans,
    encodes and sends them and aggregates the GenAI histograms, sent every
    ``export_interval_s`` (``thread``, and in the exporter process). Started by the first
    request (so a process that forks after building the gateway gets its own)."""

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
        self._wake = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # one drain at a time (the thread, or the shutdown)
        self._next_metrics = time.monotonic() + self.metrics_interval_s
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        self.queue.clear()
        self._thread = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        if self.child is not None:  # the parent's exporter stays the parent's
            self.child = ExporterProcess(self.child.config)

    def add(self, record: Record) -> None:
        q = self.queue
        if len(q) >= QUEUE_MAX:
            self.dropped += 1
            return
        q.append(record)
        if self._thread is None:
            self._start()
        elif len(q) >= BATCH:
            self._wake.set()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inferplane-otlp", daemon=True)
        self._thread.start()

    def _run(self) -> None:
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
        with self._lock:
            q = self.queue
            if self.child is not None:
                batch = [q.popleft() for _ in range(len(q))]
                if not batch or self.child.send(batch):
                    return
                log.warning("OTLP exporter process is gone: exporting from the gateway itself")
                self.child = None
                q.extendleft(reversed(batch))
            self._export(metrics)

    def _export(self, metrics: bool) -> None:
        tel, q, sender = self.tel, self.queue, self.sender
        if sender is None:
            sender = self.sender = sender_for(tel.spec)
        spans: list[SpanData] = []
        requests = 0
        while q:
            r = q.popleft()
            tel.record_metrics(r)
            if r[R_SAMPLED] and tel.trace_spans:
                spans.extend(spans_of(tel, r))
                requests += 1
                if requests >= BATCH:
                    send_with_retry(sender, "traces", tel.encoder.request(spans), self.timeout_s)
                    spans, requests = [], 0
        if spans:
            send_with_retry(sender, "traces", tel.encoder.request(spans), self.timeout_s)
        if metrics:
            self._next_metrics = time.monotonic() + self.metrics_interval_s
            body = tel.metrics_request()
            if body is not None:
                send_with_retry(sender, "metrics", body, self.timeout_s)

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
    """``python -m inferplane.telemetry.exporter``: a child process that builds, encodes and
    sends the spans and metrics of the requests the gateway hands it (pickled batches of
    records, length-prefixed, on its stdin), so that work is off the gateway's CPU. Started
    with the first batch; it flushes and exits when its stdin closes."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferplane.telemetry.exporter"],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, close_fds=True,
        )
        assert proc.stdin is not None
        self._write(proc, pickle.dumps(self.config, protocol=pickle.HIGHEST_PROTOCOL))
        return proc

    @staticmethod
    def _write(proc: subprocess.Popen[bytes], data: bytes) -> None:
        assert proc.stdin is not None
        proc.stdin.write(len(data).to_bytes(4, "big"))
        proc.stdin.write(data)
        proc.stdin.flush()

    def send(self, batch: list[Record]) -> bool:
        """Hand a batch over; False when the process is gone."""
        try:
            if self.proc is None:
                self.proc = self._spawn()
            self._write(self.proc, pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
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


def run_exporter(stream: Any) -> None:
    """The exporter process's loop (`telemetry.exporter`): the fleet config, then batches."""

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
    config = pickle.loads(first)
    tel = OtelTelemetry(config, exporter="thread")
    batcher = tel.batcher
    assert batcher is not None
    try:
        while (data := read()) is not None:
            for r in pickle.loads(data):
                batcher.add(r)
    finally:
        tel.shutdown()


