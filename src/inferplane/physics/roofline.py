"""Roofline step-time estimates for one model replica on one kind of hardware.

One engine iteration (a vLLM "step") processes ``T = P + D`` tokens: ``P`` prefill tokens
(possibly a chunk of a longer prompt whose first ``C`` tokens are already in the KV cache)
and ``D`` decode tokens, one per running sequence, whose KV caches hold ``K`` tokens in all.
Its time is

    compute  = (2 * active_params * T + 4 * layers * q_width * A * attn) / (tp * peak * compute_eff)
               where A = P * (C + P / 2) + K      (attention query-key pairs; with several
               prefill chunks in the step, A = sum of p_i * (c_i + p_i / 2) + K: each
               chunk attends to its own sequence only; attn: hardware.attention_cost_factor,
               the cost of attention's FLOPs relative to the matmuls', 1 in the table)
    memory   = (weight_bytes / tp + kv_bytes_per_token / kv_shards * (C + K + T))
               / (mem_bandwidth * bandwidth_eff)
    comm     = 2 * layers * (allreduce_latency + 2 (tp-1)/tp * T * hidden * 2 / link_bw)
               (tp > 1 only: two all-reduces per layer)
    fixed    = step_overhead + layers * layer_latency      (layer_latency: SRAM systems only)
    seqs     = seq_overhead * (D + [P > 0])                  (calibrated; 0 in the table)
    context  = context_token * K                             (calibrated; 0 in the table)
    step     = max(compute, memory) + comm + fixed + seqs + context

A request's time to first token adds ``hardware.request_overhead_s`` once (calibrated; 0 in
the table): callers add it, as they add ``network_rtt_s``.

Weights are read once per step whatever the batch, which is why decode is memory bound at
small batch and why a mixed step (chunked prefill + decodes) costs little more than either.
Every method is a handful of float operations on constants computed in ``__init__``: the
emulated engine calls ``step_time_s`` once per simulated iteration.

Times never include network: for ``provider-api`` callers add ``hardware.network_rtt_s``.
"""

from __future__ import annotations

from typing import Final

from inferplane.physics.hardware import HardwareProfile
from inferplane.physics.models import PRECISIONS, ModelProfile

#: Per-device memory kept back from the KV cache for activations, CUDA graphs and the
#: allocator (vLLM profiles this at start-up; ~2 % of an 80 GB GPU for an 8B model).
ACTIVATION_RESERVE_FRACTION: Final = 0.02
#: Bytes per element of the KV cache (BF16; vLLM's default ``kv_cache_dtype=auto``).
KV_DTYPE_BYTES: Final = 2
#: Bytes per element of the activations that tensor parallelism all-reduces (BF16).
ACTIVATION_BYTES: Final = 2


class Roofline:
    """Step-time, capacity and energy estimates for ``model`` on ``tp`` devices of
    ``hardware`` with weights in ``precision``.

    Raises ``ValueError`` when the weights (plus the activation reserve) do not fit in
    ``tp`` devices' memory, except on elastic ``provider-api`` hardware.
    """

    __slots__ = (
        "_attn_flops_per_pair",
        "_comm_per_token_s",
        "_context_token_s",
        "_fixed_s",
        "_inv_bandwidth",
        "_inv_flops",
        "_kv_bytes_per_token_per_device",
        "_linear_flops_per_token",
        "_reserve_per_device",
        "_seq_overhead_s",
        "_weight_bytes_per_device",
        "hardware",
        "kv_bytes_per_token",
        "model",
        "precision",
        "tp",
        "weight_bytes",
    )

    def __init__(
        self,
        hardware: HardwareProfile,
        model: ModelProfile,
        tp: int = 1,
        precision: str = "bf16",
    ) -> None:
        if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
            raise ValueError(f"tp must be a positive integer, got {tp!r}")
        if precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {precision!r}; known: {', '.join(sorted(PRECISIONS))}"
            )
        self.hardware = hardware
        self.model = model
        self.tp = tp
        self.precision = precision
        self.weight_bytes = model.weight_bytes(precision)
        self.kv_bytes_per_token = model.kv_bytes_per_token(KV_DTYPE_BYTES)

        self._weight_bytes_per_device = self.weight_bytes / tp
        # KV heads shard across TP ranks; beyond num_kv_heads ranks they are replicated.
        self._kv_bytes_per_token_per_device = self.kv_bytes_per_token / min(tp, model.num_kv_heads)
        self._inv_bandwidth = 1.0 / (hardware.mem_bandwidth * hardware.bandwidth_efficiency)
        self._inv_flops = 1.0 / (
            tp * hardware.peak_flops_for(precision) * hardware.compute_efficiency
        )
        self._linear_flops_per_token = 2.0 * model.active_params
        # attention's FLOPs per query-key pair, priced relative to the matmuls' FLOPs
        # (``attention_cost_factor``: 1 in the table, fitted for a CPU engine)
        self._attn_flops_per_pair = (
            4.0 * model.layers * model.attention_width * hardware.attention_cost_factor
        )
        if tp > 1:
            allreduces = 2 * model.layers
            ring_factor = 2.0 * (tp - 1) / tp
            comm_fixed_s = allreduces * hardware.allreduce_latency_s
            self._comm_per_token_s = (
                allreduces
                * ring_factor
                * model.hidden_size
                * ACTIVATION_BYTES
                / hardware.interconnect_bandwidth
            )
        else:
            comm_fixed_s = 0.0
            self._comm_per_token_s = 0.0
        # Everything a step pays whatever its size: overhead, layer hops, all-reduce latency.
        self._fixed_s = (
            hardware.step_overhead_s + model.layers * hardware.layer_latency_s + comm_fixed_s
        )
        self._seq_overhead_s = hardware.seq_overhead_s
        self._context_token_s = hardware.context_token_s
        self._reserve_per_device = ACTIVATION_RESERVE_FRACTION * hardware.mem_capacity

        if not hardware.elastic:
            needed = self._weight_bytes_per_device + self._reserve_per_device
            if needed > hardware.mem_capacity:
                raise ValueError(
                    f"model {model.name!r} does not fit on tp={tp} x {hardware.name} at "
                    f"{precision}: weights {self.weight_bytes / 1e9:.1f} GB "
                    f"({self._weight_bytes_per_device / 1e9:.1f} GB per device) + activation "
                    f"reserve {self._reserve_per_device / 1e9:.1f} GB per device > "
                    f"{hardware.mem_capacity / 1e9:.1f} GB per device"
                )

    def __repr__(self) -> str:
        return (
            f"Roofline(hardware={self.hardware.name!r}, model={self.model.name!r}, "
            f"tp={self.tp}, precision={self.precision!r})"
        )

    # -- time -------------------------------------------------------------------------

    def step_time_s(
        self,
        prefill_tokens: int,
        prefill_context_tokens: int,
        decode_seqs: int,
        decode_context_tokens: int,
        prefill_pairs: float | None = None,
    ) -> float:
        """Seconds for one mixed iteration: ``P = prefill_tokens`` uncached prompt tokens
        whose sequence already has ``C = prefill_context_tokens`` cached, plus
        ``D = decode_seqs`` decode tokens over ``K = decode_context_tokens`` cached tokens
        in all. ``max(compute, memory) + comm + fixed + seqs`` with T = P + D and attention
        pairs A = P (C + P/2) + K (see the module docstring); 0.0 for an empty step.

        With several prefill chunks in one step pass their summed tokens and summed cached
        context, and ``prefill_pairs`` = sum of p_i (c_i + p_i/2) over the chunks: each chunk's
        queries attend to its own sequence's keys only. Without it the one-sequence formula
        P (C + P/2) of the sums counts every chunk's queries against every other chunk's
        context too (for two 8,000-token chunks at 16,000 tokens of context each, about twice
        the attention work).
        """
        tokens = prefill_tokens + decode_seqs
        if tokens <= 0:
            return 0.0
        if prefill_pairs is None:
            pairs = prefill_tokens * (prefill_context_tokens + 0.5 * prefill_tokens)
        else:
            pairs = prefill_pairs
        pairs += decode_context_tokens
        compute = (
            self._linear_flops_per_token * tokens + self._attn_flops_per_pair * pairs
        ) * self._inv_flops
        kv_tokens = prefill_context_tokens + decode_context_tokens + tokens
        memory = (
            self._weight_bytes_per_device + kv_tokens * self._kv_bytes_per_token_per_device
        ) * self._inv_bandwidth
        bound = compute if compute > memory else memory
        step = bound + tokens * self._comm_per_token_s + self._fixed_s
        if self._seq_overhead_s:
            step += self._seq_overhead_s * (decode_seqs + (prefill_tokens > 0))
        if self._context_token_s:
            step += self._context_token_s * decode_context_tokens
        return step

    def step_terms(
        self,
    ) -> tuple[float, float, float, float, float, float, float, float, float, float]:
        """The constants of `step_time_s`, for a caller that inlines it in a hot loop (the fused
        scoring pass): ``(linear FLOPs per token, attention FLOPs per pair, 1 / FLOP/s, weight
        bytes per device, KV bytes per token per device, 1 / bytes/s, comm s per token, fixed
        s, seq overhead s, s per decode context token)``. An inlined copy must use them in
        `step_time_s`'s order of operations (the fused pass is held to the plain one by tests)."""
        return (
            self._linear_flops_per_token,
            self._attn_flops_per_pair,
            self._inv_flops,
            self._weight_bytes_per_device,
            self._kv_bytes_per_token_per_device,
            self._inv_bandwidth,
            self._comm_per_token_s,
            self._fixed_s,
            self._seq_overhead_s,
            self._context_token_s,
        )

    def prefill_time_s(self, new_tokens: int, context_tokens: int = 0) -> float:
        """Seconds to prefill ``new_tokens`` uncached tokens in one pass when
        ``context_tokens`` are already cached: ``step_time_s(new, context, 0, 0)``, i.e.
        FLOPs 2 N_active new + 4 layers q_width new (context + new/2) over tp x peak x
        compute_eff, never below reading the weights once, plus all-reduce and overhead."""
        if new_tokens < 0 or context_tokens < 0:
            raise ValueError("token counts must be >= 0")
        return self.step_time_s(new_tokens, context_tokens, 0, 0)

    def decode_step_time_s(self, batch_size: int, context_tokens: int) -> float:
        """Seconds for one decode iteration of ``batch_size`` sequences holding
        ``context_tokens`` KV tokens together: ``max((weights/tp + KV read) / (bw x eff),
        2 N_active B + 4 layers q_width K FLOPs / (tp x peak x eff)) + comm + overhead``."""
        if batch_size < 0 or context_tokens < 0:
            raise ValueError("batch_size and context_tokens must be >= 0")
        if self.model.embedding:
            raise ValueError(f"model {self.model.name!r} is an embedding model: no decode")
        return self.step_time_s(0, 0, batch_size, context_tokens)

    # -- capacity ---------------------------------------------------------------------

    def kv_capacity_tokens(self, gpu_memory_utilization: float = 0.9) -> int:
        """KV-cache tokens that fit: ``(tp x mem_capacity x util - weights - tp x reserve)
        / kv_bytes_per_token``, where reserve is ``ACTIVATION_RESERVE_FRACTION`` of a
        device's memory; 0 if nothing is left. Elastic hardware reports its nominal pool."""
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        free = self.tp * (
            self.hardware.mem_capacity * gpu_memory_utilization - self._reserve_per_device
        )
        free -= self.weight_bytes
        if free <= 0:
            return 0
        return int(free / self.kv_bytes_per_token)

    def kv_blocks(self, block_size: int = 16, gpu_memory_utilization: float = 0.9) -> int:
        """Paged KV blocks of ``block_size`` tokens: ``kv_capacity_tokens // block_size``."""
        if block_size <= 0:
            raise ValueError("block_size must be > 0")
        return self.kv_capacity_tokens(gpu_memory_utilization) // block_size

    # -- energy -----------------------------------------------------------------------

    def joules_per_token(self, batch_size: int = 32, context_tokens: int = 2048) -> float:
        """Energy per generated token at a steady decode operating point of ``batch_size``
        sequences of ``context_tokens`` each: ``tp x power_watts x decode_step_time_s(B,
        B x context) / B`` (TDP, so an upper bound on the accelerators' share)."""
        if batch_size <= 0:
            raise ValueError("batch_size must be > 0")
        step = self.decode_step_time_s(batch_size, batch_size * context_tokens)
        return self.tp * self.hardware.power_watts * step / batch_size


def min_tensor_parallel(
    hardware: HardwareProfile, model: ModelProfile, precision: str = "bf16", max_tp: int = 8
) -> int | None:
    """Smallest power-of-two ``tp <= max_tp`` on which ``model`` fits ``hardware`` at
    ``precision`` (see ``Roofline``), or ``None`` if none does."""
    tp = 1
    while tp <= max_tp:
        try:
            Roofline(hardware, model, tp, precision)
        except ValueError:
            tp *= 2
            continue
        return tp
    return None
