import asyncio, cProfile, pstats, sys, tempfile, time
from pathlib import Path
sys.path[:0] = ["src", "."]
import orjson, uvloop
from bench.request_path_cuts import build_gateway
from bench.peers.gateway_gap import bench_slice
from inferplane.dispatch.answer import StreamStats, parse_usage
from inferplane.core.validation import validate
from inferplane.core.validation import parse_json
_, bodies = bench_slice(0.0, 130.0, 1.0); bodies = bodies[:300]
loop = uvloop.new_event_loop(); asyncio.set_event_loop(loop)
gw = build_gateway(Path(tempfile.mkdtemp()))
chunk_text = [b'data: {"id":"x","object":"text_completion","created":1,"model":"m","choices":[{"index":0,"text":" w%d","logprobs":null,"finish_reason":null}]}\n\n' % i for i in range(16)]
usage = b'data: {"id":"x","object":"text_completion","created":1,"model":"m","choices":[],"usage":{"prompt_tokens":100,"total_tokens":116,"completion_tokens":16}}\n\ndata: [DONE]\n\n'
stage_t = {}
async def one(raw):
    t = time.perf_counter
    a = t()
    tenant, key_hash = gw.authenticate_key("Bearer sk-h100x8-demo")
    body = parse_json(raw); validate("completions", body)
    b = t(); profile = gw.classify("completions", body, {}, tenant)
    c = t(); ticket = await gw.admission.admit("completions", body, raw, {}, tenant, key_hash, profile)
    d = t(); pl = gw.hold.__wrapped__ if False else None
    pl = await gw.hold(ticket.profile, ticket, [])
    e = t()
    st = StreamStats(a)
    now = t()
    for i, ch in enumerate(chunk_text):
        st.observe(ch, now + 0.002 * i)
        if not pl.reservation.prefilled: pl.reservation.first_token()
    st.observe(usage, now + 0.04)
    f = t()
    r = gw.account(pl, status=200, started=a, stats=st, usage=parse_usage(st.usage_line, sse=True))
    await gw.committed(r, ticket)
    g = t()
    for k, v in (("parse", b - a), ("classify", c - b), ("admit", d - c), ("place+reserve", e - d), ("observe17", f - e), ("account+commit", g - f)):
        stage_t.setdefault(k, []).append(v)
async def main(prof):
    for raw in bodies:
        await one(raw)
loop.run_until_complete(main(None))  # warm
stage_t.clear()
loop.run_until_complete(main(None))
for k, v in stage_t.items():
    v.sort(); print(f"{k:16s} median {1e6*v[len(v)//2]:8.1f} us  mean {1e6*sum(v)/len(v):8.1f} us")
pr = cProfile.Profile(); pr.enable(); loop.run_until_complete(main(None)); pr.disable()
pr.dump_stats("/tmp/cpucut/stages.prof")
