"""The after-stream prefill cost (``HardwareProfile.after_stream_s`` and
``after_stream_factor``): the probe measures it, the fit finds it, the profile file keeps it only
when there is one, the engine model (the emulator's and the simulator's) adds it to a step that
prefills after a step that only decoded; and a calibrated CPU profile claims the peak its fit
achieved, not the table's server's."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.loader import load_config
from inferplane.physics import Roofline
from inferplane.physics.calibration import (
    AFTER_STREAM_FLOOR,
    PrefillPoint,
    achieved_peak,
    dump_profile,
    fit,
    fit_after_stream,
    load_hardware_profile,
    predict_loaded_ttft_s,
    predict_ttft_s,
)
from inferplane.physics.hardware import get_hardware
from inferplane.physics.models import get_model
from inferplane.physics.probe import AFTER_STREAM_TOKENS, Prober, ProbeResult, calibrate_endpoint
from inferplane.twin.engine.model import Engine, EngineConfig, EngineRequest
from inferplane.twin.simulator.simulator import simulate
from inferplane.twin.traces.loader import TraceRequest
from tests.support.fake_completions import fake_completions
from tests.test_calibration import _FlatCost, _fleet, _synthetic
from tests.test_calibration import _probe_result as _gpu_probe_result

MODEL = get_model("tiny-llama")


def _cpu_cal(after_s: float = 0.0, factor: float = 0.0):  # type: ignore[no-untyped-def]
    """A CPU calibration fitted to known factors, and after-stream points of the given cost."""
    base, _, pre, dec = _synthetic("cpu", "tiny-llama", 256)
    cal = fit(base, MODEL, pre, dec, name="cpu-lab")
    truth = dataclasses.replace(cal.hardware, after_stream_s=after_s, after_stream_factor=factor)
    r = Roofline(truth, MODEL)
    after = [PrefillPoint(p.prompt_tokens, 0, predict_ttft_s(r, p.prompt_tokens,
                                                              after_stream=True))
             for p, _ in cal.prefill if not p.cached_tokens]
    return cal, after


@pytest.mark.parametrize(("after_s", "factor"), [(2e-3, 0.2), (0.0, 0.25), (1.5e-3, 0.0)])
def test_fit_after_stream_recovers_a_constant_and_a_share_of_the_step(
    after_s: float, factor: float
) -> None:
    cal, after = _cpu_cal(after_s, factor)
    out = fit_after_stream(cal, MODEL, after)
    h = out.hardware
    assert h.after_stream_s == pytest.approx(after_s, abs=1e-6)
    assert h.after_stream_factor == pytest.approx(factor, abs=1e-3)
    for p, fitted in out.after_stream:
        assert fitted == pytest.approx(p.ttft_s, rel=1e-3)
    # nothing else moves
    assert dataclasses.replace(h, after_stream_s=0.0, after_stream_factor=0.0) == cal.hardware


def test_fit_after_stream_writes_none_under_the_floor_or_when_faster() -> None:
    """An extra under `AFTER_STREAM_FLOOR` of the cold time (noise), or after-stream tries that
    came faster, is no term; so is a sweep with fewer than two matching lengths."""
    cal, _ = _cpu_cal()
    cold = [p for p, _ in cal.prefill if not p.cached_tokens]
    for scale in (1 + AFTER_STREAM_FLOOR / 2, 0.9):
        after = [dataclasses.replace(p, ttft_s=p.ttft_s * scale) for p in cold]
        h = fit_after_stream(cal, MODEL, after).hardware
        assert (h.after_stream_s, h.after_stream_factor) == (0.0, 0.0)
    one = [dataclasses.replace(cold[0], ttft_s=cold[0].ttft_s * 1.3)]
    assert fit_after_stream(cal, MODEL, one).hardware.after_stream_factor == 0.0
    assert fit_after_stream(cal, MODEL, []).after_stream == ()


def test_a_loaded_request_pays_the_after_stream_cost_in_its_prediction() -> None:
    cal, _ = _cpu_cal()
    hw = cal.hardware
    slow = dataclasses.replace(hw, after_stream_s=1e-3, after_stream_factor=0.1)
    plain = predict_loaded_ttft_s(Roofline(hw, MODEL), 2, 100, 64)
    step = Roofline(hw, MODEL).step_time_s(64, 0, 2, 200)
    assert predict_loaded_ttft_s(Roofline(slow, MODEL), 2, 100, 64) == pytest.approx(
        plain + 1e-3 + 0.1 * step)


def test_profile_file_keeps_the_after_stream_cost_only_when_there_is_one(
    tmp_path: Path,
) -> None:
    cal, after = _cpu_cal(2e-3, 0.2)
    path = tmp_path / "p.yaml"
    path.write_text(dump_profile(cal, "cpu", {}))
    assert "after_stream" not in path.read_text()
    assert load_hardware_profile(path).after_stream_factor == 0.0
    path.write_text(dump_profile(fit_after_stream(cal, MODEL, after), "cpu", {}))
    doc = yaml.safe_load(path.read_text())
    assert doc["hardware"]["after_stream_s"] == pytest.approx(2e-3, abs=1e-6)
    assert len(doc["calibration"]["after_stream"]) == len(after)
    hw = load_hardware_profile(path)
    assert (hw.after_stream_s, hw.after_stream_factor) == pytest.approx((2e-3, 0.2), abs=1e-3)
    with pytest.raises(ValueError, match="latencies"):
        dataclasses.replace(hw, after_stream_factor=-0.1)


def _engine(after_s: float, factor: float) -> tuple[Engine, list[float]]:
    return Engine(EngineConfig(num_gpu_blocks=64, block_size=16), _FlatCost(),
                  after_stream_s=after_s, after_stream_factor=factor), []


@pytest.mark.parametrize("many", [False, True])
def test_the_engine_model_adds_the_cost_to_a_prefill_after_decode_steps(many: bool) -> None:
    """Steps of 10 ms, ``after_stream_s`` 1 ms and a factor of 0.5: a request after a
    one-token request's prefill pays nothing, one after a stream (decode steps since the last
    prefill, stepped one by one or fast-forwarded by ``step_many``) 6 ms, one that joins a
    decoding stream too (its mixed step), and a prefill right after another prefill nothing;
    without the term no step does."""

    def run(after_s: float, factor: float) -> list[float]:
        e, prefills = _engine(after_s, factor)
        now = 0.0

        def add(name: str, out: int) -> None:
            e.add_request(EngineRequest(name, list(range(1, 33)), out, arrival_time=now), now)

        def step() -> float:
            nonlocal now
            d = (e.step_many(now) if many else e.step(now)).duration_s
            now += d
            return round(d, 6)

        add("one", 1)
        prefills.append(step())  # a lone prefill step: its only token
        add("after-one", 4)
        prefills.append(step())  # a prefill after a prefill
        while e.has_unfinished():
            step()  # its decode steps
        add("after-stream", 6)
        prefills.append(step())  # a prefill after decode steps
        step()  # one decode
        add("joins", 2)
        prefills.append(step())  # its prefill beside the stream's decode: after a decode step
        return prefills

    assert run(0.0, 0.0) == [0.01] * 4
    assert run(0.001, 0.5) == [0.01, 0.01, 0.016, 0.016]


@pytest.mark.parametrize(("wake_s", "expected"), [(0.003, 0.016), (0.009, 0.019)])
def test_after_an_idle_stretch_a_prefill_pays_the_larger_of_wake_and_after_stream(
    wake_s: float, expected: float,
) -> None:
    """Steps of 10 ms, ``after_stream_s`` 1 ms and a factor of 0.5 (6 ms after a stream): a
    request that arrives 10 s after a 32-token stream ended pays the larger of the idle wake
    and the after-stream cost, not their sum (the probe measures neither after the other); a
    request that arrives right after the stream pays the after-stream cost alone."""
    e = Engine(EngineConfig(num_gpu_blocks=64, block_size=16), _FlatCost(),
               after_stream_s=0.001, after_stream_factor=0.5, idle_wake_s=wake_s)
    now = 0.0

    def serve(name: str, out: int) -> float:
        nonlocal now
        e.add_request(EngineRequest(name, list(range(1, 33)), out, arrival_time=now), now)
        first = e.step(now).duration_s
        now += first
        while e.has_unfinished():
            now += e.step(now).duration_s
        return round(first, 6)

    serve("stream", 32)
    assert serve("next", 32) == 0.016  # right after the stream: no wake
    now += 10.0
    assert serve("after-idle", 1) == expected


def test_the_simulator_takes_the_profiles_after_stream_cost(tmp_path: Path) -> None:
    """A closed loop's next request (arriving as the previous 4-token stream ends) on a
    profile with an after-stream cost reaches its first token that much later than on the same
    profile without it; the first request (a fresh engine) does not."""
    cal, _ = _cpu_cal()
    ttfts: dict[float, list[float]] = {}
    for after_s in (0.0, 0.004):
        c = dataclasses.replace(cal, hardware=dataclasses.replace(
            cal.hardware, after_stream_s=after_s))
        (tmp_path / "profile.yaml").write_text(dump_profile(c, "cpu", {"model": "m"}))
        fleet_file = tmp_path / "fleet.yaml"
        fleet_file.write_text(_fleet("cpu-lab", emulation={"num_gpu_blocks": 256}))
        trace = [TraceRequest(0.0, 64, 8), TraceRequest(0.02, 64, 4)]
        sim = simulate(load_config(fleet_file), trace, "round-robin")
        ttfts[after_s] = [r.ttft_s or 0.0 for r in sorted(sim.records,
                                                           key=lambda r: r.arrival_s)]
    assert ttfts[0.004][0] == pytest.approx(ttfts[0.0][0], abs=1e-9)
    assert ttfts[0.004][1] - ttfts[0.0][1] == pytest.approx(0.004, abs=1e-9)


async def test_the_probe_measures_each_length_again_right_after_a_stream() -> None:
    """A fake engine that prefills 1.5x slower per word right after a stream: the after-stream
    points hold the slower prefill, the cold ones the faster, and the fit turns their
    differences into the profile's term."""
    per_word = 50e-6
    async with fake_completions(token_gap_s=0.0002, prefill_s_per_word=per_word,
                                after_stream_factor=1.5) as (url, fake):
        result = await Prober(url, "m").run(
            (16, 768), (1,), decode_tokens=4, long_decode_prompt_tokens=0, repeats=2,
            prefill_visits=1, warm_up_max_s=0.0, require_smooth=False, idle_tries=0,
            after_stream_tokens=4)
    after = {p.prompt_tokens: p.ttft_s for p in result.after_stream}
    cold = {p.prompt_tokens: p.ttft_s for p in result.prefill}
    assert set(after) == set(cold) and len(result.after_stream_tries_s[768]) == 2
    # which tries the fake served right after a stream (its flags, no timing): the after-stream
    # ones all, the 768-token cold and cached ones none
    served = [a for (w, m, _), a in zip(fake.requests, fake.after_stream, strict=True)
              if (w, m) == (768, 1)]
    assert served == [False, False, True] * 2, served  # cold, cached, after a stream
    # a lower bound the fake's sleeps guarantee (the slower prefill), not a difference of times
    assert after[768] >= 1.5 * 768 * per_word


def _probe_result(after: list[PrefillPoint]) -> ProbeResult:
    _, _, pre, dec = _synthetic("cpu", "tiny-llama", 256)
    return ProbeResult(prefill=pre, decode=dec, after_stream=after,
                       after_stream_tries_s={p.prompt_tokens: [p.ttft_s] for p in after})


CALIBRATE = ["calibrate", "--endpoint", "http://127.0.0.1:9", "--model", "tiny-llama"]


@pytest.mark.parametrize(("args", "tokens"),
                         [((), AFTER_STREAM_TOKENS), (("--after-stream-tokens", "0"), 0)])
def test_calibrate_command_fits_the_after_stream_cost(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, args: tuple[str, ...], tokens: int,
) -> None:
    """``--after-stream-tokens`` reaches the probe (default `AFTER_STREAM_TOKENS`); with tries
    the profile holds the fitted term and the tries, with 0 neither."""
    _, after = _cpu_cal(1e-3, 0.2)
    seen: list[object] = []

    async def run(self: Prober, *a: object, **kwargs: object) -> ProbeResult:
        seen.append(kwargs["after_stream_tokens"])
        return _probe_result(after if kwargs["after_stream_tokens"] else [])

    monkeypatch.setattr(Prober, "run", run)
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(app, [*CALIBRATE, "--out", str(out), *args])
    assert result.exit_code == 0, result.output
    assert seen == [tokens]
    doc = yaml.safe_load(out.read_text())
    assert ("after_stream_factor" in doc["hardware"]) is bool(tokens)
    assert ("after_stream_tries_ms" in doc["calibration"]) is bool(tokens)
    assert doc["calibration"].get("after_stream_tokens", 0) == tokens
    if tokens:
        hw = load_hardware_profile(out)
        assert hw.after_stream_factor == pytest.approx(0.2, abs=0.02)
        assert "after stream" in result.output
    # the summary names the achieved peak (a CPU profile's efficiency is always 1)
    assert f"peak {yaml.safe_load(out.read_text())['hardware']['peak_flops'] / 1e9:.4g} GFLOP/s" \
        in result.output


def test_calibrate_command_refuses_one_after_stream_token(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    """``--after-stream-tokens 1`` passes the option's minimum but streams nothing: refused by
    its flag's name before any probe."""

    async def run(self: Prober, *a: object, **kwargs: object) -> ProbeResult:
        raise AssertionError("probed")

    monkeypatch.setattr(Prober, "run", run)
    out = tmp_path / "p.yaml"
    result = CliRunner().invoke(app, [*CALIBRATE, "--out", str(out), "--after-stream-tokens",
                                      "1"])
    assert result.exit_code == 2 and not out.exists()
    assert "--after-stream-tokens" in result.output and "after_stream_tokens" not in result.output


async def test_a_calibrated_cpu_profile_claims_the_peak_its_fit_achieved(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The table's ``cpu`` peak is a two-socket server's 200 TFLOP/s: the profile of the probed
    machine holds the FLOP/s its fit achieved (the table's peak times the fitted efficiency,
    efficiency 1), which prices every step the same. A GPU profile keeps its vendor's peak."""

    async def run(self: Prober, *a: object, **kwargs: object) -> ProbeResult:
        return _probe_result([])

    monkeypatch.setattr(Prober, "run", run)
    text, _ = await calibrate_endpoint("http://127.0.0.1:9", "m", model_profile="tiny-llama",
                                       base="cpu", name="lab", precision="fp32")
    doc = yaml.safe_load(text)["hardware"]
    base, _, pre, dec = _synthetic("cpu", "tiny-llama", 256)
    fitted = fit(base, MODEL, pre, dec, name="lab", precision="fp32").hardware
    assert doc["compute_efficiency"] == 1.0
    assert doc["peak_flops"] == pytest.approx(fitted.peak_flops * fitted.compute_efficiency)
    assert doc["peak_flops"] < base.peak_flops / 2
    same = achieved_peak(fitted)
    for n in (16, 768):
        assert Roofline(same, MODEL, 1, "fp32").step_time_s(n, 0, 0, 0) == pytest.approx(
            Roofline(fitted, MODEL, 1, "fp32").step_time_s(n, 0, 0, 0), rel=1e-12)
    monkeypatch.setattr(Prober, "run", gpu_run)
    text, _ = await calibrate_endpoint("http://127.0.0.1:9", "m", model_profile="llama-3.1-8b",
                                       base="l4", name="lab")
    assert yaml.safe_load(text)["hardware"]["peak_flops"] == get_hardware("l4").peak_flops


async def gpu_run(self: Prober, *a: object, **kwargs: object) -> ProbeResult:
    return _gpu_probe_result(())


async def test_the_emulator_runs_the_profiles_after_stream_cost(tmp_path: Path) -> None:
    """The emulator's engine model gets the profile's after-stream cost (the engine model's
    own test shows what it does with it)."""
    from inferplane.twin.emulator.server import start_emulator

    cal, after = _cpu_cal(1e-3, 0.2)
    (tmp_path / "profile.yaml").write_text(
        dump_profile(fit_after_stream(cal, MODEL, after), "cpu", {"model": "m"}))
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(_fleet("cpu-lab", emulation={"num_gpu_blocks": 256}))
    handle = await start_emulator(load_config(fleet_file), port_override={"lab-0": 0})
    try:
        engine = handle.endpoints["lab-0"].engine
        assert (engine.after_stream_s, engine.after_stream_factor) == pytest.approx(
            (1e-3, 0.2), abs=1e-3)
    finally:
        await handle.stop()
