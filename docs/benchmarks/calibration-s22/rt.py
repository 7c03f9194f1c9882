"""calib22: the emulator's HTTP round-trip measurement as it is, against one whose handler sends
its headers before the wait (as the emulator's streaming handler does before the engine's step)."""
import asyncio, statistics, time, json, sys
import aiohttp
from aiohttp import web
from inferplane.twin.emulator import server as srv

WAIT = srv.ROUND_TRIP_WAIT_S

async def rt(headers_first: bool, samples: int = 15) -> float:
    async def answer(request):
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        if headers_first:
            await resp.prepare(request)
        await asyncio.sleep(WAIT)
        if not headers_first:
            await resp.prepare(request)
        await resp.write(b'data: {"choices": [{"index": 0, "text": " the"}]}\n\n')
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp
    app = web.Application(); app.router.add_post("/rt", answer)
    runner = web.AppRunner(app, access_log=None); await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0); await site.start()
    url = f"http://127.0.0.1:{int(runner.addresses[-1][1])}/rt"
    body = b'{"model": "m", "prompt": "' + b"the " * 64 + b'", "stream": true}'
    times = []
    async with aiohttp.ClientSession() as s:
        for i in range(samples + 3):
            t0 = time.perf_counter(); first = None
            async with s.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                async for line in r.content:
                    if first is None and line.startswith(b"data:"):
                        first = time.perf_counter() - t0 - WAIT
            if i >= 3: times.append(first)
    await runner.cleanup()
    return statistics.median(times)

async def main():
    out = {"as_is": [], "headers_first": [], "module": []}
    for _ in range(8):
        out["as_is"].append(await rt(False))
        out["headers_first"].append(await rt(True))
        out["module"].append(await srv.measure_http_round_trip_s())
    print(json.dumps({k: [round(x * 1e3, 3) for x in v] for k, v in out.items()}))
    print({k: round(statistics.median(v) * 1e3, 3) for k, v in out.items()})

asyncio.run(main())
