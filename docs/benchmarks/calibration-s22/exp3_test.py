"""calib22 experiment (not committed as a test): TTFT of a fresh prompt alone after a pause,
right after a stream ends, beside one decoding stream, and both (the workload's c2), on the
real vLLM and on the emulator running the profile calibrated against it in the same run."""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from bench.calibration import PROFILE_NAME, SWEEP, emulator_fleet, warm_up
from inferplane.physics.probe import Prober, _nonce, calibrate_endpoint, prompt_of
from tests.fidelity.conftest import MODEL, EngineUnderTest
from tests.fidelity.cores import split_cores
from tests.support.procs import Proc, free_port

pytestmark = pytest.mark.fidelity
ROUNDS = int(os.environ.get("EXP_ROUNDS", "24"))
SIZES = (128, 384)
OUTFILE = Path(os.environ.get("EXP_OUT", "/work/exp/calib22/exp.json"))


@contextlib.contextmanager
def emulator(hardware: str, profile: Path, work: Path) -> Iterator[str]:
    port = free_port()
    fleet = work / "fleet.yaml"
    fleet.write_text(emulator_fleet(hardware, port, profile))
    proc = Proc(["-m", "inferplane.cli", "emulate", "--config", str(fleet), "--log-level",
                 "info"], work / f"emulator-{hardware}.log")
    try:
        url = f"http://127.0.0.1:{port}"
        proc.wait_http(f"{url}/health")
        yield url
    finally:
        proc.stop()


class Meas:
    def __init__(self, url: str) -> None:
        self.p = Prober(url, MODEL)
        self.s: aiohttp.ClientSession | None = None
        self.out: dict[str, list[float]] = {}

    async def open(self) -> None:
        self.s = aiohttp.ClientSession()
        await self.p.learn_words_per_token(self.s)
        await self.p.warm_up(self.s)
        await self.p.open_connections(self.s, 3)

    def put(self, k: str, v: float) -> None:
        self.out.setdefault(k, []).append(round(v * 1e3, 3))

    async def st(self, n: int, out: int, ev: asyncio.Event | None = None):
        assert self.s is not None
        return await self.p.stream(self.s, prompt_of(self.p.words_for(n), _nonce()), out, ev)

    async def round(self) -> None:
        # bursts of two sent together (the first POST started first): does the first one's TTFT
        # grow with the length of the prompt sent right after it?
        await self.st(96, 1)
        self.put("lone64", (await self.st(64, 1)).ttft_s)
        await self.st(96, 1)
        self.put("lone768", (await self.st(768, 1)).ttft_s)
        for first, second in ((64, 64), (64, 768), (768, 64), (768, 384)):
            await self.st(96, 1)
            a, b = await asyncio.gather(self.st(first, 1), self.st(second, 1))
            self.put(f"pair{first}+{second}_first", a.ttft_s)
            self.put(f"pair{first}+{second}_second", b.ttft_s)

    async def close(self) -> None:
        assert self.s is not None
        await self.s.close()


def test_exp(real_engine: EngineUnderTest, tmp_path: Path) -> None:
    res: dict = {}
    with split_cores(real_engine.pid) as cores:
        res["cores"] = cores
        asyncio.run(warm_up(real_engine.url))
        t0 = time.monotonic()
        text, summary = asyncio.run(calibrate_endpoint(
            real_engine.url, MODEL, model_profile=MODEL, base="cpu", name=PROFILE_NAME,
            precision="fp32", prompt_tokens=SWEEP, batches=(1, 2, 4), repeats=5))
        res["calibrate_s"] = round(time.monotonic() - t0, 1)
        res["fit"] = summary.splitlines()
        res["profile"] = text
        prof = tmp_path / "profile.yaml"
        prof.write_text(text)
        with emulator(PROFILE_NAME, prof, tmp_path) as emu_url:

            async def go() -> None:
                real, emu = Meas(real_engine.url), Meas(emu_url)
                await real.open()
                await emu.open()
                for i in range(ROUNDS):
                    for m in ((real, emu) if i % 2 else (emu, real)):
                        await m.round()
                await real.close()
                await emu.close()
                res["real"], res["emu"] = real.out, emu.out

            asyncio.run(go())
        log = (tmp_path / f"emulator-{PROFILE_NAME}.log")
        res["emu_log"] = log.read_text()[-2000:] if log.exists() else ""
    res["summary"] = {
        side: {k: round(statistics.median(v), 3) for k, v in res[side].items()}
        for side in ("real", "emu")
    }
    OUTFILE.parent.mkdir(parents=True, exist_ok=True)
    OUTFILE.write_text(json.dumps(res, indent=1))
    print(json.dumps(res["summary"], indent=1))
    print("\n".join(res["fit"]))
