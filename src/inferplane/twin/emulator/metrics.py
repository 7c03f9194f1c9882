"""vLLM's ``/metrics`` page for one emulated engine, rendered by hand.

The page uses vLLM v1's metric names, label sets (``model_name``, ``engine="0"``) and histogram
bucket boundaries (``vllm/v1/metrics/loggers.py``), so the gateway's scraper
(:func:`inferplane.fleet.engine_metrics.parse_vllm`) and third-party routers read it as they
would read a real engine. Rendering by hand keeps a scrape at a few tens of microseconds, which
matters with a dozen engines scraped every 100 ms in one process.

Exported:

- gauges ``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
  ``vllm:kv_cache_usage_perc`` (0–1) and the info gauge ``vllm:cache_config_info`` (value 1,
  labels ``block_size``, ``num_gpu_blocks``, …);
- counters ``vllm:prefix_cache_queries_total``, ``vllm:prefix_cache_hits_total`` (tokens),
  ``vllm:prompt_tokens_total``, ``vllm:generation_tokens_total``,
  ``vllm:num_preemptions_total``, ``vllm:request_success_total{finished_reason}``;
- histograms ``vllm:time_to_first_token_seconds``, ``vllm:inter_token_latency_seconds``,
  ``vllm:e2e_request_latency_seconds``, ``vllm:request_queue_time_seconds``.

Histogram observations are engine (virtual) seconds, as the engine reports them.

The families are written as prometheus_client (which vLLM's page is) writes them in the text
format: a counter's ``# HELP`` and ``# TYPE`` lines name it with ``_total``, and each counter and
histogram is followed by its ``<name>_created`` gauge (when the page was made, Unix seconds)
unless that library's switch is off (``PROMETHEUS_DISABLE_CREATED_SERIES``,
``disable_created_metrics``; `inferplane.telemetry.metrics.created_series`). Parsed with
``prometheus_client.parser.text_string_to_metric_families``, the page gives the families, types
and samples that vLLM's own page gives for the same metrics (tests/test_emulator_exposition.py).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from prometheus_client.utils import floatToGoString

from inferplane.telemetry.metrics import created_series
from inferplane.twin.engine.model import Engine, LatencySample

_go_float: Callable[[float], str] = floatToGoString  # how prometheus_client writes a value

# fmt: off
TTFT_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
ITL_BUCKETS: tuple[float, ...] = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS: tuple[float, ...] = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)
# fmt: on


def restricted(page: str, names: Iterable[str]) -> str:
    """``page`` with only the samples named in ``names``, each kept family's ``# HELP`` and
    ``# TYPE`` lines before its first kept sample: what prometheus_client serves for
    ``name[]`` query parameters (vLLM mounts its app under ``/metrics/``; the gateway asks for
    the samples it reads, `inferplane.fleet.engine_metrics.sample_names`)."""
    keep = frozenset(names)
    out: list[str] = []
    head: list[str] = []
    for line in page.splitlines():
        if line.startswith("#"):
            head = [line] if line.startswith("# HELP") else [*head, line]
            continue
        if line.partition("{")[0].partition(" ")[0] in keep:
            out += head
            head = []
            out.append(line)
    return "\n".join(out) + "\n" if out else ""


@dataclass(slots=True)
class Histogram:
    """A Prometheus histogram: per-bucket counts (non-cumulative), sum and count."""

    name: str
    help: str
    buckets: Sequence[float]
    counts: list[int] = field(init=False)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float, n: int = 1) -> None:
        """Add ``n`` observations of ``value``."""
        self.counts[bisect_left(self.buckets, value)] += n
        self.total += value * n
        self.count += n

    def render(self, labels: str, out: list[str], created: str | None = None) -> None:
        """The family's lines, then its ``_created`` gauge where ``created`` is given."""
        out.append(f"# HELP {self.name} {self.help}")
        out.append(f"# TYPE {self.name} histogram")
        cumulative = 0
        for bound, c in zip(self.buckets, self.counts, strict=False):
            cumulative += c
            out.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {float(cumulative)}')
        out.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {float(self.count)}')
        out.append(f"{self.name}_count{{{labels}}} {float(self.count)}")
        out.append(f"{self.name}_sum{{{labels}}} {self.total!r}")
        if created is not None:
            _created(self.name, self.help, labels, created, out)


def _created(name: str, help_: str, labels: str, created: str, out: list[str]) -> None:
    """A family's ``_created`` gauge, as prometheus_client writes it after the family."""
    out.append(f"# HELP {name}_created {help_}")
    out.append(f"# TYPE {name}_created gauge")
    out.append(f"{name}_created{{{labels}}} {created}")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class EngineMetricsPage:
    """The metrics of one emulated engine; :meth:`render` reads the engine's live counters."""

    def __init__(self, engine: Engine, model_name: str, gpu_memory_utilization: float) -> None:
        self.engine = engine
        self.labels = f'model_name="{_escape(model_name)}",engine="0"'
        cfg = engine.config
        self.cache_info = (
            f'block_size="{cfg.block_size}",cache_dtype="auto",'
            f'enable_prefix_caching="{cfg.enable_prefix_caching}",engine="0",'
            f'gpu_memory_utilization="{gpu_memory_utilization}",'
            f'num_gpu_blocks="{cfg.num_gpu_blocks}"'
        )
        self.histograms = {
            "ttft": Histogram(
                "vllm:time_to_first_token_seconds",
                "Histogram of time to first token in seconds.",
                TTFT_BUCKETS,
            ),
            "itl": Histogram(
                "vllm:inter_token_latency_seconds",
                "Histogram of inter-token latency in seconds.",
                ITL_BUCKETS,
            ),
            "e2e": Histogram(
                "vllm:e2e_request_latency_seconds",
                "Histogram of e2e request latency in seconds.",
                REQUEST_LATENCY_BUCKETS,
            ),
            "queue": Histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                REQUEST_LATENCY_BUCKETS,
            ),
        }
        self.success_total = 0
        # when the page's counters and histograms started: their _created samples
        self.created: str | None = _go_float(time.time()) if created_series() else None
        # () -> watts of each device, modelled by the endpoint from how busy its engine is
        self.device_power: Callable[[], list[float]] | None = None

    def observe(self, samples: Iterable[LatencySample]) -> None:
        """Fold the engine's drained latency samples into the histograms."""
        hists = self.histograms
        for s in samples:
            h = hists.get(s.kind)
            if h is not None:
                h.observe(s.seconds, s.n)
            if s.kind == "e2e":
                self.success_total += s.n

    def render(self) -> str:
        """The whole page in Prometheus text format 0.0.4."""
        e, lab, created = self.engine, self.labels, self.created
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, value: float, labels: str = lab) -> None:
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {kind}")
            out.append(f"{name}{{{labels}}} {float(value)!r}")
            if kind == "counter" and created is not None:
                _created(name.removesuffix("_total"), help_, labels, created, out)

        metric(
            "vllm:num_requests_running",
            "gauge",
            "Number of requests in model execution batches.",
            e.num_running,
        )
        metric(
            "vllm:num_requests_waiting",
            "gauge",
            "Number of requests waiting to be processed.",
            e.num_waiting,
        )
        metric(
            "vllm:kv_cache_usage_perc",
            "gauge",
            "KV-cache usage. 1 means 100 percent usage.",
            e.kv_usage,
        )
        metric(
            "vllm:prefix_cache_queries_total",
            "counter",
            "Prefix cache queries, in terms of number of queried tokens.",
            e.prefix_queries_total,
        )
        metric(
            "vllm:prefix_cache_hits_total",
            "counter",
            "Prefix cache hits, in terms of number of cached tokens.",
            e.prefix_hits_total,
        )
        metric(
            "vllm:num_preemptions_total",
            "counter",
            "Cumulative number of preemption from the engine.",
            e.num_preemptions_total,
        )
        metric(
            "vllm:prompt_tokens_total",
            "counter",
            "Number of prefill tokens processed.",
            e.prompt_tokens_total,
        )
        metric(
            "vllm:generation_tokens_total",
            "counter",
            "Number of generation tokens processed.",
            e.generation_tokens_total,
        )
        metric(
            "vllm:request_success_total",
            "counter",
            "Count of successfully processed requests.",
            self.success_total,
            f'{lab},finished_reason="length"',
        )
        metric(
            "vllm:cache_config_info",
            "gauge",
            "Information of the LLMEngine CacheConfig",
            1,
            self.cache_info,
        )
        for h in self.histograms.values():
            h.render(lab, out, created)
        if self.device_power is not None:
            # the DCGM exporter's gauge, as a node agent merging it into the page would show it
            out.append("# HELP DCGM_FI_DEV_POWER_USAGE Power draw (in W).")
            out.append("# TYPE DCGM_FI_DEV_POWER_USAGE gauge")
            for i, watts in enumerate(self.device_power()):
                out.append(f'DCGM_FI_DEV_POWER_USAGE{{gpu="{i}"}} {watts!r}')
        out.append("")
        return "\n".join(out)
