"""The emulated vLLM v1 scheduler: batching, prefix cache, chunking, preemption, fast-forward."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import pytest

from inferplane.fleet.kv_events import (
    BlockRemoved,
    BlockStored,
    KVEvent,
    decode_event_batch,
    encode_event_batch,
)
from inferplane.twin.engine.model import (
    Engine,
    EngineConfig,
    EngineRequest,
    RequestStatus,
    StepOutput,
    output_token_id,
    output_word,
)
from inferplane.twin.traces.tokens import token_ids


@dataclass
class LinearCost:
    """A fake roofline: fixed overhead plus per-token terms."""

    base: float = 1e-3
    per_prefill: float = 1e-5
    per_prefill_ctx: float = 1e-8
    per_seq: float = 1e-4
    per_ctx: float = 1e-7

    calls: list[tuple[int, int, int, int, float | None]] = field(default_factory=list)

    def step_time_s(
        self, pt: int, pc: int, ds: int, dc: int, prefill_pairs: float | None = None
    ) -> float:
        self.calls.append((pt, pc, ds, dc, prefill_pairs))
        return self.base + self.per_prefill * pt + self.per_prefill_ctx * pc + self.per_seq * ds \
            + self.per_ctx * dc


def _engine(events: list[KVEvent] | None = None, /, **cfg: int | bool) -> Engine:
    config = EngineConfig(**{"num_gpu_blocks": 1000, **cfg})  # type: ignore[arg-type]
    return Engine(config, LinearCost(), events.append if events is not None else None)


def _req(rid: str, prompt: list[int] | range, max_tokens: int = 4, t: float = 0.0) -> EngineRequest:
    return EngineRequest(rid, prompt, max_tokens, arrival_time=t)


def _drain(engine: Engine, now: float = 0.0, ff: bool = False) -> tuple[float, list[StepOutput]]:
    outs = []
    while engine.has_unfinished():
        out = engine.step_many(now) if ff else engine.step(now)
        assert out.duration_s > 0, "an unfinished engine must make progress"
        outs.append(out)
        now = out.end_s
    return now, outs


def _run_alone(engine: Engine, req: EngineRequest, now: float = 0.0) -> float:
    engine.add_request(req, now)
    return _drain(engine, now)[0]


# -- prefix cache ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("prompt_len", "cached"),
    [(40, 32), (32, 16), (48, 32), (17, 16), (16, 0), (5, 0)],
)
def test_repeated_prompt_hits_whole_blocks_and_recomputes_the_last_token(
    prompt_len: int, cached: int
) -> None:
    engine = _engine()
    prompt = list(range(100, 100 + prompt_len))
    _run_alone(engine, _req("a", prompt))
    again = _req("b", prompt)
    engine.add_request(again, 1.0)
    out = engine.step(1.0)
    assert again.num_cached_tokens == cached
    assert out.prefill_tokens == prompt_len - cached
    assert out.new_tokens == {"b": 1}  # the prefill completes: first token
    assert engine.prefix_queries_total == 2 * prompt_len
    assert engine.prefix_hits_total == cached


@pytest.mark.parametrize(("shared", "cached"), [(40, 32), (48, 48), (15, 0)])
def test_shared_prefix_hits_only_the_shared_full_blocks(shared: int, cached: int) -> None:
    engine = _engine()
    prefix = list(range(shared))
    _run_alone(engine, _req("a", prefix + [1000 + i for i in range(30)]))
    b = _req("b", prefix + [2000 + i for i in range(30)])
    _run_alone(engine, b, 1.0)
    assert b.num_cached_tokens == cached


def test_follow_up_turn_resending_prompt_and_answer_hits_the_cache() -> None:
    engine = _engine()
    first = _req("turn-1", list(range(40)), max_tokens=40)
    _run_alone(engine, first)
    answer = first.output_token_ids()
    assert answer == [output_token_id(first.seed, i) for i in range(40)]
    # The answer's text re-tokenizes to the same ids (one word = one token).
    assert token_ids(" ".join(output_word(first.seed, i) for i in range(40))) == answer
    follow = _req("turn-2", list(range(40)) + answer + [7, 7, 7])
    _run_alone(engine, follow, 1.0)
    # KV held prompt + 39 answer tokens (the last sampled token is never computed).
    assert follow.num_cached_tokens == (40 + 39) // 16 * 16


def test_requests_in_the_same_step_share_blocks_cached_at_allocation() -> None:
    engine = _engine()
    for rid in ("a", "b"):
        engine.add_request(_req(rid, list(range(64))), 0.0)
    out = engine.step(0.0)
    assert out.prefill_tokens == 64 + 16  # b reuses a's first three blocks
    assert engine.get_request("b") is not None
    assert engine.get_request("b").num_cached_tokens == 48  # type: ignore[union-attr]


def test_a_step_with_several_prefill_chunks_passes_their_own_attention_pairs() -> None:
    """Each prefilling sequence attends to its own context only: the engine passes the sum of
    n (c + n/2) over the chunks (a lone chunk goes without it, its pairs are the formula's)."""
    cost = LinearCost()
    engine = Engine(EngineConfig(num_gpu_blocks=1000, max_num_batched_tokens=100), cost)
    engine.add_request(_req("a", list(range(130))), 0.0)
    engine.step(0.0)  # a: 100 of 130 tokens
    assert cost.calls[-1] == (100, 0, 0, 0, None)
    engine.add_request(_req("b", list(range(1000, 1050))), 0.0)
    engine.step(1.0)  # a's last 30 tokens at 100 of context, then 50 of b (budget 70 left)
    assert cost.calls[-1] == (80, 100, 0, 0, 30 * (100 + 15) + 50 * (0 + 25))


def test_precomputed_prompt_block_hashes_replace_token_hashing() -> None:
    engine = _engine()
    a = EngineRequest("a", range(40), 2, prompt_block_hashes=[11, 22])
    _run_alone(engine, a)
    b = EngineRequest("b", range(1000, 1040), 2, prompt_block_hashes=[11, 22])
    _run_alone(engine, b, 1.0)
    assert b.num_cached_tokens == 32  # same hashes, different (compact) tokens
    with pytest.raises(ValueError):
        engine.add_request(EngineRequest("c", range(40), 2, prompt_block_hashes=[1]), 2.0)


# -- batching limits ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("budget", "threshold", "chunks"),
    [
        (64, 0, [64, 64, 64, 8]),
        (100, 0, [100, 100]),
        (64, 48, [48, 48, 48, 48, 8]),
        (8192, 0, [200]),
    ],
)
def test_long_prompt_is_chunked_by_the_token_budget(
    budget: int, threshold: int, chunks: list[int]
) -> None:
    engine = _engine(max_num_batched_tokens=budget, long_prefill_token_threshold=threshold)
    engine.add_request(_req("a", list(range(200)), max_tokens=3), 0.0)
    _, outs = _drain(engine)
    assert [o.prefill_tokens for o in outs if o.prefill_tokens] == chunks
    first = next(i for i, o in enumerate(outs) if o.new_tokens)
    assert first == len(chunks) - 1  # the first token comes with the last chunk


def test_without_chunked_prefill_a_prompt_waits_for_a_fresh_budget() -> None:
    engine = _engine(max_num_batched_tokens=100, enable_chunked_prefill=False)
    engine.add_request(_req("a", list(range(60))), 0.0)
    engine.add_request(_req("b", list(range(1000, 1060))), 0.0)
    out = engine.step(0.0)
    assert out.prefill_tokens == 60
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    out = engine.step(out.end_s)
    assert (out.prefill_tokens, out.decode_seqs) == (60, 1)


def test_max_num_seqs_caps_running_and_the_rest_wait() -> None:
    engine = _engine(max_num_seqs=2)
    for i in range(5):
        engine.add_request(_req(f"r{i}", [i] * 20, max_tokens=3), 0.0)
    engine.step(0.0)
    assert (engine.num_running, engine.num_waiting) == (2, 3)
    _, outs = _drain(engine, 1.0)
    assert engine.num_finished_total == 5
    assert max(len(o.new_tokens) for o in outs) == 2


def test_a_step_takes_only_requests_that_arrived_by_its_start() -> None:
    """A request added with an arrival time after the step's start (a real-time caller adds
    it when its handler runs, up to a millisecond or two late, and may start a step at an
    earlier engine time) waits for the next step, and the FCFS queue behind it with it."""
    engine = _engine()
    engine.add_request(_req("a", [1] * 20, max_tokens=2, t=1.0), 1.0)
    engine.add_request(_req("b", [2] * 20, max_tokens=2, t=1.0 + 1e-9), 1.0)
    assert engine.first_arrival() == 1.0
    out = engine.step(1.0)
    assert set(out.new_tokens) == {"a"}
    assert (engine.num_running, engine.num_waiting) == (1, 1)
    assert out.end_s > 1.0 + 1e-9
    out = engine.step(out.end_s)  # after b's arrival: b prefills beside a's decode
    assert set(out.new_tokens) == {"a", "b"}
    assert engine.first_arrival() is None


def test_kv_usage_rises_while_running_and_falls_when_finished() -> None:
    engine = _engine(num_gpu_blocks=100)
    assert engine.kv_usage == 0.0
    engine.add_request(_req("a", list(range(160)), max_tokens=20), 0.0)
    out = engine.step(0.0)
    assert engine.kv_usage == pytest.approx(10 / 100)  # slots for the 160 computed tokens
    usages = []
    now = out.end_s
    while engine.has_unfinished():
        now = engine.step(now).end_s
        usages.append(engine.kv_usage)
    assert max(usages) == pytest.approx(12 / 100)  # 160 + 19 tokens in KV at the end
    assert engine.kv_usage == 0.0


# -- preemption --------------------------------------------------------------------------------
def test_full_kv_preempts_the_latest_request_which_later_completes() -> None:
    # 10 blocks of 16 tokens; each request peaks at 48 + 59 = 107 tokens = 7 blocks.
    engine = _engine(num_gpu_blocks=10)
    a, b = _req("a", list(range(48)), 60), _req("b", list(range(500, 548)), 60, t=0.001)
    engine.add_request(a, 0.0)
    engine.add_request(b, 0.001)
    _, outs = _drain(engine)
    assert engine.num_preemptions_total >= 1
    assert (a.num_preemptions, b.num_preemptions) == (0, engine.num_preemptions_total)
    assert any(o.preempted == ["b"] for o in outs)
    assert a.status is b.status is RequestStatus.FINISHED
    assert a.num_output_tokens == b.num_output_tokens == 60
    assert engine.generation_tokens_total == 120
    assert sum(sum(o.new_tokens.values()) for o in outs) == 120
    assert b.finish_time is not None and a.finish_time is not None
    assert b.finish_time > a.finish_time
    assert engine.kv_usage == 0.0


@pytest.mark.parametrize(
    ("kwargs", "cfg"),
    [
        ({"prompt": list(range(200)), "max_tokens": 1}, {"num_gpu_blocks": 10}),
        ({"prompt": [], "max_tokens": 1}, {}),
        ({"prompt": [1], "max_tokens": 0}, {}),
        ({"prompt": list(range(90)), "max_tokens": 20},
         {"max_num_batched_tokens": 100, "enable_chunked_prefill": False}),
    ],
)
def test_requests_that_could_never_run_are_rejected(
    kwargs: dict[str, object], cfg: dict[str, int | bool]
) -> None:
    engine = _engine(**cfg)
    with pytest.raises(ValueError):
        engine.add_request(_req("x", kwargs["prompt"], kwargs["max_tokens"]), 0.0)  # type: ignore[arg-type]


def test_abort_frees_blocks_and_forgets_the_request() -> None:
    engine = _engine()
    engine.add_request(_req("a", list(range(40)), 10), 0.0)
    engine.add_request(_req("b", list(range(40)), 10), 0.0)
    engine.step(0.0)
    assert engine.abort("a") and engine.abort("b")
    assert not engine.abort("a")
    assert not engine.has_unfinished() and engine.kv_usage == 0.0
    assert engine.step(1.0).duration_s == 0.0


# -- events and samples ------------------------------------------------------------------------
def test_engine_emits_block_events_that_survive_the_wire() -> None:
    events: list[KVEvent] = []
    engine = _engine(events, num_gpu_blocks=8)
    prompt = list(range(40))
    _run_alone(engine, _req("a", prompt, max_tokens=10))
    stored = [e for e in events if isinstance(e, BlockStored)]
    chain = [h for e in stored for h in e.block_hashes]
    assert stored[0].parent_block_hash is None
    assert stored[0].token_ids[:32] == prompt[:32]
    for prev, nxt in itertools.pairwise(stored):
        assert nxt.parent_block_hash == prev.block_hashes[-1]
    assert len(chain) == (40 + 9) // 16
    _run_alone(engine, _req("b", list(range(500, 628)), max_tokens=1), 1.0)  # evicts a's blocks
    removed = [h for e in events if isinstance(e, BlockRemoved) for h in e.block_hashes]
    assert set(chain) <= set(removed)
    assert engine.reset_prefix_cache()
    ts, decoded, rank = decode_event_batch(encode_event_batch(3.0, events, 0))
    assert (ts, decoded, rank) == (3.0, events, 0)


def test_latency_samples_cover_queue_ttft_itl_and_e2e() -> None:
    engine = _engine()
    engine.add_request(_req("a", list(range(40)), max_tokens=5), 0.0)
    end, _ = _drain(engine)
    samples = engine.drain_samples()
    kinds = {s.kind for s in samples}
    assert kinds == {"queue", "ttft", "itl", "e2e"}
    assert sum(s.n for s in samples if s.kind == "itl") == 4
    assert [s.seconds for s in samples if s.kind == "e2e"] == [pytest.approx(end)]
    assert engine.drain_samples() == []
    assert engine.prompt_tokens_total == 40 and engine.generation_tokens_total == 5


# -- fast-forward ------------------------------------------------------------------------------
def _workload(seed: int, n: int) -> list[EngineRequest]:
    rng = random.Random(seed)
    shared = [rng.randrange(50_000) for _ in range(64)]
    reqs, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(20.0)
        body = [rng.randrange(50_000) for _ in range(rng.randint(10, 300))]
        prompt = (shared[: rng.choice((0, 32, 64))]) + body
        reqs.append(EngineRequest(f"r{i}", prompt, rng.randint(1, 120), arrival_time=t))
    return reqs


def _simulate(reqs: list[EngineRequest], ff: bool, **cfg: int) -> tuple[Engine, int]:
    engine = _engine(**cfg)
    pending, i, now, calls = sorted(reqs, key=lambda r: r.arrival_time), 0, 0.0, 0
    while i < len(pending) or engine.has_unfinished():
        while i < len(pending) and pending[i].arrival_time <= now:
            engine.add_request(pending[i], now)
            i += 1
        if not engine.has_unfinished():
            now = pending[i].arrival_time
            continue
        nxt = pending[i].arrival_time if i < len(pending) else math.inf
        out = engine.step_many(now, until=nxt) if ff else engine.step(now)
        assert out.duration_s > 0
        assert out.num_steps == len(out.step_durations)
        now = out.end_s
        calls += 1
    return engine, calls


@pytest.mark.parametrize(("seed", "blocks"), [(1, 2000), (2, 120), (3, 60)])
def test_fast_forward_matches_plain_stepping(seed: int, blocks: int) -> None:
    plain, plain_calls = _simulate(_workload(seed, 60), ff=False, num_gpu_blocks=blocks,
                                   max_num_batched_tokens=256)
    fast_reqs = _workload(seed, 60)
    fast, fast_calls = _simulate(fast_reqs, ff=True, num_gpu_blocks=blocks,
                                 max_num_batched_tokens=256)
    slow_reqs = {r.request_id: r for r in _workload(seed, 60)}
    plain2, _ = _simulate(list(slow_reqs.values()), ff=False, num_gpu_blocks=blocks,
                          max_num_batched_tokens=256)
    for r in fast_reqs:
        s = slow_reqs[r.request_id]
        assert r.finish_time == pytest.approx(s.finish_time, rel=1e-9, abs=1e-9)
        assert r.first_token_time == pytest.approx(s.first_token_time, rel=1e-9, abs=1e-9)
        assert (r.num_cached_tokens, r.num_preemptions) == (s.num_cached_tokens, s.num_preemptions)
    for attr in ("generation_tokens_total", "prompt_tokens_total", "num_preemptions_total",
                 "prefix_queries_total", "prefix_hits_total"):
        assert getattr(fast, attr) == getattr(plain, attr) == getattr(plain2, attr)
    assert fast_calls < plain_calls  # it did group steps
    itl = [s for s in fast.drain_samples() if s.kind == "itl"]
    plain_itl = [s for s in plain2.drain_samples() if s.kind == "itl"]
    assert sum(s.n for s in itl) == sum(s.n for s in plain_itl)
    assert sum(s.n * s.seconds for s in itl) == pytest.approx(
        sum(s.n * s.seconds for s in plain_itl))


def _single_steps(reqs: list[EngineRequest], lazy: bool, settle_every: int, **cfg: int
                  ) -> tuple[Engine, list[tuple[object, ...]]]:
    """Run ``reqs`` one step per call: ``step_many(now, until=now)`` (single steps, applied
    lazily while every request decodes) or plain ``step``; every ``settle_every`` steps read
    a request (which applies the pending steps) and record the pool. Returns the engine and
    everything observable per step."""
    engine = _engine(**cfg)
    pending, i, now, seen = sorted(reqs, key=lambda r: r.arrival_time), 0, 0.0, []
    while i < len(pending) or engine.has_unfinished():
        while i < len(pending) and pending[i].arrival_time <= now:
            engine.add_request(pending[i], now)
            i += 1
        if not engine.has_unfinished():
            now = pending[i].arrival_time
            continue
        out = engine.step_many(now, until=now) if lazy else engine.step(now)
        assert out.num_steps == 1
        seen.append((out.start_s, out.duration_s, dict(out.new_tokens), list(out.finished),
                     list(out.preempted), out.prefill_tokens, out.decode_seqs,
                     engine.num_running, engine.num_waiting, engine.kv_usage,
                     engine.generation_tokens_total, tuple(engine.drain_samples())))
        if len(seen) % settle_every == 0 and engine._running:
            r = engine.get_request(engine._running[0].request_id)
            assert r is not None
            seen.append((r.num_computed_tokens, r.num_output_tokens, r.last_token_time,
                         list(r.block_ids), engine.pool.free_block_order(),
                         sorted(engine.pool._cached.items())))
        now = out.end_s
    return engine, seen


@pytest.mark.parametrize(("seed", "blocks", "settle_every"),
                         [(1, 2000, 7), (2, 200, 5), (3, 130, 3), (4, 400, 1000)])
def test_lazy_single_decode_steps_match_plain_steps(seed: int, blocks: int,
                                                    settle_every: int) -> None:
    """Single decode steps applied lazily leave exactly what plain steps leave: the same
    outputs, gauges and samples at every step, and the same requests, block tables, free-block
    order and prefix cache whenever they are read (preemption included, with few blocks)."""
    cfg = {"num_gpu_blocks": blocks, "max_num_batched_tokens": 256, "block_size": 4}
    lazy, lazy_seen = _single_steps(_workload(seed, 40), True, settle_every, **cfg)
    plain, plain_seen = _single_steps(_workload(seed, 40), False, settle_every, **cfg)
    assert lazy_seen == plain_seen
    assert lazy.pool.free_block_order() == plain.pool.free_block_order()
    assert sorted(lazy.pool._cached.items()) == sorted(plain.pool._cached.items())
    assert lazy.num_preemptions_total == plain.num_preemptions_total


def test_fast_forward_stops_at_until_and_at_the_first_finish() -> None:
    engine = _engine()
    engine.add_request(_req("a", list(range(20)), max_tokens=50), 0.0)
    engine.add_request(_req("b", list(range(100, 120)), max_tokens=10), 0.0)
    now = engine.step(0.0).end_s  # both prefilled
    out = engine.step_many(now, until=now + 1e-9)
    assert out.num_steps == 1  # the first step always runs, the next would start too late
    out = engine.step_many(out.end_s)
    assert out.num_steps == 8 and out.finished == ["b"]
    assert out.new_tokens == {"a": 8, "b": 8}
    out = engine.step_many(out.end_s, max_steps=5)
    assert out.num_steps == 5 and out.new_tokens == {"a": 5}


def test_two_hundred_4k_prompts_complete_in_few_engine_calls() -> None:
    engine = _engine(num_gpu_blocks=20_000, max_num_seqs=64)
    reqs = [EngineRequest(f"q{i}", range(i * 10, i * 10 + 4096), 200, arrival_time=0.0)
            for i in range(200)]
    for r in reqs:
        engine.add_request(r, 0.0)
    _, outs = _drain(engine, ff=True)
    assert all(r.status is RequestStatus.FINISHED for r in reqs)
    assert engine.generation_tokens_total == 200 * 200
    assert engine.prompt_tokens_total == 200 * 4096
    assert len(outs) < sum(o.num_steps for o in outs) / 4  # fast-forward grouped steps
