"""Diagnostic (session 17, engineer calib; followers3.py with other followers): what do requests sent after a long prompt cost it,
and on whose CPU? On an idle real vLLM (cores split as the fidelity test splits them): A, a
768-token prompt with 32 output tokens, alone (L), and with three followers of 32 tokens
(1 output token) sent D ms after it: D = 2.7 (their intake overlaps A's), 12 (A in its prefill
step), 60 (A decoding). Per case: A's TTFT and decode span (medians over rounds), and the CPU
seconds of every thread of the API server and the engine core, and of the worker, summed over
the case's rounds (/proc/PID/task/TID/stat), per round.

    PYTHONPATH=src:. FIDELITY_VENV=... python followers3.py ROUNDS OUT.json
"""
import asyncio, json, os, statistics as st, sys, tempfile, time
from pathlib import Path
ROOT = Path.cwd()
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
import aiohttp
from bench.calibration import start_real_engine, warm_up
from tests.fidelity import conftest as fid
from tests.fidelity.cores import split_cores, descendants, _comm
from inferplane.physics.probe import Prober, prompt_of, _nonce

CASES = [("L", 0.0, ()), ("S32@5", 5.0, (32, 32, 32)), ("S384-128-32@5", 5.0, (384, 128, 32)), ("S384x3@5", 5.0, (384, 384, 384)), ("S384-128-32@12", 12.0, (384, 128, 32))]
TCK = os.sysconf("SC_CLK_TCK")


def threads(pids):
    out = {}
    for pid in pids:
        pname = _comm(pid)
        for t in Path(f"/proc/{pid}/task").iterdir():
            try:
                stat = (t / "stat").read_text()
                name = (t / "comm").read_text().strip()
            except OSError:
                continue
            f = stat[stat.rindex(")") + 2:].split()
            out[f"{pname}:{name}:{t.name}"] = (int(f[11]) + int(f[12])) / TCK
    return out


async def main(url, rounds, pids):
    p = Prober(url, fid.MODEL)
    ttft = {n: [] for n, _, _ in CASES}
    span = {n: [] for n, _, _ in CASES}
    fol = {n: [] for n, _, _ in CASES}
    cpu = {n: {} for n, _, _ in CASES}
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)

        def req(n, out):
            return p.stream(s, prompt_of(p.words_for(n), _nonce()), out)

        for _ in range(rounds):
            for name, delay, sizes in CASES:
                await asyncio.sleep(0.15)
                before = threads(pids)
                async def follower(n, delay=delay):
                    await asyncio.sleep(delay / 1e3)
                    return (await req(n, 1)).ttft_s
                tasks = [asyncio.ensure_future(follower(n)) for n in sizes]
                a = await req(768, 32)
                got = await asyncio.gather(*tasks)
                await asyncio.sleep(0.05)
                after = threads(pids)
                for k, v in after.items():
                    cpu[name][k] = cpu[name].get(k, 0.0) + v - before.get(k, v)
                ttft[name].append(a.ttft_s)
                span[name].append(a.decode_s)
                if got:
                    fol[name].append(st.median(got))
    for name, _, _ in CASES:
        print(f"{name}: A TTFT {st.median(ttft[name]) * 1e3:.1f} ms (mean {st.mean(ttft[name])*1e3:.1f}), "
              f"A decode span {st.median(span[name]) * 1e3:.1f} ms"
              + (f", followers {st.median(fol[name]) * 1e3:.1f} ms" if fol[name] else ""))
    print("CPU ms per round, by thread (threads with > 0.2 ms in any case):")
    keys = sorted({k for c in cpu.values() for k in c})
    for k in keys:
        vals = [cpu[n].get(k, 0.0) * 1e3 / rounds for n, _, _ in CASES]
        if max(vals) > 0.2:
            print(f"  {k:45s} " + " ".join(f"{v:7.2f}" for v in vals))
    return {"ttft": ttft, "span": span, "followers": fol, "cpu_s": cpu, "cases": CASES}


if __name__ == "__main__":
    rounds = int(sys.argv[1]); out = Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_real_engine(Path(tmp))
        try:
            with split_cores(proc.pid) as cores:
                print("cores", cores, flush=True)
                print("smooth", asyncio.run(warm_up(url)))
                pids = [proc.pid] + descendants(proc.pid)
                print("pids", [(q, _comm(q)) for q in pids])
                res = asyncio.run(main(url, rounds, pids))
                out.write_text(json.dumps(res) + "\n")
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)
