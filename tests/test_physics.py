"""Tests for inferplane.physics: registries, model arithmetic, roofline shape, validation."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from inferplane.physics import (
    HARDWARE,
    MODELS,
    HardwareProfile,
    ModelProfile,
    Roofline,
    UnknownProfileError,
    get_hardware,
    get_model,
    min_tensor_parallel,
)
from tests.builders import load_file

REPO = Path(__file__).resolve().parent.parent


def roofline(
    hw: str, model: str = "llama-3.1-8b", tp: int = 1, precision: str = "bf16"
) -> Roofline:
    return Roofline(get_hardware(hw), get_model(model), tp, precision)


# -- registries -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["h100", "h200", "a100", "l4", "groq-lpu", "cerebras-wse3", "provider-api", "cpu", "H100"],
)
def test_get_hardware(name: str) -> None:
    hw = get_hardware(name)
    assert isinstance(hw, HardwareProfile)
    assert hw.name == name.lower()
    assert hw.source


@pytest.mark.parametrize(
    "name", ["llama-3.1-8b", "llama-3.1-70b", "qwen3-32b", "tiny-llama", "bge-large", "Qwen3-32B"]
)
def test_get_model(name: str) -> None:
    model = get_model(name)
    assert isinstance(model, ModelProfile)
    assert model.name == name.lower()


@pytest.mark.parametrize(
    ("lookup", "registry", "kind"),
    [(get_hardware, HARDWARE, "hardware"), (get_model, MODELS, "model")],
)
def test_unknown_name_lists_known_names(lookup, registry, kind) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(UnknownProfileError) as info:
        lookup("tpu-v9")
    assert isinstance(info.value, LookupError)
    message = str(info.value)
    assert "'tpu-v9'" in message and kind in message
    assert all(name in message for name in registry)


def test_kinds_and_provider_fields() -> None:
    kinds = {hw.kind for hw in HARDWARE.values()}
    assert kinds == {"gpu", "low-latency", "giant-context", "provider-api", "cpu"}
    api = get_hardware("provider-api")
    assert 0.15 <= api.network_rtt_s <= 0.3 and api.rate_limit_rpm
    assert all(
        hw.network_rtt_s == 0 and hw.rate_limit_rpm is None
        for hw in HARDWARE.values()
        if hw is not api
    )


def test_bad_hardware_figures_are_rejected() -> None:
    import dataclasses

    with pytest.raises(ValueError, match="bandwidth_efficiency"):
        dataclasses.replace(get_hardware("h100"), bandwidth_efficiency=1.5)


# -- models -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("llama-3.1-8b", 131_072),
        ("llama-3.1-70b", 327_680),
        ("qwen3-32b", 262_144),
        ("tiny-llama", 256),
    ],
)
def test_kv_bytes_per_token(model: str, expected: int) -> None:
    assert get_model(model).kv_bytes_per_token() == expected
    assert get_model(model).kv_bytes_per_token(1) == expected / 2


@pytest.mark.parametrize(
    ("precision", "bytes_per_param"),
    [("fp32", 4), ("bf16", 2), ("fp16", 2), ("fp8", 1), ("int8", 1), ("int4", 0.5)],
)
def test_weight_bytes(precision: str, bytes_per_param: float) -> None:
    model = get_model("llama-3.1-8b")
    assert model.weight_bytes(precision) == pytest.approx(8.03e9 * bytes_per_param)


def test_unknown_precision() -> None:
    with pytest.raises(ValueError, match="precision"):
        get_model("llama-3.1-8b").weight_bytes("fp6")
    with pytest.raises(ValueError, match="precision"):
        roofline("h100", precision="fp6")


def test_architecture_numbers() -> None:
    qwen = get_model("qwen3-32b")
    assert (qwen.layers, qwen.hidden_size, qwen.num_heads, qwen.num_kv_heads) == (64, 5120, 64, 8)
    assert qwen.attention_width == 8192  # wider than hidden: attention FLOPs use this
    llama70 = get_model("llama-3.1-70b")
    assert (llama70.layers, llama70.hidden_size, llama70.num_kv_heads) == (80, 8192, 8)


# -- roofline shape ---------------------------------------------------------------------


def test_prefill_is_linear_and_compute_bound_for_large_n() -> None:
    r = roofline("h100")
    weights_read = r.weight_bytes / (3.35e12 * 0.8)
    t4k, t8k = r.prefill_time_s(4096), r.prefill_time_s(8192)
    assert t4k > 3 * weights_read  # far above the memory floor: compute bound
    assert 1.9 < t8k / t4k < 2.3  # ~linear (the attention term adds a little)
    # Tiny prompts cost about one read of the weights, not less.
    assert r.prefill_time_s(1) >= weights_read


def test_prefill_cost_grows_with_cached_context() -> None:
    r = roofline("h100")
    assert r.prefill_time_s(512, 32_000) > 1.2 * r.prefill_time_s(512, 0)
    assert r.prefill_time_s(0) == 0.0


def test_several_prefill_chunks_attend_to_their_own_sequences_only() -> None:
    """``prefill_pairs``: with two chunks in one step the attention pairs are each chunk's
    against its own context, not the summed chunk against the summed context."""
    r = roofline("h100")
    one = r.step_time_s(8000, 16_000, 4, 40_000)
    assert r.step_time_s(8000, 16_000, 4, 40_000, 8000 * (16_000 + 4000)) == one
    exact = 4000 * (8000 + 2000) * 2  # two 4,000-token chunks at 8,000 tokens of context each
    both = r.step_time_s(8000, 16_000, 0, 0, prefill_pairs=exact)
    lumped = r.step_time_s(8000, 16_000, 0, 0)  # as if one 8,000-token chunk at 16,000
    assert both < lumped
    alone = r.step_time_s(4000, 8000, 0, 0)
    assert alone < both < 2 * alone  # the weights are read once for both


def test_decode_is_memory_bound_at_small_batch_and_grows_with_context() -> None:
    r = roofline("h100")
    one, eight = r.decode_step_time_s(1, 1024), r.decode_step_time_s(8, 8 * 1024)
    assert eight / one < 1.1  # batching is almost free while memory bound
    assert r.decode_step_time_s(32, 32 * 8192) > 1.3 * r.decode_step_time_s(32, 32 * 512)


def test_decode_ordering_for_8b() -> None:
    itl = {hw: roofline(hw).decode_step_time_s(1, 1024) for hw in ("h200", "h100", "a100", "l4")}
    assert itl["h200"] < itl["h100"] < itl["a100"] < itl["l4"]


def test_mixed_step_shares_the_weight_read() -> None:
    r = roofline("h100")
    prefill, decode = r.prefill_time_s(512, 0), r.decode_step_time_s(64, 64 * 1000)
    mixed = r.step_time_s(512, 0, 64, 64 * 1000)
    assert max(prefill, decode) <= mixed < prefill + decode
    assert r.step_time_s(0, 0, 0, 0) == 0.0


def test_tensor_parallel_fit() -> None:
    r = roofline("h100", "llama-3.1-70b", tp=4)
    assert r.kv_capacity_tokens() > 100_000
    with pytest.raises(ValueError, match="does not fit") as info:
        roofline("h100", "llama-3.1-70b", tp=1)
    assert "141.2 GB" in str(info.value)
    assert min_tensor_parallel(get_hardware("h100"), get_model("llama-3.1-70b")) == 2
    assert min_tensor_parallel(get_hardware("l4"), get_model("llama-3.1-70b"), max_tp=4) is None


def test_tensor_parallel_speeds_up_decode() -> None:
    tp2 = roofline("h100", "llama-3.1-70b", tp=2).decode_step_time_s(1, 1000)
    tp4 = roofline("h100", "llama-3.1-70b", tp=4).decode_step_time_s(1, 1000)
    assert tp4 < tp2


@pytest.mark.parametrize("tp", [0, -1])
def test_bad_tp(tp: int) -> None:
    with pytest.raises(ValueError, match="tp"):
        roofline("h100", tp=tp)


def test_provider_api_is_elastic() -> None:
    r = roofline("provider-api", "llama-3.1-70b")  # would not fit on one device; elastic
    assert r.decode_step_time_s(1, 1000) < 0.05
    assert r.kv_capacity_tokens() > 10**8


def test_sram_systems() -> None:
    h100 = roofline("h100").decode_step_time_s(1, 1024)
    assert roofline("groq-lpu").decode_step_time_s(1, 1024) < h100 / 5
    assert roofline("cerebras-wse3").decode_step_time_s(1, 1024) < h100 / 5
    with pytest.raises(ValueError, match="does not fit"):
        roofline("groq-lpu", "llama-3.1-70b")  # 141 GB of BF16 weights > 132 GB of SRAM
    roofline("groq-lpu", "llama-3.1-70b", precision="fp8")


def test_kv_capacity_is_plausible() -> None:
    r = roofline("h100")
    tokens = r.kv_capacity_tokens(0.9)
    assert 300_000 < tokens < 700_000  # vLLM reports ~28k 16-token blocks here
    assert r.kv_blocks() == tokens // 16
    assert r.kv_blocks(block_size=32) == tokens // 32
    assert r.kv_capacity_tokens(0.5) < tokens
    assert roofline("h100", "llama-3.1-70b", tp=2).kv_capacity_tokens(0.5) == 0
    with pytest.raises(ValueError):
        r.kv_capacity_tokens(1.5)


def test_joules_per_token() -> None:
    r = roofline("h100")
    assert 0.05 < r.joules_per_token() < 2.0
    assert r.joules_per_token(batch_size=64) < r.joules_per_token(batch_size=8)


def test_embedding_model_prefills_but_never_decodes() -> None:
    r = roofline("l4", "bge-large")
    assert 0 < r.prefill_time_s(512) < 0.1
    with pytest.raises(ValueError, match="embedding"):
        r.decode_step_time_s(1, 512)


def test_tiny_llama_on_cpu() -> None:
    r = roofline("cpu", "tiny-llama")
    assert 0 < r.decode_step_time_s(4, 400) < 0.05
    assert r.kv_capacity_tokens() > 2048


def test_negative_counts_rejected() -> None:
    r = roofline("h100")
    with pytest.raises(ValueError):
        r.prefill_time_s(-1)
    with pytest.raises(ValueError):
        r.decode_step_time_s(1, -5)


# -- validation against published measurements ------------------------------------------


def _load_validation() -> ModuleType:
    return load_file("physics_validation", REPO / "bench" / "physics_validation.py")


def test_validation_errors_within_bound() -> None:
    validation = _load_validation()
    cases = validation.cases()
    assert len(cases) >= 3
    for case in cases:
        assert abs(case.error) <= validation.ERROR_BOUND, (case.scenario, case.metric, case.error)


def test_validation_table_is_in_the_docs() -> None:
    doc = (REPO / "docs" / "physics.md").read_text()
    table = _load_validation().table()
    assert table in doc, "docs/physics.md is stale: paste `bench/physics_validation.py` output"
