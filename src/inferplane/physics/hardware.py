"""Hardware profiles: what one device (or one indivisible system) can do.

A ``HardwareProfile`` holds the vendor's peak figures (dense FLOP/s, memory bandwidth and
capacity, power, interconnect) and three calibrated factors that turn peaks into achieved
speed in a vLLM-like engine: ``compute_efficiency`` (prefill), ``bandwidth_efficiency``
(decode) and ``step_overhead_s`` (scheduling, sampling and kernel launches per iteration).
The factors were fitted against published vLLM measurements; ``docs/physics.md`` lists every
figure with its source and the validation table (``bench/physics_validation.py``).

SRAM machines (``groq-lpu``, ``cerebras-wse3``) are described as one *system* (many chips or
wafers serving one model replica), because that is the unit that places a request: their
"device" figures are the system's aggregates. ``provider-api`` is a hosted endpoint: its
figures describe an elastic pool that behaves like a fast GPU; callers add ``network_rtt_s``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

from inferplane.physics.errors import UnknownProfileError

HardwareKind = Literal["gpu", "low-latency", "giant-context", "provider-api", "cpu"]

GB: Final = 1e9
GIB: Final = float(1 << 30)
TB: Final = 1e12
TFLOPS: Final = 1e12
PFLOPS: Final = 1e15


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    """Peak and calibrated performance figures of one device (per device unless noted).

    ``peak_flops`` is dense BF16/FP16 tensor FLOP/s; ``fp8_peak_flops`` the dense FP8/INT8
    figure where the device has such units (``None``: 8-bit runs at ``peak_flops``).
    ``interconnect_bandwidth`` is per-direction bytes/s used by a tensor-parallel ring
    all-reduce, and ``allreduce_latency_s`` the fixed cost of one all-reduce (launch and
    synchronisation), which dominates at decode-sized messages.

    Two overheads are zero in the vendor table and come from calibration against a live engine
    (``physics.calibration``): ``request_overhead_s``, paid once per request before its first
    token (HTTP, tokenisation, scheduling, detokenisation), and ``seq_overhead_s``, paid per
    sequence that produces a token in a step (sampling and output processing), which dominates
    decode on CPU engines and small models. A third, ``context_token_s``, is paid per KV token
    that the decoding sequences of a step attend to: where attention over the cache is not the
    roofline's bandwidth- or FLOP-bound work but a kernel's per-token cost (a CPU engine's paged
    attention; docs/benchmarks.md, "Calibration"). Zero in the table, where the roofline's KV
    bytes and attention FLOPs stand for it.

    Two more describe the engine's *front end* — vLLM's API server, one process that takes
    requests in (HTTP, validation, tokenisation, hand-off to the scheduler) and streams their
    tokens out — as a single server whose work is done one item at a time:
    ``frontend_request_s`` of it per request on the way in and ``frontend_token_s`` per token on
    the way out. A request waits for the work queued ahead of it, so a burst of requests reaches
    the engine one ``frontend_request_s`` apart and a busy stream delays the next request's
    intake. ``frontend_handoff_s`` is the part of a request's intake that runs after its handler
    first yields to the event loop (the prompt's processing, the hand-off to the engine core): it
    queues again, after the request's ``request_overhead_s``, behind whatever arrived meanwhile,
    so a burst's first request reaches the engine only after every request of the burst has had
    its first piece
    (:class:`~inferplane.physics.frontend.FrontEnd`). Zero in the table (a GPU server's front end
    is rarely the bottleneck); calibration measures them from bursts of simultaneous requests
    (``physics.calibration.fit_frontend``).
    ``request_overhead_s`` is the rest of the per-request time, paid in parallel (between
    the intake's two pieces when it has two).

    ``attention_cost_factor`` prices attention apart from the matmuls: one query-key pair's
    attention FLOPs (``physics.roofline``) cost this many times what the same FLOPs cost in the
    weight matmuls at ``compute_efficiency``. 1 in the table (a GPU's attention kernels run near
    its matmuls' efficiency). A CPU engine's prefill attention does not: with head dimensions of
    16-128 and a score matrix written and read for every pair, it is bound by memory traffic per
    pair, not by FLOPs, so a prompt's prefill grows with its length squared far faster than the
    FLOP count says (the fidelity vLLM: ~10-20×; docs/benchmarks.md, session 11). Calibration
    fits it from a prefill sweep of three or more lengths
    (``physics.calibration``).

    ``speed_spread`` and ``speed_spread_window_s`` describe how the engine's speed varies
    around the typical one the factors above describe: on a shared host (another process, a
    hypervisor taking the core) a CPU engine runs every step slower for a while, and a stream
    that falls in such a stretch comes out slower per token than the rest — the tail of time
    per output token that a fixed step time does not have. ``speed_spread`` holds factors, each
    one window's time over the typical time (1.0: typical), as the probe sampled them: every
    decode point of every probe round over that point's median, over the median of its round
    (``physics.calibration.speed_spread``); ``speed_spread_window_s`` is the span each was
    measured over (one probe stream's decode). The emulator draws one factor per window of
    engine time and stretches every step that starts in it (``physics.spread``); the simulator
    and the placement predictor use the typical speed. Empty in the table.

    ``idle_wake_s`` is what a request pays before its first token on an engine that had
    nothing running or waiting for a while (``twin.engine.model.IDLE_WAKE_AFTER_S``) before it
    arrived, over the same request sent right after another: the engine's processes waking
    from their idle wait (the fidelity vLLM: ~3 ms after 0.2 s idle; docs/benchmarks.md,
    session 24). The probe measures it (``physics.probe.IDLE_GAP_S``); the engine model the
    emulator and the simulator share adds it to the first step after such an idle stretch.
    The placement predictor does not (its calibrated targets are requests sent back to back).
    Zero in the table.

    ``after_stream_s`` and ``after_stream_factor`` are what a prefill costs more when the engine
    decoded since its last prefill (a closed loop's next request right after a stream, or a
    request joining streams that decode) than right after another prefill: the step that
    prefills it takes ``after_stream_s + after_stream_factor × its time`` longer. The probe
    measures it (``physics.probe``: each cold prefill try of the sweep again right after an
    untimed stream) and ``physics.calibration.fit_after_stream`` fits the two to the
    differences at every prompt length (the fidelity vLLM on session 27's Intel host: the
    workload's c1 requests +20-25 % over the lone prediction at every length, 32-768 tokens;
    session 28's probe on that host: +1 … +20 % over its cold points, 16-768 tokens; session
    25's AMD host: +1-3 %). The engine model the
    emulator and the simulator share adds it to a step that prefills after a step that only
    decoded (``twin.engine.model``). The placement predictor does not: its calibrated targets
    are requests on an idle engine, and on a busy one its online correction
    (``ttft_ratio_p50``) measures what the engine does. Zero in the table.
    """

    name: str
    kind: HardwareKind
    peak_flops: float
    mem_bandwidth: float
    mem_capacity: float
    power_watts: float
    interconnect_bandwidth: float
    compute_efficiency: float
    bandwidth_efficiency: float
    step_overhead_s: float
    source: str
    fp8_peak_flops: float | None = None
    allreduce_latency_s: float = 0.0
    layer_latency_s: float = 0.0
    network_rtt_s: float = 0.0
    rate_limit_rpm: int | None = None
    request_overhead_s: float = 0.0
    seq_overhead_s: float = 0.0
    context_token_s: float = 0.0
    frontend_request_s: float = 0.0
    frontend_token_s: float = 0.0
    frontend_handoff_s: float = 0.0
    attention_cost_factor: float = 1.0
    speed_spread: tuple[float, ...] = ()
    speed_spread_window_s: float = 0.0
    idle_wake_s: float = 0.0
    after_stream_s: float = 0.0
    after_stream_factor: float = 0.0

    def __post_init__(self) -> None:
        positive = {
            "peak_flops": self.peak_flops,
            "mem_bandwidth": self.mem_bandwidth,
            "mem_capacity": self.mem_capacity,
            "power_watts": self.power_watts,
            "interconnect_bandwidth": self.interconnect_bandwidth,
            "attention_cost_factor": self.attention_cost_factor,
        }
        for field_name, value in positive.items():
            if not value > 0:
                raise ValueError(f"hardware {self.name!r}: {field_name} must be > 0, got {value}")
        for field_name, value in (
            ("compute_efficiency", self.compute_efficiency),
            ("bandwidth_efficiency", self.bandwidth_efficiency),
        ):
            if not 0 < value <= 1:
                raise ValueError(
                    f"hardware {self.name!r}: {field_name} must be in (0, 1], got {value}"
                )
        latencies = (
            self.step_overhead_s,
            self.network_rtt_s,
            self.allreduce_latency_s,
            self.layer_latency_s,
            self.request_overhead_s,
            self.seq_overhead_s,
            self.context_token_s,
            self.frontend_request_s,
            self.frontend_token_s,
            self.frontend_handoff_s,
            self.speed_spread_window_s,
            self.idle_wake_s,
            self.after_stream_s,
            self.after_stream_factor,
        )
        if min(latencies) < 0:
            raise ValueError(f"hardware {self.name!r}: latencies must be >= 0")
        if self.speed_spread and (
            not min(self.speed_spread) > 0
            or not self.speed_spread_window_s > 0
            or not all(math.isfinite(x) for x in (*self.speed_spread, self.speed_spread_window_s))
        ):
            raise ValueError(
                f"hardware {self.name!r}: speed_spread factors must be finite and > 0, with a "
                "finite speed_spread_window_s > 0"
            )

    @property
    def elastic(self) -> bool:
        """True for hosted APIs, whose capacity the caller never runs out of."""
        return self.kind == "provider-api"

    def peak_flops_for(self, precision: str) -> float:
        """Dense FLOP/s for a weight precision: ``fp8_peak_flops`` for fp8/int8 when the
        device has 8-bit tensor units, else ``peak_flops`` (int4 is weight-only: BF16 math)."""
        if precision in ("fp8", "int8") and self.fp8_peak_flops is not None:
            return self.fp8_peak_flops
        if precision == "fp32":
            return self.peak_flops / 2.0
        return self.peak_flops


_H100 = HardwareProfile(
    name="h100",
    kind="gpu",
    peak_flops=989 * TFLOPS,
    fp8_peak_flops=1979 * TFLOPS,
    mem_bandwidth=3.35 * TB,
    mem_capacity=80 * GIB,
    power_watts=700.0,
    interconnect_bandwidth=450 * GB,
    allreduce_latency_s=30e-6,
    compute_efficiency=0.55,
    bandwidth_efficiency=0.80,
    step_overhead_s=2.0e-3,
    source="NVIDIA H100 Tensor Core GPU datasheet (SXM5 80GB); NVLink 4 900 GB/s bidir.",
)

_H200 = HardwareProfile(
    name="h200",
    kind="gpu",
    peak_flops=989 * TFLOPS,
    fp8_peak_flops=1979 * TFLOPS,
    mem_bandwidth=4.8 * TB,
    mem_capacity=141 * GB,
    power_watts=700.0,
    interconnect_bandwidth=450 * GB,
    allreduce_latency_s=30e-6,
    compute_efficiency=0.55,
    bandwidth_efficiency=0.80,
    step_overhead_s=2.0e-3,
    source="NVIDIA H200 Tensor Core GPU datasheet (SXM 141GB HBM3e); NVLink 4.",
)

_A100 = HardwareProfile(
    name="a100",
    kind="gpu",
    peak_flops=312 * TFLOPS,
    fp8_peak_flops=None,
    mem_bandwidth=2.039 * TB,
    mem_capacity=80 * GIB,
    power_watts=400.0,
    interconnect_bandwidth=300 * GB,
    allreduce_latency_s=40e-6,
    compute_efficiency=0.60,
    bandwidth_efficiency=0.80,
    step_overhead_s=2.0e-3,
    source="NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB); NVLink 3 600 GB/s bidir.",
)

_L4 = HardwareProfile(
    name="l4",
    kind="gpu",
    peak_flops=121 * TFLOPS,
    fp8_peak_flops=242 * TFLOPS,
    mem_bandwidth=300 * GB,
    mem_capacity=24 * GB,
    power_watts=72.0,
    interconnect_bandwidth=32 * GB,
    allreduce_latency_s=60e-6,
    compute_efficiency=0.55,
    bandwidth_efficiency=0.80,
    step_overhead_s=2.0e-3,
    source="NVIDIA L4 Tensor Core GPU datasheet (dense = half the sparsity figures); PCIe 4 x16.",
)

_GROQ = HardwareProfile(
    name="groq-lpu",
    kind="low-latency",
    # One system of 576 GroqChips (the size Groq reported for a 70B model): 230 MB SRAM,
    # 80 TB/s on-die bandwidth and 188 TFLOP/s FP16 per chip; ~300 W per chip in service.
    peak_flops=576 * 188 * TFLOPS,
    fp8_peak_flops=576 * 750 * TFLOPS,
    mem_bandwidth=576 * 80 * TB,
    mem_capacity=576 * 230e6,
    power_watts=576 * 300.0,
    interconnect_bandwidth=576 * 0.4 * TB,
    # Aggregate SRAM bandwidth makes the memory term negligible; a token's latency is set by
    # its pipeline through the chips: ~40 us per layer reproduces Groq's public speeds
    # (~300 tok/s for 70B, ~750 tok/s for 8B). Prefill efficiency reflects pipeline fill.
    compute_efficiency=0.05,
    bandwidth_efficiency=0.80,
    layer_latency_s=40e-6,
    step_overhead_s=0.1e-3,
    source="Groq GroqChip/LPU product brief (230 MB SRAM, 80 TB/s, 188 TFLOPS FP16/chip); "
    "576-chip system as in Groq's Llama-2-70B reports.",
)

_CEREBRAS = HardwareProfile(
    name="cerebras-wse3",
    kind="giant-context",
    # One system of 4 CS-3 wafers (how Cerebras serves a 70B model): 44 GB SRAM,
    # 21 PB/s memory bandwidth, 125 PFLOP/s "peak AI" and ~23 kW per CS-3.
    peak_flops=4 * 125 * PFLOPS,
    fp8_peak_flops=None,
    mem_bandwidth=4 * 21e15,
    mem_capacity=4 * 44 * GB,
    power_watts=4 * 23_000.0,
    interconnect_bandwidth=4 * 1.2 * TB,
    # As for Groq, per-layer latency dominates: ~25 us per layer gives ~1,200 tok/s for 8B
    # and ~490 tok/s for 70B, near Cerebras' launch figures (1,800 and 450 tok/s).
    compute_efficiency=0.10,
    bandwidth_efficiency=0.80,
    layer_latency_s=25e-6,
    step_overhead_s=0.05e-3,
    source="Cerebras WSE-3 / CS-3 datasheet (44 GB SRAM, 21 PB/s, 125 PFLOPS, ~23 kW); "
    "4-wafer system as in Cerebras' Llama-3.1-70B inference launch.",
)

_PROVIDER = HardwareProfile(
    name="provider-api",
    kind="provider-api",
    # An elastic pool that behaves like a fast FP8 GPU per request; capacity never runs out.
    peak_flops=2 * 989 * TFLOPS,
    fp8_peak_flops=2 * 1979 * TFLOPS,
    mem_bandwidth=8.0 * TB,
    mem_capacity=1e15,
    power_watts=700.0,
    interconnect_bandwidth=450 * GB,
    allreduce_latency_s=30e-6,
    compute_efficiency=0.55,
    bandwidth_efficiency=0.80,
    step_overhead_s=2.0e-3,
    network_rtt_s=0.2,
    rate_limit_rpm=10_000,
    source="Modelled: hosted API (RTT 0.15-0.3 s to public LLM APIs; tier-dependent RPM limit).",
)

_CPU = HardwareProfile(
    name="cpu",
    kind="cpu",
    # 2 x Xeon Platinum 8480+ (56 cores, AMX): ~2 x 100 TFLOP/s BF16 AMX peak, 8 x DDR5-4800
    # channels per socket (2 x 307 GB/s), 512 GB RAM, 350 W TDP per socket.
    peak_flops=2 * 100 * TFLOPS,
    fp8_peak_flops=None,
    mem_bandwidth=2 * 307 * GB,
    mem_capacity=512 * GB,
    power_watts=2 * 350.0,
    interconnect_bandwidth=62 * GB,
    allreduce_latency_s=20e-6,
    compute_efficiency=0.15,
    bandwidth_efficiency=0.50,
    step_overhead_s=5.0e-3,
    source="Intel Xeon Platinum 8480+ (ARK: 56 cores, 350 W, 8ch DDR5-4800); 2 sockets, UPI.",
)

HARDWARE: Final[dict[str, HardwareProfile]] = {
    p.name: p for p in (_H100, _H200, _A100, _L4, _GROQ, _CEREBRAS, _PROVIDER, _CPU)
}


def get_hardware(name: str) -> HardwareProfile:
    """Return the profile registered as ``name.lower()``; raise ``UnknownProfileError``
    (a ``LookupError`` listing the known names) otherwise."""
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise UnknownProfileError("hardware", name, HARDWARE) from None
