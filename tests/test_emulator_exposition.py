"""An emulated engine's ``/metrics`` page parses as vLLM's own page does (issue 13 follow-ups).

vLLM defines these metrics as prometheus_client ``Gauge``, ``Counter`` and ``Histogram``
objects (``vllm/v1/metrics/loggers.py``: a counter is named without ``_total``, e.g.
``Counter(name="vllm:prefix_cache_queries", ...)``) and serves them with prometheus_client's
text exposition, which names a counter's ``# HELP``/``# TYPE`` with ``_total`` and writes a
``<name>_created`` gauge after each counter and histogram. The reference page here is built the
same way, with the emulator's values; ``text_string_to_metric_families`` must give the same
families (name, type, help) with the same samples from both. Before, the emulator's ``# TYPE``
lines named counters without ``_total``: the parser read a counter with no samples and an
untyped ``..._total`` family beside it, and there were no ``_created`` series.
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from inferplane.twin.emulator import metrics as emu
from inferplane.twin.emulator.metrics import EngineMetricsPage, restricted
from inferplane.twin.engine.model import EngineConfig

LABELS = ["model_name", "engine"]
VALUES = {"num_running": 3, "num_waiting": 2, "kv_usage": 0.25, "prefix_queries_total": 640,
          "prefix_hits_total": 320, "num_preemptions_total": 1, "prompt_tokens_total": 900,
          "generation_tokens_total": 150}
OBSERVED = {"ttft": [0.05, 0.3], "itl": [0.02, 0.02, 0.04], "e2e": [1.2, 2.0], "queue": [0.0]}


def _engine() -> Any:
    return SimpleNamespace(config=EngineConfig(num_gpu_blocks=1000), **VALUES)


def _emulated() -> EngineMetricsPage:
    page = EngineMetricsPage(_engine(), "m", 0.9)
    for kind, values in OBSERVED.items():
        for v in values:
            page.histograms[kind].observe(v)
    page.success_total = len(OBSERVED["e2e"])
    return page


def _vllm_registry(page: EngineMetricsPage) -> CollectorRegistry:
    """The same metrics defined as vLLM defines them, holding the emulator's values."""
    r = CollectorRegistry()
    lv = ("m", "0")
    gauges = {"vllm:num_requests_running": ("Number of requests in model execution batches.",
                                            VALUES["num_running"]),
              "vllm:num_requests_waiting": ("Number of requests waiting to be processed.",
                                            VALUES["num_waiting"]),
              "vllm:kv_cache_usage_perc": ("KV-cache usage. 1 means 100 percent usage.",
                                           VALUES["kv_usage"])}
    for name, (doc, value) in gauges.items():
        Gauge(name=name, documentation=doc, labelnames=LABELS, registry=r).labels(*lv).set(value)
    counters = {
        "vllm:prefix_cache_queries": ("Prefix cache queries, in terms of number of queried "
                                      "tokens.", VALUES["prefix_queries_total"]),
        "vllm:prefix_cache_hits": ("Prefix cache hits, in terms of number of cached tokens.",
                                   VALUES["prefix_hits_total"]),
        "vllm:num_preemptions": ("Cumulative number of preemption from the engine.",
                                 VALUES["num_preemptions_total"]),
        "vllm:prompt_tokens": ("Number of prefill tokens processed.",
                               VALUES["prompt_tokens_total"]),
        "vllm:generation_tokens": ("Number of generation tokens processed.",
                                   VALUES["generation_tokens_total"]),
    }
    for name, (doc, value) in counters.items():
        Counter(name=name, documentation=doc, labelnames=LABELS, registry=r).labels(*lv).inc(
            value)
    Counter(name="vllm:request_success", documentation="Count of successfully processed requests.",
            labelnames=[*LABELS, "finished_reason"], registry=r).labels(*lv, "length").inc(
        page.success_total)
    info = {"block_size": "16", "cache_dtype": "auto", "enable_prefix_caching": "True",
            "engine": "0", "gpu_memory_utilization": "0.9", "num_gpu_blocks": "1000"}
    Gauge(name="vllm:cache_config_info", documentation="Information of the LLMEngine CacheConfig",
          labelnames=list(info), registry=r).labels(**info).set(1)
    for kind, h in page.histograms.items():
        child = Histogram(name=h.name, documentation=h.help, buckets=h.buckets,
                          labelnames=LABELS, registry=r).labels(*lv)
        for v in OBSERVED[kind]:
            child.observe(v)
    return r


def _families(text: str) -> dict[str, tuple[str, str, dict[tuple[str, tuple[Any, ...]], float]]]:
    """name -> (type, help, {(sample name, labels): value}); ``_created`` values left out (they
    are clock readings), their presence kept."""
    out = {}
    for f in text_string_to_metric_families(text):
        samples = {(s.name, tuple(sorted(s.labels.items()))):
                   (0.0 if s.name.endswith("_created") else s.value) for s in f.samples}
        out[f.name] = (f.type, f.documentation, samples)
    return out


def test_the_page_parses_as_prometheus_clients_exposition_of_the_same_metrics() -> None:
    page = _emulated()
    ours = _families(page.render())
    theirs = _families(generate_latest(_vllm_registry(page)).decode())
    assert {n: t for n, (t, _, _) in ours.items()} == {n: t for n, (t, _, _) in theirs.items()}
    assert ours == theirs
    # counters are counters with their _total sample, not a counter with none beside an
    # untyped family
    assert ours["vllm:prefix_cache_queries"][0] == "counter"
    assert "vllm:prefix_cache_queries_total" not in ours
    assert ours["vllm:prefix_cache_queries_created"][0] == "gauge"


def test_counter_type_lines_match_vllms_byte_for_byte() -> None:
    """The ``# HELP`` and ``# TYPE`` lines, in order, are the library's."""
    page = _emulated()
    ours = [ln for ln in page.render().splitlines() if ln.startswith("#")]
    theirs = [ln for ln in generate_latest(_vllm_registry(page)).decode().splitlines()
              if ln.startswith("#")]
    assert ours == theirs


def test_created_is_when_the_page_was_made() -> None:
    before = time.time()
    page = _emulated()
    after = time.time()
    [created] = [s for f in text_string_to_metric_families(page.render())
                 if f.name == "vllm:prompt_tokens_created" for s in f.samples]
    assert before <= created.value <= after + 1e-3


def test_no_created_series_when_prometheus_client_would_write_none() -> None:
    was_on = emu.created_series()
    prometheus_client.disable_created_metrics()
    try:
        text = _emulated().render()
    finally:  # as it was (off where the environment says PROMETHEUS_DISABLE_CREATED_SERIES)
        if was_on:
            prometheus_client.enable_created_metrics()
    assert "_created" not in text
    assert "# TYPE vllm:prompt_tokens_total counter" in text


def test_a_restricted_page_is_what_prometheus_client_serves_for_name_filters() -> None:
    """``/metrics/?name[]=…``: only the samples named, under their family's head lines; the
    ``_created`` gauges are not among them."""
    page = _emulated()
    names = ["vllm:prefix_cache_queries_total", "vllm:num_requests_waiting",
             "vllm:time_to_first_token_seconds_sum"]
    ours = _families(restricted(page.render(), names))
    theirs = _families(generate_latest(_vllm_registry(page).restricted_registry(names)).decode())
    assert ours == theirs
