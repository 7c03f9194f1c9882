"""bench/otel_parts: where OpenTelemetry's CPU goes, per request, part by part, in one process.

`bench/otel.py` measures the whole (a gateway process with telemetry on against off); this splits
it. Each part runs over the same requests (the request path's calls, as `api.app` and
`core.plane` make them, against a real placement decision) and is timed with
``time.process_time`` (CPU, not wall: other processes on the machine do not count), best of
``--repeat`` runs of ``--requests`` requests:

- ``notes, sampled`` / ``notes, unsampled``: the request path (trace start, classified, the admit
  and place stages, the placement's attributes, the attempt, the outgoing ``traceparent``,
  finished, end: the metric points and, sampled, the record queued for the batcher);
- ``hand-over`` (gateway, batcher thread): the batcher's flush (``Batcher.flush``) giving the
  exporter process the queued requests, as `export.ExporterProcess` writes them (`export.encode`);
- ``exporter`` (child process): those messages decoded and exported (`export.handle`, to a
  sender that sends nothing).

With ``--instructions``, in instructions instead (valgrind's callgrind, the main thread only;
slow, but the machine's load does not move it): the request path's notes, sampled and unsampled
(``--requests`` requests against none, after the same warm-up), and per sampled request the
hand-over (the queued records written as `export.ExporterProcess` writes them, `export.encode`,
in batches of `export.BATCH`) and the exporter's work (those messages decoded and exported,
`export.handle`, to a sender that sends nothing): for these two the run that does them against
one that makes the same requests and stops there:

    python bench/otel_parts.py [--requests 2000] [--repeat 7] [--instructions]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from inferplane.api.pipeline import Gateway  # noqa: E402
from inferplane.config.loader import parse_config  # noqa: E402
from inferplane.telemetry import export  # noqa: E402
from inferplane.telemetry.otel import OtelTelemetry  # noqa: E402

CONFIG = """
telemetry: {{enabled: true, sample_ratio: {ratio}, exporter: thread}}
substrates:
  - {{name: p, kind: gpu, hardware: h100, region: r, jurisdiction: eu, cost: {{hourly_usd: 1}},
     endpoints: [{{name: e, url: "http://127.0.0.1:9", models: [{{name: m,
     profile: llama-3.1-8b, max_context: 4096}}]}}]}}
tenants: [{{name: t, api_keys: ["sha256:{zeros}"]}}]
"""


def telemetry(ratio: float) -> tuple[OtelTelemetry, Gateway]:
    config = parse_config(CONFIG.format(ratio=ratio, zeros="0" * 64))
    gw = Gateway(config)
    gw.telemetry.shutdown()
    tel = OtelTelemetry(config, exporter="thread")
    return tel, gw


def placed_chat(gw: Gateway) -> tuple[Any, Any, Any, dict[str, str]]:
    """A chat request classified and placed by ``gw`` (its profile, decision and endpoint) and
    the headers a client sends with it: what the benches trace, request after request."""
    profile = gw.classify("chat", {"model": "m", "messages": [
        {"role": "user", "content": "hi"}]}, {}, gw.config.tenants[0])
    decision = gw.decide(profile)
    assert decision.picked is not None
    headers = {"host": "127.0.0.1:8080", "content-type": "application/json"}
    return profile, decision, decision.picked.endpoint, headers


def request_path(tel: OtelTelemetry, gw: Gateway, n: int) -> Callable[[], None]:
    """``n`` requests' calls into the trace, as the gateway makes them (no I/O)."""
    profile, decision, endpoint, headers = placed_chat(gw)

    def run() -> None:
        for _ in range(n):
            t = tel.request("chat", headers)
            t.classified(profile, 16)
            with t.stage("admit"):
                pass
            with t.stage("place"):
                t.placed(decision)
            t.upstream_started(endpoint, "m")
            t.upstream_headers()
            t.finished(status=200, error=None, prompt_tokens=7, completion_tokens=5,
                       ttft_s=0.01, tpot_s=0.002)
            t.end()

    return run


class Sink:
    """An OTLP sender that sends nothing (the encoding is measured, not the loopback)."""

    def send(self, signal: str, body: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class Child:
    """An exporter process that keeps the messages the batcher hands it, as
    `export.ExporterProcess` writes them (`export.encode`)."""

    def __init__(self, messages: list[bytes]) -> None:
        self.messages = messages

    def send(self, message: tuple[str, Any]) -> bool:
        self.messages.append(export.encode(message))
        return True


def best(fn: Callable[[], Any], setup: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        setup()
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return min(times)


def instructions(n: int) -> None:
    """Instructions per request: the request path's, sampled and unsampled (this script under
    callgrind with ``n`` requests against none), the hand-over's and the exporter's (``n``
    sampled requests with the part against without it); the main thread's counts."""
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="ip-otel-parts-"))
    rows = []
    for part, ratio, label in (("path", 1.0, "notes on the request path, sampled"),
                               ("path", 0.0, "notes on the request path, unsampled"),
                               ("hand-over", 1.0, "hand-over (gateway, batcher thread)"),
                               ("exporter", 1.0, "exporter (decode, encode; exporter process)")):
        counts = []
        for k in (0, 1):
            out = tmp / f"cg-{part}-{ratio}-{k}"
            args = (["--path-only", str(ratio), "--requests", str(n * k)] if part == "path"
                    else ["--part", part, str(k), "--requests", str(n)])
            subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes",
                            f"--callgrind-out-file={out}", sys.executable, __file__, *args],
                           check=True, capture_output=True, env={**os.environ,
                                                                 "PYTHONPATH": str(ROOT / "src")})
            main_thread = next(tmp.glob(f"{out.name}-01"))
            counts.append(next(int(line.split()[1]) for line in main_thread.read_text()
                               .splitlines() if line.startswith(("totals:", "summary:"))))
        rows.append((label, (counts[1] - counts[0]) / n))
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    print(f"# bench/otel_parts --instructions — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — git {git}"
          f" — {platform.node()}, Python {platform.python_version()} — {n} requests against none")
    print("| part | instructions per request |")
    print("|---|---|")
    for label, per in rows:
        print(f"| {label} | {per:,.0f} |")


def part_run(part: str, do: bool, n: int) -> None:
    """One run of `instructions` for the hand-over or the exporter: warm (caches, layouts, the
    exporter's), then ``n`` sampled requests, their records handed over in batches as the
    batcher does, and (``do``) the part: the hand-over's writing, or the exporter's decoding
    and exporting of what was handed over. Without ``do`` the same up to the part."""
    tel, gw = telemetry(1.0)
    batcher = tel.batcher
    assert batcher is not None
    batcher._thread = object()  # type: ignore[assignment]
    batcher.started = True
    messages: list[bytes] = []
    child, _ = telemetry(1.0)

    def hand_over(write: bool) -> None:
        q = batcher.queue
        while q:
            batch = [q.popleft() for _ in range(min(export.BATCH, len(q)))]
            if write:
                messages.append(export.encode(("spans", batch)))

    request_path(tel, gw, 600)()
    hand_over(True)
    for data in messages:  # the exporter's caches and layouts
        export.handle(child, Sink(), data)  # type: ignore[arg-type]
    messages.clear()
    request_path(tel, gw, n)()
    hand_over(do or part == "exporter")
    if do and part == "exporter":
        for data in messages:
            export.handle(child, Sink(), data)  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--instructions", action="store_true",
                    help="count the request path's instructions under callgrind instead")
    ap.add_argument("--path-only", type=float, default=None, metavar="RATIO",
                    help=argparse.SUPPRESS)  # one run of --instructions: warm, then --requests
    ap.add_argument("--part", nargs=2, default=None, metavar=("PART", "DO"),
                    help=argparse.SUPPRESS)  # one run of --instructions: PART done if DO is 1
    args = ap.parse_args()
    if args.part is not None:
        part_run(args.part[0], args.part[1] == "1", args.requests)
        return
    if args.path_only is not None:
        tel, gw = telemetry(args.path_only)
        assert tel.batcher is not None
        tel.batcher._thread = object()  # type: ignore[assignment]
        tel.batcher.started = True
        request_path(tel, gw, 200)()  # caches, layouts
        tel.batcher.queue.clear()
        request_path(tel, gw, args.requests)()
        return
    if args.instructions:
        instructions(args.requests)
        return
    n, rows = args.requests, []
    for ratio, label in ((1.0, "sampled"), (0.0, "unsampled")):
        tel, gw = telemetry(ratio)
        batcher = tel.batcher
        assert batcher is not None
        batcher._thread = object()  # type: ignore[assignment]  # no thread: measured alone
        batcher.started = True
        run = request_path(tel, gw, n)
        rows.append((f"notes, {label}", "gateway (request path)",
                     best(run, lambda b=batcher: b.queue.clear(),
                          args.repeat)))
        batcher.queue.clear()
        run()
        queued = list(batcher.queue)
        messages: list[bytes] = []

        def refill(batcher: Any = batcher, queued: Any = queued,
                   messages: list[bytes] = messages) -> None:
            messages.clear()
            batcher.queue.extend(queued)

        batcher.child = Child(messages)  # the batcher's own flush, pickling what it hands over
        rows.append((f"hand-over, {label}", "gateway (batcher thread)",
                     best(lambda b=batcher: b.flush(metrics=False), refill, args.repeat)))
        # the exporter process's side, in this process (run_exporter's `handle`)
        child, _ = telemetry(ratio)

        def exporter(child: OtelTelemetry = child, messages: list[bytes] = messages) -> None:
            for data in messages:
                export.handle(child, Sink(), data)  # type: ignore[arg-type]

        rows.append((f"exporter, {label}", "exporter process",
                     best(exporter, lambda: None, args.repeat)))
        batcher.queue.clear()  # not exported: nothing listens
        gw.telemetry.shutdown()
    # once per export interval, not per request: the metrics' copy and encoding
    tel, gw = telemetry(1.0)
    assert tel.batcher is not None
    tel.batcher._thread = object()  # type: ignore[assignment]
    tel.batcher.started = True
    request_path(tel, gw, 50)()
    t0 = time.process_time()
    for _ in range(100):
        tel.metrics_request()
    per_export = (time.process_time() - t0) / 100
    tel.batcher.queue.clear()
    gw.telemetry.shutdown()
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                         cwd=ROOT).stdout.strip()
    print(f"# bench/otel_parts — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC — git {git} — "
          f"{platform.node()} ({os.cpu_count()} CPUs), Python {platform.python_version()} — "
          f"{n} requests, best of {args.repeat} — load average {os.getloadavg()[0]:.1f}")
    print("| part | where | µs CPU per request |")
    print("|---|---|---|")
    for part, where, seconds in rows:
        print(f"| {part} | {where} | {seconds / n * 1e6:.1f} |")
    print(f"metrics export (copy and encode, once per interval): {per_export * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
