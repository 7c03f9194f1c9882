"""Tests for the engine /metrics parsers (fleet/engine_metrics.py)."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pytest

from inferplane.fleet.engine_metrics import EngineMetrics, parse_metrics, parse_sglang, parse_vllm

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def test_vllm_v1_fixture_every_field() -> None:
    # vLLM 0.10, data parallel 2: engine="0" and engine="1", both old and new names present.
    m = parse_vllm(fixture("vllm.txt"))
    assert m.running == 25.0  # 14 + 11
    assert m.waiting == 3.0  # 3 + 0
    assert m.kv_usage == pytest.approx((0.6125 + 0.4375) / 2)  # averaged across engines
    assert m.prefix_queries_total == 1_843_712 + 1_769_984
    assert m.prefix_hits_total == 1_021_440 + 987_136
    assert m.block_size == 16
    assert m.num_gpu_blocks == 2 * 27_153
    assert m.kv_capacity_tokens == 16 * 2 * 27_153
    assert m.preemptions_total == 2.0
    assert m.prompt_tokens_total == 2_150_913 + 2_089_122
    assert m.generation_tokens_total == 388_407 + 371_950
    assert m.ttft_count == 941 + 900
    assert m.ttft_sum_s == pytest.approx(350.6660999999997 + 323.00109999999916)
    assert m.ttft_mean_s == pytest.approx((350.6660999999997 + 323.00109999999916) / 1841)
    assert m.itl_count == 387_466 + 371_050
    assert m.itl_mean_s == pytest.approx(0.0263988, rel=1e-5)
    assert m.itl_sum_s is not None and m.itl_mean_s == pytest.approx(m.itl_sum_s / m.itl_count)
    assert m.prefix_hit_rate is None  # V1 has no hit-rate gauge


def test_vllm_v0_fixture_older_names() -> None:
    m = parse_vllm(fixture("vllm_v0.txt"))
    # The V0 engine had no prefix-cache counters, only a hit-rate gauge.
    assert m.prefix_queries_total is None and m.prefix_hits_total is None
    found = {
        k: v for k, v in asdict(m).items()
        if k not in ("prefix_queries_total", "prefix_hits_total", "power_watts")
    }
    assert m.power_watts is None  # an engine page without the DCGM gauge
    assert found == pytest.approx(
        {
            "running": 9.0,
            "waiting": 1.0,
            "kv_usage": 0.27838777,  # from vllm:gpu_cache_usage_perc
            "block_size": 16,
            "num_gpu_blocks": 28_086,
            "preemptions_total": 5.0,
            "prompt_tokens_total": 613_377.0,
            "generation_tokens_total": 120_456.0,
            "ttft_mean_s": 101.1133 / 412,
            "itl_mean_s": 2603.991456 / 120_044,  # from vllm:time_per_output_token_seconds
            "ttft_sum_s": 101.1133,
            "ttft_count": 412.0,
            "itl_sum_s": 2603.991456,
            "itl_count": 120_044.0,
            "prefix_hit_rate": 0.41924398625429554,
        },
        rel=1e-6,
    )


def test_sglang_fixture_every_field() -> None:
    m = parse_sglang(fixture("sglang.txt"))
    assert m.running == 37.0
    assert m.waiting == 6.0
    assert m.kv_usage == pytest.approx(0.66)
    assert m.prefix_queries_total == 8_128_902.0  # prompt tokens, since cached_tokens is reported
    assert m.prefix_hits_total == 3_769_461.0
    assert m.prefix_hit_rate == pytest.approx(0.4637)
    assert (m.block_size, m.num_gpu_blocks) == (1, 146_234)  # the pool is counted in tokens
    assert m.kv_capacity_tokens == 146_234
    assert m.preemptions_total == 3.0
    assert m.prompt_tokens_total == 8_128_902.0
    assert m.generation_tokens_total == 1_557_572.0
    assert m.ttft_count == 11_008.0
    assert m.ttft_mean_s == pytest.approx(4996.1466 / 11_008)
    assert m.itl_count == 150_000.0
    assert m.itl_mean_s == pytest.approx(2662.2 / 150_000)


@pytest.mark.parametrize(
    ("engine", "name"), [("vllm", "vllm.txt"), ("vllm", "vllm_v0.txt"), ("sglang", "sglang.txt")]
)
def test_openai_compatible_detects_the_engine(engine: str, name: str) -> None:
    text = fixture(name)
    assert parse_metrics("openai-compatible", text) == parse_metrics(engine, text)


def test_openai_compatible_without_known_names_is_all_none() -> None:
    text = "# HELP up x\n# TYPE up gauge\nup 1\nprocess_open_fds 12\n"
    assert parse_metrics("openai-compatible", text) == EngineMetrics()
    assert parse_metrics("openai-compatible", text).is_empty()


def test_unknown_engine_kind() -> None:
    with pytest.raises(ValueError, match="unknown engine kind 'tgi'"):
        parse_metrics("tgi", "")


@pytest.mark.parametrize("name", ["vllm.txt", "vllm_v0.txt", "sglang.txt"])
def test_windows_line_endings(name: str) -> None:
    text = fixture(name)
    engine = "sglang" if name.startswith("sglang") else "vllm"
    assert parse_metrics(engine, text.replace("\n", "\r\n")) == parse_metrics(engine, text)


def test_only_some_metrics() -> None:
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 4.0\n'
        'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n'
    )
    m = parse_vllm(text)
    assert (m.running, m.kv_usage) == (4.0, 0.25)
    assert m.waiting is None and m.block_size is None and m.ttft_mean_s is None
    assert m.kv_capacity_tokens is None


def test_multi_engine_and_multi_model_summing() -> None:
    text = "\n".join(
        [
            'vllm:num_requests_running{engine="0",model_name="a"} 3',
            'vllm:num_requests_running{engine="1",model_name="a"} 2',
            'vllm:num_requests_running{engine="0",model_name="b"} 1',
            'vllm:num_requests_waiting{engine="0",model_name="a"} 7',
            'vllm:num_requests_waiting{engine="1",model_name="a"} 1',
            'vllm:kv_cache_usage_perc{engine="0",model_name="a"} 0.2',
            'vllm:kv_cache_usage_perc{engine="1",model_name="a"} 0.6',
            'vllm:kv_cache_usage_perc{engine="0",model_name="b"} 0.7',
            'vllm:time_to_first_token_seconds_sum{engine="0",model_name="a"} 10.0',
            'vllm:time_to_first_token_seconds_count{engine="0",model_name="a"} 10.0',
            'vllm:time_to_first_token_seconds_sum{engine="1",model_name="a"} 30.0',
            'vllm:time_to_first_token_seconds_count{engine="1",model_name="a"} 10.0',
            'vllm:cache_config_info{block_size="16",engine="0",num_gpu_blocks="1000"} 1.0',
            'vllm:cache_config_info{block_size="16",engine="1",num_gpu_blocks="1200"} 1.0',
        ]
    )
    m = parse_vllm(text)
    assert m.running == 6.0
    assert m.waiting == 8.0
    assert m.kv_usage == pytest.approx(0.5)
    assert m.ttft_mean_s == pytest.approx(2.0)  # pooled: 40 s over 20 requests
    assert (m.block_size, m.num_gpu_blocks) == (16, 2200)


def test_deprecated_vllm_names_are_a_fallback() -> None:
    old_only = (
        'vllm:gpu_cache_usage_perc{model_name="m"} 0.5\n'
        'vllm:gpu_prefix_cache_queries_total{model_name="m"} 100\n'
        'vllm:gpu_prefix_cache_hits_total{model_name="m"} 40\n'
        'vllm:time_per_output_token_seconds_sum{model_name="m"} 2.0\n'
        'vllm:time_per_output_token_seconds_count{model_name="m"} 100\n'
    )
    m = parse_vllm(old_only)
    assert (m.kv_usage, m.prefix_queries_total, m.prefix_hits_total) == (0.5, 100.0, 40.0)
    assert m.itl_mean_s == pytest.approx(0.02)
    both = old_only + (
        'vllm:kv_cache_usage_perc{model_name="m"} 0.75\n'
        'vllm:prefix_cache_queries_total{model_name="m"} 200\n'
        'vllm:inter_token_latency_seconds_sum{model_name="m"} 3.0\n'
        'vllm:inter_token_latency_seconds_count{model_name="m"} 100\n'
    )
    m = parse_vllm(both)  # the current names win; no double counting
    assert (m.kv_usage, m.prefix_queries_total) == (0.75, 200.0)
    assert m.itl_mean_s == pytest.approx(0.03)


def test_exposition_format_corners() -> None:
    text = "\n".join(
        [
            "",
            "# a comment",
            "#",
            # escaped quote, comma, brace and backslash inside label values
            r'vllm:num_requests_running{model_name="a \"quoted\", {weird}",engine="0"} 2',
            r'vllm:num_requests_running{model_name="c:\\path\\",engine="1"} 3',
            # timestamp after the value; whitespace variants
            'vllm:num_requests_waiting{model_name="a"} 5 1712345678000',
            "vllm:num_requests_waiting\t1",
            'vllm:num_preemptions_total {model_name="a"} 4',
            # NaN is ignored, +Inf is kept
            'vllm:kv_cache_usage_perc{engine="0"} NaN',
            'vllm:kv_cache_usage_perc{engine="1"} 0.5',
            'vllm:prompt_tokens_total{engine="0"} +Inf',
            # OpenMetrics exemplar on a counter, and the EOF marker
            'vllm:generation_tokens_total{engine="0"} 42 # {trace_id="abc"} 1.0 1712345678.1',
            'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="None"} 1.0',
            "# EOF",
        ]
    )
    m = parse_vllm(text)
    assert m.running == 5.0
    assert m.waiting == 6.0
    assert m.preemptions_total == 4.0
    assert m.kv_usage == 0.5
    assert m.prompt_tokens_total == math.inf
    assert m.generation_tokens_total == 42.0
    assert m.block_size == 32 and m.num_gpu_blocks is None  # "None" before profiling


def test_longer_names_sharing_a_prefix_are_not_confused() -> None:
    text = (
        'vllm:num_requests_running_total{engine="0"} 99\n'
        "vllm:num_requests_runningx 98\n"
        'vllm:num_requests_running{engine="0"} 1\n'
        'vllm:time_to_first_token_seconds_bucket{le="+Inf",engine="0"} 5\n'
        'vllm:time_to_first_token_seconds_created{engine="0"} 1.7e9\n'
    )
    m = parse_vllm(text)
    assert m.running == 1.0
    assert m.ttft_mean_s is None and m.ttft_count is None


@pytest.mark.parametrize(
    "text",
    [
        "",
        "\n\n\r\n",
        "garbage",
        "vllm:num_requests_running",
        "vllm:num_requests_running{",
        'vllm:num_requests_running{engine="0} 3',
        'vllm:num_requests_running{engine="0"}',
        'vllm:num_requests_running{engine="0"} three',
        "vllm:num_requests_running  ",
        'vllm:cache_config_info{block_size="16" num_gpu_blocks="9"} 1',
        "vllm:cache_config_info{block_size=16} 1",
        "vllm:time_to_first_token_seconds_sum 1.0\nvllm:time_to_first_token_seconds_count 0",
        '\x00\xff{}}}{{""\\',
    ],
)
def test_malformed_or_empty_input_never_raises(text: str) -> None:
    for engine in ("vllm", "sglang", "openai-compatible"):
        m = parse_metrics(engine, text)
        assert m.running is None
        assert m.block_size is None and m.num_gpu_blocks is None
        assert m.ttft_mean_s is None


def test_malformed_lines_are_skipped_not_fatal() -> None:
    text = (
        'vllm:num_requests_running{engine="0"} oops\n'
        'vllm:num_requests_running{engine="1"} 2\n'
        'vllm:num_requests_running{engine="2\n'
        'sglang:num_running_reqs{tp_rank="0"} 5\n'
    )
    assert parse_vllm(text).running == 2.0
    assert parse_sglang(text).running == 5.0


def test_sglang_without_cached_tokens_leaves_prefix_counters_unset() -> None:
    text = (
        'sglang:prompt_tokens_total{model_name="m"} 7.0\n'
        'sglang:num_running_reqs{model_name="m",tp_rank="0"} 1.0\n'
        'sglang:num_running_reqs{model_name="m",tp_rank="1"} 2.0\n'
        'sglang:token_usage{model_name="m",tp_rank="0"} 0.2\n'
        'sglang:token_usage{model_name="m",tp_rank="1"} 0.4\n'
    )
    m = parse_sglang(text)
    assert m.prompt_tokens_total == 7.0
    assert m.prefix_queries_total is None and m.prefix_hits_total is None
    assert m.running == 3.0
    assert m.kv_usage == pytest.approx(0.3)
    assert m.block_size is None
