"""bench/otel_encode: the exporter process's per-record work, offline (the common shape's
records, encoded by their kind's layout, `records.encode_trace`, through `records.encode_record`):
``--requests`` requests' records (as `bench/otel_parts` makes them: the request path's calls
against a real placement decision, sample ratio 1, half of them streamed with TTFT/TPOT, each
request's record taken as it ends), in `export.BATCH` batches as the gateway's batcher hands
them over (`export.encode`), then decoded (`export.decode`), encoded to OTLP protobuf
(`export.export_spans`) and dropped ``--repeat`` times (a sender that sends nothing). With
``--repeat 0`` only the set-up runs, so under callgrind

    valgrind --tool=callgrind python bench/otel_encode.py --repeat 1  (and --repeat 3)

the difference of the two totals over 2 x requests is the instructions per record, warm (the
first round fills the encoder's caches; it is in both). Without valgrind it prints CPU µs per
record, best of the rounds; ``--profile`` prints cProfile's top functions of one round.

    python bench/otel_encode.py [--requests 2000] [--repeat 5] [--profile] [--opcodes]
                                [--records FILE] [--dump FILE]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pickle
import pstats
import random
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OTEL_RESOURCE_ATTRIBUTES", "service.instance.id=bench")  # same bytes
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.otel_parts import Sink, placed_chat, telemetry  # noqa: E402
from inferplane.telemetry import export  # noqa: E402


def records(n: int) -> list[Any]:
    tel, gw = telemetry(1.0)
    batcher = tel.batcher
    assert batcher is not None
    batcher._thread = object()  # type: ignore[assignment]  # no thread: nothing exported
    batcher.started = True
    profile, decision, endpoint, headers = placed_chat(gw)
    out = []
    for i in range(n):
        t = tel.request("chat", headers)
        t.classified(profile, 16)
        with t.stage("admit"):
            pass
        with t.stage("place"):
            t.placed(decision)
        t.upstream_started(endpoint, "m")
        t.upstream_headers()
        stream = i % 2 == 0
        t.finished(status=200, error=None, prompt_tokens=7 + i % 50,
                   completion_tokens=5 + i % 300, ttft_s=0.01 + i * 1e-5 if stream else None,
                   tpot_s=0.002 + i * 1e-7 if stream else None)
        t.end()
        out.append(t.handed())  # what the gateway queues (compact)
    batcher.queue.clear()
    gw.telemetry.shutdown()
    return out


class Keep(Sink):
    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def send(self, signal: str, body: bytes) -> None:
        self.bodies.append(body)


def count(fn: Any) -> tuple[int, dict[str, int]]:
    """Python bytecodes executed by ``fn()`` (``sys.settrace``), then its calls by kind
    (``sys.setprofile``) in a second run."""
    ops = 0

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        nonlocal ops
        frame.f_trace_opcodes = True
        if event == "opcode":
            ops += 1
        return tracer

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    calls = {"call": 0, "c_call": 0}

    def profiler(frame: Any, event: str, arg: Any) -> None:
        if event in calls:
            calls[event] += 1

    sys.setprofile(profiler)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return ops, calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--records", type=Path, default=None,
                    help="a pickle of the records: read if it exists, else written (the same "
                         "records for two trees, so the bytes' digests compare)")
    ap.add_argument("--opcodes", action="store_true",
                    help="count the Python bytecodes and the calls (Python and C) of one warm "
                         "round: deterministic, a proxy for the work where callgrind is not run")
    ap.add_argument("--dump", type=Path, default=None, help="write the encoded bytes there")
    args = ap.parse_args()
    random.seed(1)
    if args.records is not None and args.records.exists():
        recs = pickle.loads(args.records.read_bytes())
    else:
        recs = records(args.requests)
        if args.records is not None:
            args.records.write_bytes(pickle.dumps(recs, protocol=pickle.HIGHEST_PROTOCOL))
    batches = [export.encode(("spans", recs[i:i + export.BATCH]))
               for i in range(0, len(recs), export.BATCH)]
    child, _ = telemetry(1.0)  # the exporter process's (no batcher of its own used)
    sink = Sink()

    def round_() -> None:
        for data in batches:
            export.export_spans(child, sink, export.decode(data)[1], 10.0)  # type: ignore[arg-type]

    times = []
    for _ in range(args.repeat):
        t0 = time.process_time()
        round_()
        times.append(time.process_time() - t0)
    if times:
        print(f"exporter: {min(times) / len(recs) * 1e6:.2f} µs CPU per record "
              f"(best of {len(times)}, {len(recs)} records, {len(batches)} batches)")
    keep = Keep()
    random.seed(2)
    for data in batches:
        export.export_spans(child, keep, export.decode(data)[1], 10.0)  # type: ignore[arg-type]
    digest = hashlib.sha256(b"".join(keep.bodies)).hexdigest()[:16]
    if args.dump is not None:
        args.dump.write_bytes(b"".join(keep.bodies))
    print(f"bytes: {sum(map(len, keep.bodies))} in {len(keep.bodies)} requests, sha256 {digest}")
    if args.opcodes:
        random.seed(3)
        round_()  # warm
        ops, calls = count(round_)
        print(f"per record: {ops / len(recs):.1f} bytecodes, {calls['call'] / len(recs):.2f} "
              f"Python calls, {calls['c_call'] / len(recs):.2f} C calls (one warm round)")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        round_()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
