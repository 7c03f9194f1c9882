"""``python -m inferplane.telemetry.exporter``: the OTLP exporter process a gateway starts with
``telemetry.exporter: process`` (`telemetry.export.ExporterProcess`). It reads the gateway's
layout and fleet config (`telemetry.export.hello`; a layout not its own: it drops everything)
and then messages from stdin (length-prefixed: `telemetry.export.encode`): finished
sampled requests' records (whose spans it encodes and sends) and copies of the gateway's
GenAI histograms, which it encodes and sends; it exits when stdin closes.
Its stdin is the gateway's own pipe: it runs nothing it did not get from its parent."""

from __future__ import annotations

import logging
import signal
import sys

from inferplane.telemetry.export import run_exporter


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # the gateway's Ctrl-C or a stop sent to its whole group: it closes our stdin when it has
    # handed over its last requests, and we flush them then
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    run_exporter(sys.stdin.buffer)


if __name__ == "__main__":
    main()
