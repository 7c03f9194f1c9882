"""prof24: py-spy raw (collapsed) stacks -> self time by area (innermost matching frame),
self and cumulative by function, and the request handler's phases; per request.

    python raw_areas.py RAW.txt REQUESTS GATEWAY_CPU_S
"""
import collections
import re
import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
RULES = [
    ("tokenization (tokenizers encode)", r"inferplane/tokenization\.py:(encode|load_tokenizer)|tokenizers/"),
    ("hashing / prefix index", r"placement/hashing|fleet/prefix_index|tokenization\.py:(block_hashes|hash_block|engine_block|salt_root|token_ids|word_id)|hashlib|_engine_hashes"),
    ("KV events", r"fleet/kv_|zmq/|msgspec|msgpack"),
    ("scrapes / health probes", r"fleet/scraper|fleet/engine_metrics|fleet/health|fleet/live|metrics_source|prometheus_client/parser|HttpMetricsSource"),
    ("placement (place, reserve, hold)", r"inferplane/placement/|inferplane/physics/|fleet/state|fleet/passive|core/plane\.py:(hold|reserve|place|_place)"),
    ("ledger / records / receipts", r"inferplane/ledger/|telemetry/records|telemetry/notes"),
    ("metrics (prometheus)", r"prometheus_client/|telemetry/metrics"),
    ("tracing / telemetry other", r"inferplane/telemetry/|opentelemetry"),
    ("logging", r"/logging/"),
    ("JSON parse / validate", r"orjson|/json/|httpio\.py:parse_json|api/validate|:validate$"),
    ("admission", r"inferplane/admission/"),
    ("SSE relay (inferplane frames)", r"dispatch/upstream\.py:(relay|first_chunk)|api/app\.py:forward|SSEUsage|dispatch/answer|StreamStats"),
    ("upstream open / eager writer", r"dispatch/upstream\.py|dispatch/eager|inferplane/eagerly"),
    ("aiohttp client", r"aiohttp/(client|connector|streams|client_reqrep|client_proto)"),
    ("aiohttp writer/payload/helpers", r"aiohttp/(http_writer|payload|helpers|tcp_helpers|abc)"),
    ("aiohttp server", r"aiohttp/"),
    ("multidict / yarl", r"multidict|yarl/"),
    ("inferplane other", r"inferplane/"),
    ("asyncio / uvloop (no inferplane/aiohttp frame)", r"asyncio/|selectors|runners"),
]
RULES = [(a, re.compile(r)) for a, r in RULES]
FR = re.compile(r"^(.*) \((.*?)(?::(\d+))?\)$")


def key(fr: str) -> str:
    m = FR.match(fr)
    if not m:
        return fr
    return f"{m.group(2)}:{m.group(1)}"


def func(fr: str) -> str:
    m = FR.match(fr)
    return f"{m.group(1)} ({m.group(2)})" if m else fr


path, nreq, cpu = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
stacks = []
for line in open(path):
    line = line.rstrip("\n")
    st, _, c = line.rpartition(" ")
    frames = st.split(";")
    stacks.append((frames, int(c)))
total = sum(c for _, c in stacks)
ms = lambda c: 1000 * cpu * c / total / nreq  # noqa: E731
print(f"{total} samples; scaled to the gateway's {cpu} s CPU over {nreq} requests "
      f"= {1000 * cpu / nreq:.2f} ms/request; 1 sample = {ms(1) * 1000:.1f} µs/request")
threads = collections.Counter()
areas = collections.Counter()
selff = collections.Counter()
cum = collections.Counter()
phase = collections.Counter()
PHASES = [
    ("scrape loop", r"scraper|Scraper|_scrape|scrape"),
    ("health probe loop", r"health|Health|probe"),
    ("KV event subscriber", r"kv_sub|KvSub|kv_events|zmq"),
    ("handler: read body", r"app\.py:_read_body|httpio\.py:read_body"),
    ("handler: parse+validate", r"app\.py:handle.*?;(parse_json|validate)"),
    ("handler: classify (tokenize, hash)", r"plane\.py:classify"),
    ("handler: admit", r"admission.*:admit|:admit "),
    ("handler: open_with: place/hold/reserve", r"plane\.py:(hold|reserve)"),
    ("handler: open_with: send (session.post, eager write)", r"pipeline\.py:send.*upstream\.py:open|upstream\.py:open"),
    ("handler: open_with: first_chunk", r"first_chunk"),
    ("handler: forward: relay loop", r"app\.py:forward.*(relay|write|aclosing|__anext__)"),
    ("handler: forward: account/commit", r"app\.py:forward.*(account|committed)"),
    ("handler: forward: prepare/headers", r"app\.py:forward"),
    ("handler: other (trace, finish_soon, auth)", r"app\.py:(handler|handle)"),
    ("aiohttp server (request parse, task start, response write, no handler frame)", r"aiohttp/web_protocol|aiohttp/web"),
    ("aiohttp client callbacks (response parse, no handler frame)", r"aiohttp/client_proto|aiohttp/streams"),
]
PHASES = [(a, re.compile(r)) for a, r in PHASES]
for frames, c in stacks:
    threads[frames[0].split(":")[0] + ":" + (frames[0].split(":")[1] if ":" in frames[0] else "")] += c
    keys = [key(f) for f in frames[1:]]
    area = "unmatched"
    for k in reversed(keys):
        hit = next((a for a, r in RULES if r.search(k)), None)
        if hit:
            area = hit
            break
    areas[area] += c
    selff[func(frames[-1])] += c
    for f in set(func(x) for x in frames[1:]):
        cum[f] += c
    joined = ";".join(keys)
    ph = next((a for a, r in PHASES if r.search(joined)), "other (loop C code, timers, ...)")
    phase[ph] += c
print("\n## threads")
for t, c in threads.most_common():
    print(f"{c:5d} {100 * c / total:5.1f} %  {ms(c):6.3f} ms/req  {t}")
print("\n## areas, by the innermost frame that names one (self time of the area)")
for a, c in areas.most_common():
    print(f"{c:5d} {100 * c / total:5.1f} %  {ms(c):6.3f} ms/req  {a}")
print("\n## phases (first match from the top of this list, on the whole stack)")
for a, c in phase.most_common():
    print(f"{c:5d} {100 * c / total:5.1f} %  {ms(c):6.3f} ms/req  {a}")
print("\n## self, top 40")
for f, c in selff.most_common(40):
    print(f"{c:5d} {100 * c / total:5.1f} %  {ms(c):6.3f}  {f}")
print("\n## cumulative, top 90")
for f, c in cum.most_common(90):
    print(f"{c:5d} {100 * c / total:5.1f} %  {ms(c):6.3f}  {f}")
