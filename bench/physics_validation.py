"""Compare the roofline's estimates with published vLLM (and one NIM) measurements.

Prints a Markdown table: scenario, published value, predicted value, error. The table in
``docs/physics.md`` is this script's output; ``tests/test_physics.py`` checks that every
error stays within ``ERROR_BOUND``. No GPU needed: it only evaluates formulas.

    .venv/bin/python bench/physics_validation.py
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date

from inferplane.physics import Roofline, get_hardware, get_model

#: The accuracy the docs promise: |predicted - published| / published.
ERROR_BOUND = 0.25

VLLM_CI = "vLLM performance-benchmark CI (buildkite.com/vllm/performance-benchmark/builds/{})"


@dataclass(frozen=True)
class Case:
    """One published measurement and the function that predicts it (both in ms)."""

    scenario: str
    metric: str
    published_ms: float
    source: str
    predict_ms: Callable[[], float]

    @property
    def predicted_ms(self) -> float:
        return self.predict_ms()

    @property
    def error(self) -> float:
        return (self.predicted_ms - self.published_ms) / self.published_ms


def latency_benchmark_ms(
    roofline: Roofline, batch: int = 8, input_len: int = 32, output_len: int = 128
) -> float:
    """vLLM ``benchmark_latency.py``: one batch of ``batch`` prompts of ``input_len``
    tokens, ``output_len`` tokens each; end-to-end ms = one prefill step (which also
    yields the first token) + ``output_len - 1`` decode steps over a growing context."""
    total = roofline.step_time_s(batch * input_len, 0, 0, 0)
    for i in range(1, output_len):
        total += roofline.decode_step_time_s(batch, batch * (input_len + i))
    return total * 1e3


def single_stream_itl_ms(roofline: Roofline, input_len: int, output_len: int) -> float:
    """Mean inter-token latency of one request alone on the engine (concurrency 1)."""
    steps = [roofline.decode_step_time_s(1, input_len + i) for i in range(1, output_len)]
    return sum(steps) / len(steps) * 1e3


def _roofline(hw: str, model: str, tp: int = 1, precision: str = "bf16") -> Roofline:
    return Roofline(get_hardware(hw), get_model(model), tp, precision)


def _a100_40gb_roofline() -> Roofline:
    # The A100 40GB SXM: same silicon as the 80GB part, 1,555 GB/s HBM2 and 40 GB.
    a100_40 = dataclasses.replace(
        get_hardware("a100"), name="a100-40gb", mem_bandwidth=1.555e12, mem_capacity=40 * 2**30
    )
    return Roofline(a100_40, get_model("llama-3.1-8b"))


def cases() -> list[Case]:
    """Every published point the model is validated against."""
    lat = "e2e latency, batch 8, in 32 / out 128"
    return [
        Case(
            "Llama-3.1-8B, 1x H100 SXM, bf16",
            lat,
            997.5,
            VLLM_CI.format(9555),
            lambda: latency_benchmark_ms(_roofline("h100", "llama-3.1-8b")),
        ),
        Case(
            "Llama-3-70B, 4x H100 SXM (TP4), bf16",
            lat,
            2444.5,
            VLLM_CI.format(9555),
            lambda: latency_benchmark_ms(_roofline("h100", "llama-3.1-70b", 4)),
        ),
        Case(
            "Llama-3.1-8B, 1x H200, bf16",
            lat,
            833.4,
            VLLM_CI.format(9515),
            lambda: latency_benchmark_ms(_roofline("h200", "llama-3.1-8b")),
        ),
        Case(
            "Llama-3-70B, 4x H200 (TP4), bf16",
            lat,
            2077.5,
            VLLM_CI.format(9515),
            lambda: latency_benchmark_ms(_roofline("h200", "llama-3.1-70b", 4)),
        ),
        Case(
            "Llama-3.1-8B, 1x A100-SXM4-80GB, bf16",
            lat,
            1579.3,
            VLLM_CI.format(9523),
            lambda: latency_benchmark_ms(_roofline("a100", "llama-3.1-8b")),
        ),
        Case(
            "Llama-3-70B, 4x A100-SXM4-80GB (TP4), bf16",
            lat,
            3990.6,
            VLLM_CI.format(9523),
            lambda: latency_benchmark_ms(_roofline("a100", "llama-3.1-70b", 4)),
        ),
        Case(
            "Llama-3.1-8B, 1x A100 40GB, bf16, vLLM 0.23",
            "ITL, concurrency 1, in 1024 / out 128",
            1000.0 / 75.0,
            "johnmusgrave.com/p/vllm-throughput-latency-sweep-on (~75 tok/s)",
            lambda: single_stream_itl_ms(_a100_40gb_roofline(), 1024, 128),
        ),
        Case(
            "Llama-3.3-70B, 2x H100 (TP2), fp8, NIM 1.8",
            "TTFT, concurrency 1, in 5000 / out 500",
            406.77,
            "docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance",
            lambda: _roofline("h100", "llama-3.1-70b", 2, "fp8").prefill_time_s(5000) * 1e3,
        ),
        Case(
            "Llama-3.3-70B, 2x H100 (TP2), fp8, NIM 1.8",
            "ITL, concurrency 1, in 5000 / out 500",
            18.58,
            "docs.nvidia.com/nim/benchmarking/llm/1.0.0/performance",
            lambda: single_stream_itl_ms(_roofline("h100", "llama-3.1-70b", 2, "fp8"), 5000, 500),
        ),
    ]


def table() -> str:
    """The comparison as a Markdown table."""
    rows = [
        "| Scenario | Metric | Published (ms) | Predicted (ms) | Error | Source |",
        "|---|---|---:|---:|---:|---|",
    ]
    for c in cases():
        rows.append(
            f"| {c.scenario} | {c.metric} | {c.published_ms:,.1f} | {c.predicted_ms:,.1f} "
            f"| {c.error:+.1%} | {c.source} |"
        )
    return "\n".join(rows)


def main() -> int:
    print(table())
    errors = [abs(c.error) for c in cases()]
    print()
    print(
        f"mean |error| {sum(errors) / len(errors):.1%}, max |error| {max(errors):.1%} "
        f"(bound {ERROR_BOUND:.0%}); python {platform.python_version()}, {date.today()}"
    )
    return 0 if max(errors) <= ERROR_BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
