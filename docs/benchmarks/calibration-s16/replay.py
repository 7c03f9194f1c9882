"""Offline (session 16, engineer calib): the fidelity workload (`run_workload`, 12 requests per
level) on a checkout's emulator in slow motion (time_scale TS, times scaled back), with the profile
that checkout's fit makes of a stored run's probe points (``refit``) or the stored profile as is
(``stored``); per level the median TTFT (engine ms) against that run's real engine. Kept as run:

    cd CHECKOUT && PYTHONPATH=src:. python docs/benchmarks/calibration-s16/replay.py ROUNDS \
        {refit|stored} REPORT.json...
"""
import asyncio, json, statistics, sys, tempfile
from pathlib import Path
import yaml
from bench.calibration import emulator_fleet, per_level_ms, workload_stats
from tests.fidelity import conftest as fid
from inferplane.config.loader import parse_config
from inferplane.physics.calibration import (fit, fit_frontend, PrefillPoint, DecodePoint,
    BurstPoint, LoadedPoint, dump_profile)
from inferplane.physics.hardware import get_hardware
from inferplane.physics.models import get_model
from inferplane.physics.probe import run_workload
from inferplane.twin.emulator.server import start_emulator

TS = 0.1
ROUNDS = int(sys.argv[1]); refit = sys.argv[2] == "refit"

def profile_text(r):
    text = r["calibration_profile"]
    if not refit:
        return text
    doc = yaml.safe_load(text); c = doc["calibration"]
    pre = [PrefillPoint(p["prompt_tokens"], p["cached_tokens"], p["ttft_s"]) for p in c["prefill"]]
    dec = [DecodePoint(d["batch"], d["context_tokens"], d["itl_s"]) for d in c["decode"]]
    bursts = [BurstPoint(b["size"], b["prompt_tokens"], tuple(b["ttft_s"])) for b in c["bursts"]]
    loaded = [LoadedPoint(p["batch"], p["context_tokens"], p["prompt_tokens"], p["ttft_s"]) for p in c["loaded"]]
    mp = get_model(c["model_profile"])
    cal = fit(get_hardware(doc["hardware"]["base"]), mp, pre, dec, name="cpu-fidelity", tp=c["tp"], precision=c["precision"])
    cal = fit_frontend(cal, mp, bursts, loaded, tp=c["tp"], precision=c["precision"])
    return dump_profile(cal, doc["hardware"]["base"], c)

class Scaled:
    def __init__(self, w):
        self.ttft_s = [t * TS for t in w.ttft_s]; self.tpot_s = [t * TS for t in w.tpot_s]
        self.ttft_level = w.ttft_level; self.tpot_level = w.tpot_level

async def main(f):
    r = json.load(open(f))
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "p.yaml"; p.write_text(profile_text(r))
        h = yaml.safe_load(p.read_text())["hardware"]
        cfg = parse_config(emulator_fleet("cpu-fidelity", 0, p), base_dir=Path(tmp)) if 'base_dir' in parse_config.__code__.co_varnames else parse_config(emulator_fleet("cpu-fidelity", 0, p))
        handle = await start_emulator(cfg, time_scale=TS, port_override={"emu-0": 0})
        try:
            url = handle.urls["emu-0"]
            res = [Scaled(await run_workload(url, fid.MODEL, requests_per_level=12)) for _ in range(ROUNDS)]
        finally:
            await handle.stop()
    lv = per_level_ms(res); real = r["calibration_workload_per_level_ms"]["real"]
    st = workload_stats(res)
    rs = r["calibration_workload_ms"]["real"] if "real" in r["calibration_workload_ms"] else None
    print(Path(f).parent.name, "s %.2f h %.2f t %.3f w %.2f" % tuple(1e3 * h.get(k, 0.0) for k in ("frontend_request_s", "frontend_handoff_s", "frontend_token_s", "request_overhead_s")),
          "| replay vs real ms:", ", ".join(f"{c} {lv[c][0]} / {real[c][0]}" for c in ("c1", "c2", "c4")),
          "| TTFT P50/P90 gap %+.1f / %+.1f %%" % (100 * (st["ttft_p50"] * 1e3 / rs["ttft_p50"] - 1), 100 * (st["ttft_p90"] * 1e3 / rs["ttft_p90"] - 1)) if rs else "")

for f in sys.argv[3:]:
    asyncio.run(main(f))
