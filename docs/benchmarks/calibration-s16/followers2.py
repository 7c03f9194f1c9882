"""Diagnostic (session 16, engineer calib): where do requests sent after a long prompt delay it?
On an idle real vLLM: A, a 768-token prompt (32 output tokens), alone (L); then A with three
followers of N tokens each (1 output token) sent D ms after it, for N in (32, 768) and D in
(2.7, 12): at 2.7 ms the followers' intake overlaps A's intake (the front end), at 12 ms A is
through the front end (its lone intake ~7 ms) and in its prefill step (~10-13 ms). Prints the
medians of A's TTFT over rounds, and the followers'.

    PYTHONPATH=src:. FIDELITY_VENV=... python docs/benchmarks/calibration-s16/followers2.py 10

(through the CPU queue, with /work/QUIET; it starts the fidelity vLLM itself, cores split as the
fidelity test splits them; writes followers2.json beside it)."""
import asyncio, json, os, statistics as st, sys, tempfile
from pathlib import Path
ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
import aiohttp
from bench.calibration import start_real_engine, warm_up
from tests.fidelity import conftest as fid
from tests.fidelity.cores import split_cores
from inferplane.physics.probe import Prober, prompt_of, _nonce

CASES = [("L", 0, 0.0)] + [(f"F{n}@{d}", n, d) for d in (2.7, 12.0) for n in (32, 768)]


async def main(url, rounds):
    p = Prober(url, fid.MODEL)
    res = {name: [] for name, _, _ in CASES}
    fol = {name: [] for name, _, _ in CASES}
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)

        def req(n, out):
            return p.stream(s, prompt_of(p.words_for(n), _nonce()), out)

        for _ in range(rounds):
            for name, n, delay in CASES:
                async def follower(n=n, delay=delay):
                    await asyncio.sleep(delay / 1e3)
                    return (await req(n, 1)).ttft_s
                tasks = [asyncio.ensure_future(follower()) for _ in range(3 if n else 0)]
                a = await req(768, 32)
                got = await asyncio.gather(*tasks)
                res[name].append(a.ttft_s)
                if got:
                    fol[name].append(st.median(got))
                await asyncio.sleep(0.1)
    for name, _, _ in CASES:
        v = res[name]
        print(f"{name}: A median {st.median(v) * 1e3:.1f} ms"
              + (f", followers {st.median(fol[name]) * 1e3:.1f} ms" if fol[name] else "")
              + f"  all A {[round(t * 1e3, 1) for t in v]}")
    return {"A": res, "followers": fol}


if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 10
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_real_engine(Path(tmp))
        try:
            with split_cores(proc.pid) as cores:
                print("cores", cores, flush=True)
                print("smooth", asyncio.run(warm_up(url)))
                out = asyncio.run(main(url, rounds))
                Path(__file__).with_name("followers2.json").write_text(json.dumps(out) + "\n")
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
