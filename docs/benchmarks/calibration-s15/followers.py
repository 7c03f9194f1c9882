"""Diagnostic: the c4 round-2 situation on the real vLLM, pieces apart.
E1 lone 768 (32 out); E2 c4-like burst (768,384,128,32; 32 out), then when the 768 stream ends
send a new 768 (no followers); E3 the same, and when each of the 3 others ends send 384/128/32
(the workload's round 2); E4 3 streams (32-tok, 96 out) decoding, 768 sent after their 10th token;
E5 a lone 768 (32 out) stream, then at its end a new 768.
Prints medians of the new 768's TTFT (and E3's followers') over rounds.

Session 15 (engineer calib), kept as run: through the CPU queue,
    PYTHONPATH=src:. FIDELITY_VENV=... python docs/benchmarks/calibration-s15/followers.py 12
(it starts the fidelity vLLM itself, cores split as the fidelity test splits them; writes
followers.json beside it)."""
import asyncio, json, os, statistics as st, sys, tempfile, time
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
import aiohttp
from bench.calibration import start_real_engine, warm_up
from tests.fidelity import conftest as fid
from tests.fidelity.cores import split_cores, descendants
from inferplane.physics.probe import Prober, prompt_of, _nonce

def cpu(pid):
    f = open(f"/proc/{pid}/stat").read(); x = f[f.rindex(")")+2:].split()
    return (int(x[11]) + int(x[12])) / os.sysconf("SC_CLK_TCK")

async def main(url, pids, rounds):
    p = Prober(url, fid.MODEL)
    res = {k: [] for k in ("E1", "E2", "E3", "E3f", "E4", "E5", "E3first")}
    cpu_per = {}
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)
        def req(n, out=32, ev=None):
            return p.stream(s, prompt_of(p.words_for(n), _nonce()), out, ev)
        for r in range(rounds):
            # E1
            c0 = {k: cpu(v) for k, v in pids.items()}
            x = await req(768); res["E1"].append(x.ttft_s)
            await asyncio.sleep(0.05)
            # E2 / E3
            for name, follow in (("E2", False), ("E3", True)):
                got = {}
                async def lead():
                    a = await req(768)
                    t0 = time.perf_counter(); b = await req(768)
                    got["lead"] = b.ttft_s; got["first"] = a.ttft_s
                async def other(n):
                    await req(n)
                    if follow:
                        f = await req(n); got.setdefault("f", []).append(f.ttft_s)
                await asyncio.gather(lead(), other(384), other(128), other(32))
                res[name].append(got["lead"])
                if follow:
                    res["E3f"].append(st.median(got["f"])); res["E3first"].append(got["first"])
                await asyncio.sleep(0.05)
            # E4
            evs = [asyncio.Event() for _ in range(3)]
            cnt = {}
            tasks = [asyncio.ensure_future(req(32, 96, e)) for e in evs]
            await asyncio.gather(*(e.wait() for e in evs)); await asyncio.sleep(0.035)
            x = await req(768); res["E4"].append(x.ttft_s)
            await asyncio.gather(*tasks)
            await asyncio.sleep(0.05)
            # E5
            await req(768); x = await req(768); res["E5"].append(x.ttft_s)
            await asyncio.sleep(0.05)
    for k, v in res.items():
        if v: print(f"{k}: median {st.median(v)*1e3:.1f} ms  all {[round(t*1e3,1) for t in v]}")
    return res

if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_real_engine(Path(tmp))
        try:
            with split_cores(proc.pid) as cores:
                print("cores", cores, flush=True)
                print("smooth", asyncio.run(warm_up(url)))
                pids = {"api": proc.pid}
                res = asyncio.run(main(url, pids, rounds))
                json.dump(res, open(Path(__file__).with_name("followers.json"), "w"))
        finally:
            os.killpg(proc.pid, 15); proc.wait(30)
