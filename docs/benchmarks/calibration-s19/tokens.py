"""Diagnostic (session 19, engineer calib): the fidelity workload on the real vLLM with every
chunk's arrival time, so that a stream's time per output token can be split into its steps —
which gaps are slow, and whether another request's prefill ran in them — and the decode
probe's batches (1, 2, 4 streams of 64 tokens, 32-token prompts) the same way.

    PYTHONPATH=src:. FIDELITY_VENV=... python docs/benchmarks/calibration-s19/tokens.py ROUNDS OUT.json

(run from the repository root, through the CPU queue, holding /work/QUIET)
"""
import asyncio, contextlib, json, os, subprocess, sys, tempfile, time
from pathlib import Path
ROOT = Path.cwd()
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
import aiohttp, httpx, orjson
from bench.calibration import warm_up
from tests.fidelity import conftest as fid
from tests.fidelity.cores import OtherCpu, split_cores
from tests.support.procs import free_port
from inferplane.physics.probe import Prober, prompt_of, _nonce


async def stream(p, s, prompt, max_tokens):
    body = {"model": p.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True,
            "min_tokens": max_tokens}
    t0 = time.monotonic()
    chunks = []  # (s after send, words of text)
    usage = None
    async with s.post(f"{p.url}/v1/completions", data=orjson.dumps(body), headers=p.headers) as r:
        async for raw in r.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            now = time.monotonic()
            c = orjson.loads(line[5:])
            if isinstance(c.get("usage"), dict):
                usage = c["usage"]
            ch = c.get("choices") or []
            if ch and (ch[0].get("text") or ch[0].get("finish_reason")):
                chunks.append((round(now - t0, 6), len((ch[0].get("text") or "").split())))
    return {"sent": t0, "chunks": chunks, "prompt_tokens": usage["prompt_tokens"],
            "completion_tokens": usage["completion_tokens"]}


async def run(url, rounds):
    p = Prober(url, fid.MODEL)
    recs, probes = [], []
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)
        for r in range(rounds):
            for c in (1, 2, 4):
                todo = [(32, 128, 384, 768)[i % 4] for i in range(12)]

                async def worker(w, todo=todo, c=c):
                    while todo:
                        n = todo.pop()
                        st = await stream(p, s, prompt_of(p.words_for(n), _nonce()), 32)
                        recs.append({"round": r, "c": c, "worker": w, "tokens": n, **st})
                await asyncio.gather(*(worker(w) for w in range(c)))
            for b in (1, 2, 4):  # the decode probe's batches, 32-token prompts, 64 tokens
                got = await asyncio.gather(*(stream(p, s, prompt_of(p.words_for(32), _nonce()),
                                                    64) for _ in range(b)))
                probes += [{"round": r, "batch": b, **g} for g in got]
    return recs, probes


def main():
    rounds, out = int(sys.argv[1]), Path(sys.argv[2])
    port, kv = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp, open(out.with_suffix(".vllm.log"), "wb") as log:
        proc = subprocess.Popen(fid.vllm_command(fid.MODEL_DIR, port, kv), stdout=log,
                                stderr=subprocess.STDOUT, env=fid.vllm_env(), cwd=tmp,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("vLLM did not start")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                        break
                time.sleep(0.5)
            import os
            with split_cores(proc.pid) as cores:
                print("cores", cores, "smooth", asyncio.run(warm_up(url)), flush=True)
                t0 = time.monotonic()
                other = OtherCpu(os.getpid())
                recs, probes = asyncio.run(run(url, rounds))
                oc = other.cpus()
                print("s", round(time.monotonic() - t0, 1), "other CPU", oc, flush=True)
            out.write_text(json.dumps({"recs": recs, "probes": probes, "cores": str(cores),
                                       "other_cpu": oc}) + "\n")
        finally:
            import os, signal
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(30)


if __name__ == "__main__":
    main()
