"""prof24: exclusive buckets (first match, in this order, on the whole stack) of py-spy raw stacks,
scaled to the gateway's measured CPU per request.

    python buckets.py RAW.txt REQUESTS GATEWAY_CPU_S
"""
import re
import sys

B = [
    ("pre-send: tokenize the prompt (Classifier._tokenize)", r"Classifier\._tokenize"),
    ("pre-send: classify, rest (hashes, profile)", r"Core\.classify"),
    ("pre-send: admission", r"Admission\.admit|admission/"),
    ("pre-send: place + reserve (Core.hold)", r"Core\.hold"),
    ("pre-send: upstream send (Dispatcher.open: aiohttp request build, eager write)", r"Dispatcher\.open"),
    ("first chunk wait/read", r"first_chunk"),
    ("relay: generator (Dispatcher.relay, stats)", r"Dispatcher\.relay"),
    ("relay: account + commit (ledger record, receipt)", r"forward \(inferplane/api/app\.py:\d+\);.*(account|committed)"),
    ("relay: writes to the client (StreamResponse.write/prepare/write_eof)", r"forward \(inferplane/api/app\.py"),
    ("handler: rest (auth, read body, parse, trace, finish)", r"make_api_handler"),
    ("aiohttp server outside the handler", r"aiohttp/web"),
    ("scrapes (/metrics)", r"Scraper\._scrape|HttpMetricsSource\.metrics|engine_metrics"),
    ("health probes", r"health|probe_once"),
    ("KV events (ZMQ subscriber, decode, index)", r"KVEventSub|kv_events|zmq"),
    ("batch worker's idle poll (loop side)", r"BatchWorker|batch/"),
    ("batch store thread (SQLite)", r"inferplane-batch-db"),
    ("aiohttp client callbacks outside a handler", r"aiohttp/(client|streams)"),
    ("the loop's own C code (uvloop: polls, socket reads/writes, HTTP parsing, task steps; no Python frame below the loop's run call)", r"_serve_one \(inferplane/cli\.py:\d+\)$|MainThread$"),
    ("other Python", r"\.py:\d+\);[^;]+\.py"),
    ("unclassified", r""),
]
B = [(a, re.compile(r)) for a, r in B]
path, nreq, cpu = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
count = {a: 0 for a, _ in B}
total = 0
other = {}
for line in open(path):
    s, _, c = line.rstrip("\n").rpartition(" ")
    c = int(c)
    total += c
    for a, r in B:
        if r.search(s):
            count[a] += c
            if a == "other Python":
                other[s.split(";")[-1]] = other.get(s.split(";")[-1], 0) + c
            break
print("| rank | where | samples | share | ms / request |")
print("|---|---|---|---|---|")
for k, (a, c) in enumerate(sorted(count.items(), key=lambda x: -x[1]), 1):
    print(f"| {k} | {a} | {c} | {100 * c / total:.1f} % | {1000 * cpu * c / total / nreq:.3f} |")
print(f"| | total | {total} | 100 % | {1000 * cpu / nreq:.2f} |")
print("other Python leaves:", sorted(other.items(), key=lambda x: -x[1])[:12])
