"""bench/calibration.py's report helpers (no engine needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import bench.calibration as calibration
from bench.calibration import (
    HeldOut,
    per_level_ms,
    per_size_ms,
    pooled_stats,
    real_vs_real,
    share,
    workload_stats,
)
from inferplane.physics.probe import WorkloadResult, run_workload
from tests.support.fake_completions import fake_completions


def _round(ttft: dict[int, list[float]], tpot: dict[int, list[float]]) -> WorkloadResult:
    r = WorkloadResult()
    for c, xs in ttft.items():
        r.ttft_s += xs
        r.ttft_level += [c] * len(xs)
    for c, xs in tpot.items():
        r.tpot_s += xs
        r.tpot_level += [c] * len(xs)
    return r


def test_per_level_keeps_levels_apart_when_a_stream_has_no_tpot() -> None:
    # level 1's first stream came in one burst (no TPOT): a positional slice of 3 per level
    # would give level 1 [0.001, 0.001, 0.002] and level 2 [0.002, 0.002, 0.004]
    r = _round({1: [0.010] * 3, 2: [0.020] * 3, 4: [0.040] * 3},
               {1: [0.001, 0.001], 2: [0.002] * 3, 4: [0.004] * 3})
    assert per_level_ms([r, r]) == {"c1": [10.0, 1.0], "c2": [20.0, 2.0], "c4": [40.0, 4.0]}


def test_per_level_takes_the_median_over_rounds() -> None:
    rounds = [_round({1: [t]}, {1: [t / 10]}) for t in (0.010, 0.030, 0.020)]
    assert per_level_ms(rounds, levels=(1,)) == {"c1": [20.0, 2.0]}


def test_a_level_without_samples_reads_none_instead_of_failing() -> None:
    # the last level's streams all came in one burst in one round, and in every round in the other
    a = _round({1: [0.010], 2: [0.020]}, {1: [0.001], 2: [0.002]})
    b = _round({1: [0.010], 2: [0.030]}, {1: [0.001]})
    assert per_level_ms([a, b], levels=(1, 2)) == {"c1": [10.0, 1.0], "c2": [25.0, 2.0]}
    assert per_level_ms([b], levels=(1, 2, 4)) == {
        "c1": [10.0, 1.0], "c2": [30.0, None], "c4": [None, None]}


def _sized(level: int, ttft: dict[int, list[float]]) -> WorkloadResult:
    r = WorkloadResult()
    for n, xs in ttft.items():
        r.ttft_s += xs
        r.ttft_level += [level] * len(xs)
        r.ttft_prompt += [n] * len(xs)
    return r


def test_per_size_splits_a_level_by_prompt_size() -> None:
    """At concurrency 2 the workload's closed loop sends its prompts in pairs (768 with 384,
    then 128 with 32): the level's median (12 requests) is the mean of the 6th and 7th, which
    fall on either side of the gap between the pairs; by size each shows apart, each the median
    over rounds of that round's median. The 768's rounds are lopsided so that this statistic
    (round medians 30, 31, 60: 31.0) differs from the median of all 9 samples pooled (32.0)."""
    rounds = [_sized(2, {768: [0.030, 0.030, 0.060], 384: [0.050] * 3, 128: [0.018] * 3,
                         32: [0.017] * 3}),
              _sized(2, {768: [0.031, 0.031, 0.060], 384: [0.056] * 3, 128: [0.020] * 3,
                         32: [0.019] * 3}),
              _sized(2, {768: [0.032, 0.060, 0.060], 384: [0.052] * 3, 128: [0.016] * 3,
                         32: [0.015] * 3})]
    assert per_size_ms(rounds) == {"c2": {"32": 17.0, "128": 18.0, "384": 52.0, "768": 31.0}}
    assert per_level_ms(rounds, levels=(2,))["c2"][0] == 24.0  # (18 + 30) / 2 in round 1
    one = _sized(1, {32: [0.010]})
    one.ttft_s.append(0.020)
    one.ttft_level.append(4)
    one.ttft_prompt.append(768)
    assert per_size_ms([one]) == {"c1": {"32": 10.0}, "c4": {"768": 20.0}}


async def test_workload_records_the_prompt_size_of_each_request() -> None:
    """`run_workload` keeps the prompt size each TTFT was sent with, in the order of the TTFTs
    (the fake engine counts one token per word, so its record of the requests says which
    size each was): at concurrency 1 the requests go one after the other."""
    async with fake_completions() as (url, fake):
        res = await run_workload(url, "m", prompt_tokens=(32, 128, 384), concurrency=(1,),
                                 requests_per_level=5)
    sent = [words for words, max_tokens, _ in fake.requests if max_tokens > 1]
    assert res.ttft_prompt == sent == [128, 32, 384, 128, 32]
    assert res.ttft_level == [1] * 5



async def test_workload_keeps_the_prompt_size_with_its_ttft_when_requests_finish_out_of_order(
) -> None:
    """At concurrency 2 the two workers send a 768- and a 32-word prompt together; the fake
    engine answers the longer one later, so the 32 finishes first. Each prompt size must stay
    with the TTFT of the request it was sent with (recorded when it finishes), not the order
    the sizes were taken from the queue."""
    per_word = 0.0004  # 768 words: 0.31 s before the first token, 32 words: 0.013 s
    async with fake_completions(prefill_s_per_word=per_word) as (url, fake):
        res = await run_workload(url, "m", prompt_tokens=(32, 768), concurrency=(2,),
                                 requests_per_level=2)
    sent = [words for words, max_tokens, _ in fake.requests if max_tokens > 1]
    assert sorted(sent) == [32, 768]
    assert res.ttft_prompt == [32, 768]  # finish order; the queue hands out the 768 first
    assert res.ttft_level == [2, 2]
    for n, ttft in zip(res.ttft_prompt, res.ttft_s, strict=True):
        assert n * per_word <= ttft < n * per_word + 0.25


def test_share_spreads_rounds_over_the_probe_rounds() -> None:
    assert [share(15, 5, i) for i in range(5)] == [3, 3, 3, 3, 3]
    assert [share(3, 5, i) for i in range(5)] == [1, 1, 1, 0, 0]  # the 3 rounds until session 10
    # the held-out repeats until session 22
    assert [share(7, 5, i) for i in range(5)] == [2, 2, 1, 1, 1]
    assert sum(share(12, 5, i) for i in range(5)) == 12


def _uniform(ttft: float, tpot: float, n: int = 10) -> WorkloadResult:
    return _round({1: [ttft * (1 + i / 100) for i in range(n)]},
                  {1: [tpot * (1 + i / 100) for i in range(n)]})


def test_control_compares_the_odd_rounds_with_the_even_rounds() -> None:
    # even rounds at 10 ms, odd rounds at 12 ms: the halves are 20 % apart
    rounds = [_uniform(0.010 if i % 2 == 0 else 0.012, 0.002) for i in range(6)]
    got = real_vs_real(rounds)
    assert got is not None
    assert got["ttft_p50"] == pytest.approx(0.2)
    assert got["ttft_p90"] == pytest.approx(0.2)
    assert got["tpot_p50"] == pytest.approx(0.0)
    # an engine that agrees with itself: 0 everywhere; one round: no control
    same = real_vs_real([_uniform(0.010, 0.002)] * 4)
    assert same is not None and all(v == pytest.approx(0.0) for v in same.values())
    assert real_vs_real(rounds[:1]) is None


def test_control_takes_the_statistic_it_is_given() -> None:
    rounds = [_uniform(0.010, 0.002), _uniform(0.010, 0.002), _uniform(0.010, 0.002),
              _uniform(0.030, 0.002)]
    # medians over rounds: the odd half is (10, 30) ms -> 20 ms; pooled: P50 of 10..30 ms
    by_rounds = real_vs_real(rounds)
    pooled = real_vs_real(rounds, pooled_stats)
    assert by_rounds is not None and pooled is not None
    assert by_rounds["ttft_p50"] == pytest.approx(1.0)  # 20.9 ms against 10.45 ms
    assert by_rounds["ttft_p90"] == pytest.approx(1.0)
    assert pooled["ttft_p90"] == pytest.approx(32.13 / 10.81 - 1, rel=1e-3)  # the 30 ms round's


def test_pooled_percentiles_count_every_request_of_every_round() -> None:
    # one slow round among four: its requests are a quarter of the pool, so the pooled P90
    # comes from it while the median over rounds' P90s does not
    rounds = [_uniform(0.010, 0.002)] * 3 + [_uniform(0.050, 0.004)]
    pooled, by_rounds = pooled_stats(rounds), workload_stats(rounds)
    assert by_rounds["ttft_p90"] == pytest.approx(0.010 * 1.081)
    assert pooled["ttft_p90"] > 0.049
    assert pooled["ttft_p50"] == pytest.approx(0.010 * 1.06)  # the fast rounds' middle
    assert pooled["tpot_p90"] == pytest.approx(0.004 * 1.051)


def test_real_rounds_default_to_rounds_only_when_not_given(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: list[tuple[int, int]] = []

    def fake(url: str, work: Path, **kw: Any) -> dict[str, Any]:
        seen.append((kw["rounds"], kw["real_rounds"]))
        return {}

    monkeypatch.setattr(calibration, "_compare", fake)
    calibration.compare("http://x", tmp_path, rounds=6)
    calibration.compare("http://x", tmp_path, rounds=6, real_rounds=15)
    calibration.compare("http://x", tmp_path, rounds=6, real_rounds=1)
    assert seen == [(6, 6), (6, 15), (6, 1)]
    for rounds, real_rounds in ((6, 0), (6, -1), (0, None)):  # 0 was taken as "not given"
        with pytest.raises(ValueError, match="1 or more"):
            calibration.compare("http://x", tmp_path, rounds=rounds, real_rounds=real_rounds)
    assert len(seen) == 3


@pytest.mark.parametrize("flag", ["--rounds", "--real-rounds", "--requests", "--repeats"])
@pytest.mark.parametrize("value", ["0", "-2"])
def test_the_command_line_refuses_no_rounds_before_starting_anything(
    flag: str, value: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exc:
        calibration.main([flag, value, "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    assert f"must be 1 or more, not {int(value)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refit_one_price_fits_the_same_probe_as_before_session_11(tmp_path: Path) -> None:
    """`--ab`'s second profile: the calibrated file's own points fitted again with attention
    priced with the matmuls (factor 1), under a name of its own; the calibrated fit of a
    curving sweep prices it apart."""
    import dataclasses

    from inferplane.physics import Roofline, get_hardware, get_model
    from inferplane.physics.calibration import (
        DecodePoint,
        PrefillPoint,
        dump_profile,
        fit,
        load_hardware_profile,
        predict_itl_s,
        predict_ttft_s,
    )

    m = get_model("tiny-llama")
    truth = dataclasses.replace(get_hardware("cpu"), name="truth", compute_efficiency=3e-4,
                                step_overhead_s=2.7e-3, request_overhead_s=4e-3,
                                attention_cost_factor=20.0)
    r = Roofline(truth, m, precision="fp32")
    pre = [PrefillPoint(n, 0, predict_ttft_s(r, n)) for n in (16, 64, 128, 256, 512, 768)]
    dec = [DecodePoint(b, 64, predict_itl_s(r, b, 64)) for b in (1, 2, 4)]
    cal = fit(get_hardware("cpu"), m, pre, dec, name=calibration.PROFILE_NAME, precision="fp32")
    # priced apart (~14 on these points: the prior towards the one-price matmul price)
    assert 10.0 < cal.hardware.attention_cost_factor < 25.0
    meta = {"model_profile": "tiny-llama", "tp": 1, "precision": "fp32"}
    text = calibration.refit_one_price(dump_profile(cal, "cpu", meta))
    f = tmp_path / "one.yaml"
    f.write_text(text)
    one = load_hardware_profile(f)
    assert one.name == f"{calibration.PROFILE_NAME}-one"
    assert one.attention_cost_factor == 1.0
    assert one.step_overhead_s == pytest.approx(cal.hardware.step_overhead_s, rel=0.05)


async def test_the_held_out_requests_are_timed_on_open_connections() -> None:
    """Each `HeldOut.measure` call opens a fresh session: its first lone request (96 tokens)
    paid for opening the connection, and its first burst for two more (session 21: +0.7 ms,
    16 % of a 96-token TTFT on the fidelity vLLM), which no profile of the engine predicts and
    a gateway's pooled connections do not pay. Against a fake engine whose first request on a
    connection takes 30 ms more, three calls of one repeat each: every lone point and every
    rank of the burst is its requests' own time (without the opener the 96-token point and
    two ranks of the burst read ~30 ms)."""
    async with fake_completions(new_connection_s=0.03) as (url, fake):
        held = HeldOut((96, 320), (3, 320))
        for _ in range(3):
            await held.measure(url, 1)
    alone, burst = held.result()
    assert [n for n, _ in alone] == [96, 320]
    assert max(t for _, t in alone) < 0.015
    assert max(burst) < 0.015
    # every call did open its connections: the untimed openers paid for them
    assert sum(first for _, _, first in fake.requests) >= 3 * 3


def test_every_probe_round_is_followed_by_as_many_held_out_repeats(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The held-out medians weight the probe's rounds alike, as the probe's own medians do:
    until session 22, 7 repeats went 2, 2, 1, 1, 1 after the 5 rounds, and the first two
    rounds (in several runs the engine's slowest minutes) held 4 of the 7 samples."""
    seen: list[int] = []

    class Stop(Exception):
        pass

    async def fake_calibrate(url: str, model: str, *, between_rounds: Any, repeats: int,
                             **kw: Any) -> tuple[str, str]:
        for i in range(repeats):
            await between_rounds(i)
        raise Stop

    async def fake_measure(self: HeldOut, url: str, repeats: int) -> None:
        seen.append(repeats)

    async def smooth(url: str) -> bool:
        return True

    async def no_workload(url: str, model: str, **kw: Any) -> WorkloadResult:
        return WorkloadResult()

    monkeypatch.setattr(calibration, "calibrate_endpoint", fake_calibrate)
    monkeypatch.setattr(calibration, "warm_up", smooth)
    monkeypatch.setattr(calibration, "run_workload", no_workload)
    monkeypatch.setattr(HeldOut, "measure", fake_measure)
    # as many after every round; never fewer than the 7 of before in all (few rounds: more each)
    for repeats, each in ((5, 2), (7, 2), (4, 2), (3, 3), (2, 4), (1, 7)):
        seen.clear()
        with pytest.raises(Stop):
            calibration._compare("http://x", tmp_path, rounds=1, requests=1, repeats=repeats,
                                 profiles=("calibrated",), real_rounds=repeats)
        assert seen == [each] * repeats
        assert sum(seen) >= calibration.HELD_OUT_MIN


def test_held_out_errors_put_the_physics_burst_beside_the_placement_predictor(
    tmp_path: Path,
) -> None:
    """The target is the placement predictor's error (it gives rank ``k`` of the burst the
    ``k`` requests sent before it, so rank 0 its lone TTFT); beside it the burst as the physics
    model predicts it told the whole burst, where the first answer waits for the followers'
    first pieces (session 22: what the predictor cannot see)."""
    import dataclasses

    from inferplane.physics import Roofline, get_hardware, get_model
    from inferplane.physics.calibration import Calibration, dump_profile, predict_burst_s

    hw = dataclasses.replace(get_hardware("cpu"), name=calibration.PROFILE_NAME,
                             compute_efficiency=3e-4, step_overhead_s=2e-3,
                             request_overhead_s=1e-3, frontend_request_s=1.5e-3,
                             frontend_handoff_s=0.5e-3)
    f = tmp_path / "p.yaml"
    f.write_text(dump_profile(Calibration(hw, (), ()), "cpu",
                              {"model_profile": "tiny-llama", "tp": 1, "precision": "fp32"}))
    fleet = calibration.emulator_fleet(calibration.PROFILE_NAME, 9, f)
    size, tokens = calibration.HELD_OUT_BURST
    lone = [(n, calibration.predicted_ttft_s(fleet, n)) for n in calibration.HELD_OUT]
    physics = predict_burst_s(Roofline(hw, get_model("tiny-llama"), precision="fp32"), size,
                              tokens)
    got = calibration.held_out_errors(fleet, hw, lone, physics)
    # the lone points exactly as predicted; the burst as the physics model has it
    assert got["each"][:3] == [0.0, 0.0, 0.0]
    assert got["physics_burst"]["each_signed"] == [0.0] * size
    assert got["physics_burst"]["median_with_it"] == 0.0
    # the predictor's rank 0 is its lone prediction; the real first answer waits for the
    # followers' first pieces, which only the physics model told the burst sees
    rank0 = got["predicted_ms"][3]
    assert rank0 == pytest.approx(calibration.predicted_ttft_s(fleet, tokens) * 1e3, abs=1e-3)
    assert physics[0] * 1e3 > rank0 + 1.0
    assert got["median"] > 0.0
    assert got["each_signed"][3] < 0.0  # the predictor's rank 0 early: signed (p - t) / t
    # mixed signs: the physics model 10 % over, 20 % under, 10 % over the measured burst
    mixed = calibration.held_out_errors(
        fleet, hw, lone, [physics[0] / 1.1, physics[1] / 0.8, physics[2] / 1.1])
    assert mixed["physics_burst"]["each_signed"] == pytest.approx([0.1, -0.2, 0.1], abs=1e-3)
    # the median of 0, 0, 0 (the lone points) and 0.1, 0.2, 0.1 (absolute)
    assert mixed["physics_burst"]["median_with_it"] == pytest.approx(0.05)
