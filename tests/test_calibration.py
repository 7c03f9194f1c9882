"""Calibrated hardware profiles: the fit, the profile file, the fleet file, the predictor and
`inferplane calibrate` end to end against the emulator (the real engine: tests/fidelity)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from inferplane.config.loader import load_config
from inferplane.errors import ConfigError
from inferplane.fleet.model import Fleet
from inferplane.physics import HardwareProfile, Roofline, get_hardware, get_model
from inferplane.physics.calibration import (
    Calibration,
    DecodePoint,
    PrefillPoint,
    dump_profile,
    fit,
    load_hardware_profile,
    predict_itl_s,
    predict_ttft_s,
)
from inferplane.physics.probe import calibrate_endpoint
from inferplane.twin.emulator.server import start_emulator
from tests.placement_helpers import cycle, plugin, profile, snapshot, state

PROMPTS = (16, 64, 256, 512, 1024, 2000)
BATCHES = (1, 2, 4, 8, 16)


def _synthetic(
    hw: str, model: str, ctx: int
) -> tuple[HardwareProfile, HardwareProfile, list[PrefillPoint], list[DecodePoint]]:
    """Points measured on a machine whose factors differ from the table's."""
    base, m = get_hardware(hw), get_model(model)
    truth = dataclasses.replace(
        base, name="truth", compute_efficiency=base.compute_efficiency * 0.3,
        bandwidth_efficiency=base.bandwidth_efficiency * 0.7, step_overhead_s=3e-3,
        seq_overhead_s=2e-4, request_overhead_s=4e-3,
    )
    r = Roofline(truth, m)
    pre = [PrefillPoint(n, 0, predict_ttft_s(r, n)) for n in PROMPTS]
    pre.append(PrefillPoint(512, 480, predict_ttft_s(r, 512, 480)))
    dec = [DecodePoint(b, ctx, predict_itl_s(r, b, ctx)) for b in BATCHES]
    return base, truth, pre, dec


@pytest.mark.parametrize(("hw", "model"), [("h100", "llama-3.1-8b"), ("l4", "llama-3.1-8b")])
def test_fit_recovers_the_factors_of_a_known_machine(hw: str, model: str) -> None:
    base, truth, pre, dec = _synthetic(hw, model, 1024)
    cal = fit(base, get_model(model), pre, dec, name="fitted")
    h = cal.hardware
    assert h.name == "fitted" and h.kind == base.kind
    assert cal.max_error < 0.01
    assert h.compute_efficiency == pytest.approx(truth.compute_efficiency, rel=0.02)
    assert h.seq_overhead_s == pytest.approx(2e-4, rel=0.1)
    assert h.request_overhead_s == pytest.approx(4e-3, rel=0.1)


def test_fit_reproduces_overhead_dominated_engines() -> None:
    """A tiny model on a CPU: FLOPs and bytes are invisible, the overheads are everything."""
    base, _, pre, dec = _synthetic("cpu", "tiny-llama", 256)
    cal = fit(base, get_model("tiny-llama"), pre, dec, name="cpu-fitted")
    assert cal.max_error < 0.01
    assert cal.hardware.step_overhead_s == pytest.approx(3e-3, rel=0.05)
    assert cal.hardware.request_overhead_s == pytest.approx(4e-3, rel=0.05)


def test_fit_holds_what_noise_would_make_unphysical() -> None:
    """TTFT that falls with the prompt (noise) must not become a negative or absurd factor."""
    base, m = get_hardware("cpu"), get_model("tiny-llama")
    pre = [PrefillPoint(16, 0, 0.011), PrefillPoint(256, 0, 0.007), PrefillPoint(900, 0, 0.006)]
    dec = [DecodePoint(1, 64, 0.0011), DecodePoint(4, 64, 0.0012)]
    h = fit(base, m, pre, dec, name="noisy").hardware
    assert h.peak_flops == base.peak_flops and h.compute_efficiency == base.compute_efficiency
    assert min(h.step_overhead_s, h.seq_overhead_s, h.request_overhead_s) >= 0


def test_fit_needs_points() -> None:
    with pytest.raises(ValueError, match="at least two prefill points"):
        fit(get_hardware("cpu"), get_model("tiny-llama"), [PrefillPoint(16, 0, 0.01)],
            [DecodePoint(1, 64, 0.001)], name="x")


def test_overheads_enter_every_prediction() -> None:
    base, m = get_hardware("h100"), get_model("llama-3.1-8b")
    cal = dataclasses.replace(base, name="c", seq_overhead_s=1e-3, request_overhead_s=5e-3)
    r0, r1 = Roofline(base, m), Roofline(cal, m)
    assert r1.decode_step_time_s(4, 4096) == pytest.approx(r0.decode_step_time_s(4, 4096) + 4e-3)
    assert predict_ttft_s(r1, 512) == pytest.approx(predict_ttft_s(r0, 512) + 5e-3 + 1e-3)


def _profile_file(tmp: Path, name: str = "cpu-lab") -> tuple[Path, Calibration]:
    base, _, pre, dec = _synthetic("cpu", "tiny-llama", 256)
    cal = fit(base, get_model("tiny-llama"), pre, dec, name=name)
    path = tmp / "profile.yaml"
    path.write_text(dump_profile(cal, "cpu", {"endpoint": "http://127.0.0.1:1", "model": "m"}))
    return path, cal


def test_profile_file_round_trip(tmp_path: Path) -> None:
    path, cal = _profile_file(tmp_path)
    assert load_hardware_profile(path) == cal.hardware
    assert "prefill:" in path.read_text() and "median_abs_error" in path.read_text()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("kind: [", "not valid YAML"),
        ("kind: inferplane/hardware-profile\nversion: 1\nhardware: {name: x}\n",
         r"hardware\.kind: Field required"),
        ("kind: other\nversion: 1\nhardware: {}\n", "kind: Input should be"),
    ],
)
def test_profile_file_errors_name_the_file_and_field(
    tmp_path: Path, text: str, match: str
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as exc:
        load_hardware_profile(path)
    assert str(path) in str(exc.value)


def test_profile_may_not_shadow_the_table(tmp_path: Path) -> None:
    path, _ = _profile_file(tmp_path, name="h100")
    with pytest.raises(ValueError, match="built-in profile"):
        load_hardware_profile(path)


FLEET = """
hardware_profiles: [{profile}]
substrates:
  - name: lab
    kind: cpu
    hardware: {hardware}
    region: local
    jurisdiction: eu
    cost: {{hourly_usd: 1}}
    endpoints:
      - name: lab-0
        url: http://127.0.0.1:{port}
        models: [{{name: tiny-llama, max_context: 1024}}]
"""


def test_fleet_file_names_calibrated_profiles_relative_to_itself(tmp_path: Path) -> None:
    _, cal = _profile_file(tmp_path)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(FLEET.format(profile="profile.yaml", hardware="cpu-lab", port=9))
    config = load_config(fleet_file)
    ep = Fleet.from_config(config).endpoints[0]
    r = ep.roofline("tiny-llama")
    assert r is not None and r.hardware == cal.hardware

    # the predictor pays the calibrated per-request overhead
    snap = snapshot(Fleet.from_config(config), {"lab-0": state()})
    prof = profile(model="tiny-llama", prompt_tokens=100, max_output_tokens=10)
    p = plugin("predicted-latency")
    c = cycle(prof, snap)
    list(p.score(c, list(snap.endpoints)))
    raw = c.annotations["lab-0"]["ttft_raw_s"]
    assert raw == pytest.approx(predict_ttft_s(r, 100))


@pytest.mark.parametrize(
    ("profile", "hardware", "where", "match"),
    [
        ("missing.yaml", "cpu-lab", "hardware_profiles[0]", "cannot read"),
        ("profile.yaml", "cpu-elsewhere", "substrates[0].hardware", "cpu-lab"),
    ],
)
def test_fleet_file_errors(
    tmp_path: Path, profile: str, hardware: str, where: str, match: str
) -> None:
    _profile_file(tmp_path)
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text(FLEET.format(profile=profile, hardware=hardware, port=9))
    with pytest.raises(ConfigError) as exc:
        load_config(fleet_file)
    assert where in str(exc.value) and match in str(exc.value)


async def test_calibrate_an_emulated_engine_end_to_end(tmp_path: Path) -> None:
    """The probe and fit against a live (emulated) engine: a loadable profile whose points are
    the engine's own counts, and a fleet that runs on it."""
    config = load_config(_write_cpu_fleet(tmp_path))
    handle = await start_emulator(config, time_scale=4.0, port_override={"lab-0": 0})
    try:
        text, summary = await calibrate_endpoint(
            handle.urls["lab-0"], "tiny-llama", model_profile="tiny-llama", base="cpu",
            name="cpu-emulated", prompt_tokens=(16, 128, 512), batches=(1, 2), repeats=1,
            decode_tokens=8,
            # what is checked here is the shape of the result, not timing: a client starved by
            # a loaded machine may read a stream in one burst, and that must not fail it
            warm_up_max_s=2.0, require_smooth=False,
        )
    finally:
        await handle.stop()
    path = tmp_path / "emulated.yaml"
    path.write_text(text)
    hw = load_hardware_profile(path)
    assert hw.name == "cpu-emulated" and hw.kind == "cpu"
    assert "fit: median error" in summary
    assert text.count("prompt_tokens:") >= 3  # every prefill point, cold and cached


def _write_cpu_fleet(tmp: Path) -> Path:
    f = tmp / "cpu.yaml"
    f.write_text(FLEET.replace("hardware_profiles: [{profile}]\n", "").format(
        hardware="cpu", port=9))
    return f


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("tiny-llama", "cannot reach http://127.0.0.1:9"),
        ("my-model", "unknown model profile 'my-model'"),  # before any request is sent
    ],
)
def test_calibrate_command_errors(tmp_path: Path, model: str, message: str) -> None:
    result = CliRunner().invoke(app, [
        "calibrate", "--endpoint", "http://127.0.0.1:9", "--model", model,
        "--out", str(tmp_path / "p.yaml"), "--repeats", "1",
    ])
    assert result.exit_code == 2
    assert message in result.output
    assert not (tmp_path / "p.yaml").exists()


def test_calibrate_command_rejects_bad_sweeps(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, [
        "calibrate", "--endpoint", "http://127.0.0.1:9", "--model", "m",
        "--out", str(tmp_path / "p.yaml"), "--batches", "1,x",
    ])
    assert result.exit_code == 2 and "--batches" in result.output
