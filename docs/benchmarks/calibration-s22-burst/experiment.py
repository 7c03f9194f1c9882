"""burst22's real-engine experiment (session 22): the fidelity vLLM, pinned as the fidelity tier
pins it; the calibration probe of bench/calibration.py (5 rounds) with, between its rounds,
2 rounds of:

* lone 96-token requests after four different predecessors (the held-out drift):
  right after `open_connections(3)` (as HeldOut.measure), right after a warm (cached) 16-token
  repeat (as the probe's sweep), after 0.3 s idle, right after a burst of 3 x 320;
* lone 64 / 320 / 640 (each after a warm 16-token repeat);
* bursts of 2, 3 and 4 at 64, 320 and 640 tokens: TTFTs in the order sent and sorted.

Writes experiment.json (every sample, the fitted profile) to the directory given.
    PYTHONPATH=src:. python docs/benchmarks/calibration-s22-burst/experiment.py OUTDIR
"""
import asyncio, json, sys, tempfile, time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "src"), str(ROOT)]
from bench.calibration import PROFILE_NAME, SWEEP, start_real_engine  # noqa: E402
from inferplane.physics.probe import Prober, _nonce, calibrate_endpoint, prompt_of  # noqa: E402
from tests.fidelity import conftest as fid  # noqa: E402
from tests.fidelity.cores import split_cores  # noqa: E402

BURSTS = [(2, 64), (3, 64), (4, 64), (2, 320), (3, 320), (4, 320), (2, 640), (3, 640)]
ROUNDS_PER_PROBE_ROUND = 2


async def lone(p, s, tokens):
    return (await p.stream(s, prompt_of(p.words_for(tokens), _nonce()), 1)).ttft_s


async def warm16(p, s):
    prompt = prompt_of(p.words_for(16), _nonce())
    await p.stream(s, prompt, 1)
    await p.stream(s, prompt, 1)


async def burst(p, s, size, tokens):
    words = p.words_for(tokens)
    got = await asyncio.gather(*(p.stream(s, prompt_of(words, _nonce()), 1) for _ in range(size)))
    return [g.ttft_s for g in got]


async def one_round(p, s, out):
    await p.open_connections(s, 4)
    out["after_openers"].append(await lone(p, s, 96))
    await warm16(p, s)
    out["after_warm"].append(await lone(p, s, 96))
    await asyncio.sleep(0.3)
    out["after_idle"].append(await lone(p, s, 96))
    await burst(p, s, 3, 320)
    out["after_burst"].append(await lone(p, s, 96))
    for n in (64, 320, 640):
        await warm16(p, s)
        out[f"lone_{n}"].append(await lone(p, s, n))
    for size, n in BURSTS:
        await warm16(p, s)
        out[f"burst_{size}x{n}"].append(await burst(p, s, size, n))


def main() -> None:
    dest = Path(sys.argv[1]); dest.mkdir(parents=True, exist_ok=True)
    out = {k: [] for k in ("after_openers", "after_warm", "after_idle", "after_burst",
                           "lone_64", "lone_320", "lone_640")}
    out |= {f"burst_{size}x{n}": [] for size, n in BURSTS}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_real_engine(Path(tmp))
        try:
            with split_cores(proc.pid) as cores:
                p = Prober(url, fid.MODEL)

                async def between(i):
                    async with aiohttp.ClientSession() as s:
                        await p.learn_words_per_token(s)
                        for _ in range(ROUNDS_PER_PROBE_ROUND):
                            await one_round(p, s, out)

                t0 = time.time()
                text, summary = asyncio.run(calibrate_endpoint(
                    url, fid.MODEL, model_profile=fid.MODEL, base="cpu", name=PROFILE_NAME,
                    precision="fp32", prompt_tokens=SWEEP, batches=(1, 2, 4), repeats=5,
                    between_rounds=between))
                out["elapsed_s"] = round(time.time() - t0, 1)
                out["cores"] = cores
        finally:
            import os
            os.killpg(proc.pid, 15)
            proc.wait(30)
    out["profile"], out["summary"] = text, summary
    out["date"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    (dest / "experiment.json").write_text(json.dumps(out, indent=1) + "\n")
    print(summary)
    print({k: sorted(v)[len(v) // 2] for k, v in out.items() if k.startswith(("after", "lone"))})


if __name__ == "__main__":
    main()
