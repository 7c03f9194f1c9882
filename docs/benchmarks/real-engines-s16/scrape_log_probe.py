# does an idle vLLM's /metrics still show running/waiting after its requests ended?
import sys, time, json, asyncio, tempfile
from pathlib import Path
sys.path[:0] = ["/work/wt/lead2/src", "/work/wt/lead2"]
import httpx
from bench.peers import real_engines as re_
work = Path(tempfile.mkdtemp(prefix="gauge-"))
try:
    (url, kv), = re_.start_engines(1, 1024, 16, work)
    def page():
        t = httpx.get(url + "/metrics").text
        return [l for l in t.splitlines() if l.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting"))]
    print("start", page())
    async def burst(n, words):
        async with httpx.AsyncClient(timeout=60) as c:
            async def one(i):
                async with c.stream("POST", url + "/v1/completions", json={"model": "tiny-llama", "prompt": " ".join(["hello"] * words) + f" {i}", "max_tokens": 16, "stream": True}) as r:
                    async for _ in r.aiter_bytes(): pass
            await asyncio.gather(*(one(i) for i in range(n)))
    for n in (1, 4, 8):
        asyncio.run(burst(n, 300))
        for dt in (0.0, 0.3, 1.0, 3.0):
            time.sleep(dt)
            print(f"after burst of {n}, +{dt}s:", page())
    import subprocess, yaml
    fleet = re_.fleet_yaml([(url, kv)], 1024, 16, True)
    cfg = yaml.safe_load(fleet); cfg["gateway"]["port"] = 18080
    (work / "fleet.yaml").write_text(yaml.safe_dump(cfg))
    log = work / "scrapes.log"
    gw = subprocess.Popen([sys.executable, "/work/notes/scrapewrap.py", "serve", "--config", str(work / "fleet.yaml"), "--log-level", "warning"],
                          env={**__import__("os").environ, "SCRAPE_LOG": str(log), "PYTHONPATH": "/work/wt/lead2/src"})
    for _ in range(60):
        try:
            if httpx.get("http://127.0.0.1:18080/ready").status_code == 200: break
        except Exception: pass
        time.sleep(1)
    url = "http://127.0.0.1:18080"
    H = {"Authorization": "Bearer sk-h100x8-demo"}
    async def burst2(n, words):
        async with httpx.AsyncClient(timeout=60, headers=H) as c:
            async def one(i):
                async with c.stream("POST", url + "/v1/completions", json={"model": "tiny-llama", "prompt": " ".join(["hello"] * words) + f" {i} {time.time()}", "max_tokens": 16, "stream": True, "stream_options": {"include_usage": True}}) as r:
                    async for _ in r.aiter_bytes(): pass
            await asyncio.gather(*(one(i) for i in range(n)))
    t0 = time.monotonic()
    for k in range(12):
        asyncio.run(burst2(6, 200))
        time.sleep(0.5)
    print("gateway phase", time.monotonic() - t0, "s")
    time.sleep(3)
    gw.terminate(); gw.wait()
    print(log.read_text())
finally:
    re_.stop_engines()
