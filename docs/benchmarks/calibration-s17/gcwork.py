"""Diagnostic (session 17, engineer calib): the fidelity workload on the real vLLM with every
request's send time, TTFT and end time, and every garbage collection > 0.3 ms of the vLLM
processes (a sitecustomize hook), to see whether the slow requests line up with collections.

    GCHOOK_DIR=DIR PYTHONPATH=src:. FIDELITY_VENV=... python gcwork.py ROUNDS OUTDIR

(run from the repository root, through the CPU queue; DIR holds gc_sitecustomize.py renamed
sitecustomize.py)
"""
import asyncio, json, os, subprocess, sys, tempfile, time, contextlib
from pathlib import Path
ROOT = Path.cwd()
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
import aiohttp, httpx
from bench.calibration import warm_up
from tests.fidelity import conftest as fid
from tests.fidelity.cores import split_cores, descendants, _comm
from tests.support.procs import free_port
from inferplane.physics.probe import Prober, prompt_of, _nonce


async def workload(url, rounds):
    p = Prober(url, fid.MODEL)
    recs = []
    async with aiohttp.ClientSession(timeout=p.timeout) as s:
        await p.learn_words_per_token(s)
        for r in range(rounds):
            for c in (1, 2, 4):
                todo = [(32, 128, 384, 768)[i % 4] for i in range(12)]
                async def worker(w, todo=todo, c=c):
                    while todo:
                        n = todo.pop()
                        t0 = time.monotonic()
                        st = await p.stream(s, prompt_of(p.words_for(n), _nonce()), 32)
                        recs.append({"round": r, "c": c, "worker": w, "tokens": n, "sent": t0,
                                     "ttft": st.ttft_s, "span": st.decode_s})
                await asyncio.gather(*(worker(w) for w in range(c)))
    return recs


def main():
    rounds, out = int(sys.argv[1]), Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    for f in out.glob("gc-*.log"):
        f.unlink()
    env = fid.vllm_env()
    env["PYTHONPATH"] = os.environ["GCHOOK_DIR"]  # a directory holding gc_sitecustomize.py as sitecustomize.py
    env["GCLOG_DIR"] = str(out)
    port, kv = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp, open(out / "vllm.log", "wb") as log:
        proc = subprocess.Popen(fid.vllm_command(fid.MODEL_DIR, port, kv), stdout=log,
                                stderr=subprocess.STDOUT, env=env, cwd=tmp, start_new_session=True)
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
            with split_cores(proc.pid) as cores:
                print("cores", cores, flush=True)
                print("smooth", asyncio.run(warm_up(url)))
                pids = {q: _comm(q) for q in [proc.pid] + descendants(proc.pid)}
                print("pids", pids)
                t0 = time.monotonic()
                recs = asyncio.run(workload(url, rounds))
                print("workload s", round(time.monotonic() - t0, 1))
                (out / "recs.json").write_text(json.dumps({"recs": recs, "pids": pids}) + "\n")
        finally:
            os.killpg(proc.pid, 15)
            proc.wait(30)


if __name__ == "__main__":
    main()
