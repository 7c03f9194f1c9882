"""bench/request_path_cuts.py: session 20's cuts of the gateway's own CPU per request, old
against new in one process, on the real-engine bench's fleet file and requests.

    python bench/request_path_cuts.py [--rounds 7] [--requests 300] [--only NAME ...]

Builds the gateway's core (`api.pipeline.Gateway`, not started: no scrapes, no sockets) from the
fleet file `bench/peers/cpu_per_request.py` gives its gateway (three endpoints, KV events, the
tiny model's tokenizer) and the bench's trace slice of text completions, and times each cut on
uvloop with the code before it (``old``, kept here verbatim) and after it (``new``, the
package's), alternating the two in ``--rounds`` rounds; prints µs per request (median of the
rounds, min-max) and the ratio. Each cut is exact: the same placement input, ledger bytes,
client bytes and metrics; where a cut's output can be compared here it is, before timing.

- ``settle``: a request's admission settle (`Admission.finish_soon` then `Admission.settled`,
  as `Core.committed` runs them): a task and a wait with a timeout (old) against the settle
  started at once (`inferplane.eagerly`), which on the in-memory store ends before it returns.
- ``placement_metrics``: a decision's plugin timings into their histogram
  (`GatewayMetrics.observe_placement`): each key split and looked up by its labels (old)
  against its child cached by key (new).
- ``itl``: a stream's 16 inter-token gaps into the endpoint's window, one `LiveFleet.observe_itl`
  call each (old) against one `LiveFleet.observe_itls` call (new).
- ``block_hashes``: the engine block hashes of each prompt's token ids (`tokenization.
  block_hashes`), one `hash_block_tokens` call a block (old) against the same hash inlined.
- ``tokenize``: `Classifier._tokenize` of each prompt, the result built by
  `dataclasses.replace` (old) against one constructor call (new), around an encoding that
  returns the real tokenizer's ids known in advance (the encoding itself is unchanged); and
  ``s20``, session 20's, which made the cut with a constructor call in each of three branches
  (session 21 folded them into one: its row and ``new ÷ s20``, the median and range of the
  rounds' ratios, say what that cost).
- ``dispatch_cms``: the two boundaries around an upstream wait, as `Dispatcher.open` and
  `Dispatcher.first_chunk` enter them (each once a request): `_translate` and
  `_first_byte_deadline` as generator context managers (old) against classes (new), around
  an empty block, with the gateway's `LoopLag`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

ROOT = Path(__file__).resolve().parents[1]
for _p in (str(ROOT / "src"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from bench.peers.gateway_gap import bench_slice, gateway_config  # noqa: E402
from inferplane.admission.controller import Admission, Ticket  # noqa: E402
from inferplane.api.pipeline import Gateway  # noqa: E402
from inferplane.config.loader import load_config  # noqa: E402
from inferplane.dispatch.answer import UpstreamAttemptFailed  # noqa: E402
from inferplane.dispatch.upstream import (  # noqa: E402
    LAG_STRETCH,
    _first_byte_deadline,
    _translate,
)
from inferplane.fleet.model import Endpoint  # noqa: E402
from inferplane.looplag import LoopLag  # noqa: E402
from inferplane.placement.classify import Classifier, Prompt, extract_prompt  # noqa: E402
from inferplane.telemetry.metrics import GatewayMetrics  # noqa: E402
from inferplane.tokenization import ROOT_HASH_SEED, block_hashes, encode  # noqa: E402

Timed = Callable[[], Awaitable[None]]


def build_gateway(work: Path) -> Gateway:
    engines = [(f"http://127.0.0.1:{9 + i}", f"tcp://127.0.0.1:{19 + i}") for i in range(3)]
    path = gateway_config(engines, 8080, "", work, "cuts")
    return Gateway(load_config(path), str(path))


# -- settle ---------------------------------------------------------------------------------------

def old_finish_soon(self: Admission, t: Ticket) -> asyncio.Future[None]:
    """`Admission.finish_soon` before session 20 (c2d3e64)."""
    if t.settling is None:
        t.settling = asyncio.create_task(self.finish(t))
        self._tasks.add(t.settling)
        t.settling.add_done_callback(self._finished)
    return t.settling


async def tickets(gw: Gateway, bodies: list[bytes]) -> list[Ticket]:
    """Admitted tickets of the bench's requests (classified as the gateway does)."""
    tenant, key_hash = gw.authenticate_key("Bearer sk-h100x8-demo")
    out = []
    for raw in bodies:
        body = orjson.loads(raw)
        profile = gw.classify("completions", body, {}, tenant)
        out.append(await gw.admission.admit("completions", body, raw, {}, tenant, key_hash,
                                            profile))
    return out


def settle_case(gw: Gateway, bodies: list[bytes]) -> dict[str, Timed]:
    adm = gw.admission
    new_finish_soon = Admission.finish_soon

    def run(finish_soon: Any) -> Timed:
        async def timed() -> None:
            elapsed = 0.0
            for i in range(0, len(bodies), 50):  # 50 in flight at most: the queue has room
                ts = await tickets(gw, bodies[i : i + 50])
                for t in ts:
                    t.observe(0.0001, t.profile.prompt_tokens, 16)
                Admission.finish_soon = finish_soon  # type: ignore[method-assign]
                try:
                    t0 = time.process_time()
                    for t in ts:
                        adm.finish_soon(t)
                        await adm.settled(t, 2.0)
                    elapsed += time.process_time() - t0
                finally:
                    Admission.finish_soon = new_finish_soon  # type: ignore[method-assign]
            timed.elapsed = elapsed  # type: ignore[attr-defined]
        return timed

    return {"old": run(old_finish_soon), "new": run(new_finish_soon)}


def timed_loop(fn: Callable[[], None]) -> Timed:
    """An async wrapper that times one call of ``fn`` (its CPU time into ``.elapsed``)."""
    async def timed() -> None:
        t0 = time.process_time()
        fn()
        timed.elapsed = time.process_time() - t0  # type: ignore[attr-defined]
    return timed


# -- placement_metrics ----------------------------------------------------------------------------

def old_observe_placement(m: GatewayMetrics, timings_s: dict[str, float]) -> None:
    """`GatewayMetrics.observe_placement` before session 20."""
    for key, seconds in timings_s.items():
        stage, _, plugin = key.partition(":")
        m.child(m.placement, stage, plugin).observe(seconds)


def placement_metrics_case(gw: Gateway, bodies: list[bytes]) -> dict[str, Timed]:
    tenant, _ = gw.authenticate_key("Bearer sk-h100x8-demo")
    timings = [gw.decide(gw.classify("completions", orjson.loads(b), {}, tenant)).timings_s
               for b in bodies]
    old_m, new_m = GatewayMetrics(), GatewayMetrics()

    def old() -> None:
        for t in timings:
            old_observe_placement(old_m, t)

    def new() -> None:
        for t in timings:
            new_m.observe_placement(t)

    return {"old": timed_loop(old), "new": timed_loop(new)}


# -- itl ------------------------------------------------------------------------------------------

def itl_case(gw: Gateway, bodies: list[bytes]) -> dict[str, Timed]:
    live = gw.live
    gaps = [0.002 + 1e-6 * i for i in range(16)]

    def old() -> None:
        for _ in bodies:
            for g in gaps:
                live.observe_itl("vllm-0", g)

    def new() -> None:
        for _ in bodies:
            live.observe_itls("vllm-1", gaps)

    return {"old": timed_loop(old), "new": timed_loop(new)}


# -- block_hashes ---------------------------------------------------------------------------------

def old_block_hashes(token_ids: list[int], block_size: int, parent: int | None = None
                     ) -> list[int]:
    """`tokenization.block_hashes` before session 20 (with `hash_block_tokens` as it is)."""
    def hash_block_tokens(parent: int | None, tokens: list[int]) -> int:
        return hash((ROOT_HASH_SEED if parent is None else parent, tuple(tokens))) & (
            (1 << 64) - 1)
    out: list[int] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start : start + block_size])
        out.append(parent)
    return out


def block_hashes_case(gw: Gateway, bodies: list[bytes]) -> dict[str, Timed]:
    tok = gw.classifier.tokenizers[next(iter(gw.classifier.tokenizers))]
    ids = [encode(tok, orjson.loads(b)["prompt"]) for b in bodies]
    for i in ids[:20]:
        assert old_block_hashes(i, 16, 99) == block_hashes(i, 16, 99)

    def old() -> None:
        for i in ids:
            old_block_hashes(i, 16, 99)

    def new() -> None:
        for i in ids:
            block_hashes(i, 16, 99)

    return {"old": timed_loop(old), "new": timed_loop(new)}


# -- tokenize -------------------------------------------------------------------------------------

def old_tokenize(tok: Any, prompt: Prompt) -> Prompt:
    """`Classifier._tokenize` before session 20."""
    if prompt.ids is not None:
        return prompt
    ids = encode(tok, prompt.text)
    if prompt.template:
        return dataclasses.replace(prompt, tokens=len(ids))
    if prompt.count > 1:
        return dataclasses.replace(prompt, ids=ids)
    return dataclasses.replace(prompt, tokens=len(ids), ids=ids)


def s20_tokenize(tok: Any, prompt: Prompt) -> Prompt:
    """`Classifier._tokenize` in session 20: built field by field in three branches."""
    if prompt.ids is not None:
        return prompt
    ids = encode(tok, prompt.text)
    text, max_out, count, template = (
        prompt.text, prompt.max_output_tokens, prompt.count, prompt.template)
    if template:
        return Prompt(text=text, tokens=len(ids), max_output_tokens=max_out, ids=None,
                      count=count, template=template)
    if count > 1:
        return Prompt(text=text, tokens=prompt.tokens, max_output_tokens=max_out, ids=ids,
                      count=count, template=template)
    return Prompt(text=text, tokens=len(ids), max_output_tokens=max_out, ids=ids,
                  count=count, template=template)


class Encoded:
    """What the tokenizers library's ``encode_batch_fast`` gives for one text: its ``ids``."""

    __slots__ = ("ids",)

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids


class KnownIds:
    """A tokenizer that has every prompt's ids already (the real one's, encoded once), so the
    case times what `_tokenize` does around the encoding, which the cut does not change."""

    def __init__(self, tok: Any, texts: list[str]) -> None:
        self.known = {t: Encoded(encode(tok, t)) for t in texts}

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool) -> list[Encoded]:
        return [self.known[texts[0]]]


def tokenize_case(gw: Gateway, bodies: list[bytes]) -> dict[str, Timed]:
    prompts = [extract_prompt("completions", orjson.loads(b), "words", counted=True)
               for b in bodies]
    real = gw.classifier.tokenizers[next(iter(gw.classifier.tokenizers))]
    tok = KnownIds(real, [p.text for p in prompts])
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # as `inferplane serve` sets it
    for p in prompts[:20]:
        assert old_tokenize(tok, p) == s20_tokenize(tok, p) == Classifier._tokenize(tok, p)

    def run(tokenize: Callable[[Any, Prompt], Prompt]) -> Timed:
        def each() -> None:
            for p in prompts:
                tokenize(tok, p)
        return timed_loop(each)

    return {"old": run(old_tokenize), "new": run(Classifier._tokenize), "s20": run(s20_tokenize)}


# -- dispatch_cms ---------------------------------------------------------------------------------

@contextlib.contextmanager
def old_translate(endpoint: Endpoint) -> Iterator[None]:
    """`dispatch.upstream._translate` before session 20."""
    try:
        yield
    except TimeoutError:
        raise UpstreamAttemptFailed(
            "timed out before answering", upstream=endpoint.name, reason="timeout"
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise UpstreamAttemptFailed(
            f"cannot connect ({exc.os_error.strerror or exc.os_error})",
            upstream=endpoint.name,
            reason="connect",
        ) from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise UpstreamAttemptFailed(
            f"connection failed ({type(exc).__name__})", upstream=endpoint.name,
            reason="connection"
        ) from None


@contextlib.asynccontextmanager
async def old_first_byte_deadline(
    endpoint: Endpoint, seconds: float | None, lag: LoopLag | None = None,
    max_s: float | None = None,
) -> AsyncGenerator[None, None]:
    """`dispatch.upstream._first_byte_deadline` before session 20."""
    if seconds is None:
        yield
        return
    if max_s is None:
        max_s = LAG_STRETCH * seconds
    try:
        async with (
            asyncio.timeout(min(seconds, max_s)) if lag is None
            else lag.deadline(seconds, max_s)
        ) as deadline:
            yield
    except TimeoutError:
        if not deadline.expired():
            raise
        raise UpstreamAttemptFailed(
            f"sent no first byte within {seconds:.3g} s (first-byte timeout)",
            upstream=endpoint.name,
            reason="first_byte_timeout",
        ) from None


def dispatch_cms_case(gw: Gateway, bodies: list[bytes]) -> dict[str, Timed]:
    endpoint, lag = gw.fleet.endpoints[0], gw.lag

    def run(translate: Any, deadline: Any) -> Timed:
        async def timed() -> None:
            t0 = time.process_time()
            for _ in bodies:
                for _ in range(2):  # open, then first_chunk
                    with translate(endpoint):
                        async with deadline(endpoint, 0.5, lag, 1.5):
                            pass
            timed.elapsed = time.process_time() - t0  # type: ignore[attr-defined]
        return timed

    return {"old": run(old_translate, old_first_byte_deadline),
            "new": run(_translate, _first_byte_deadline)}


CASES = {"settle": settle_case, "placement_metrics": placement_metrics_case, "itl": itl_case,
         "block_hashes": block_hashes_case, "tokenize": tokenize_case,
         "dispatch_cms": dispatch_cms_case}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--only", nargs="*", default=list(CASES))
    a = ap.parse_args(argv)
    _, bodies = bench_slice(0.0, 130.0, 1.0)
    bodies = bodies[: a.requests]
    work = Path(tempfile.mkdtemp(prefix="ip-cuts-"))
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    gw = build_gateway(work)
    print(f"{len(bodies)} requests, {a.rounds} rounds; µs per request (median, min-max)")
    print("| cut | old | new | new ÷ old |")
    print("|---|---|---|---|")
    for name in a.only:
        fns = CASES[name](gw, bodies)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for r in range(a.rounds):
            for k in fns if r % 2 == 0 else list(fns)[::-1]:
                fn = fns[k]
                loop.run_until_complete(fn())
                times[k].append(1e6 * fn.elapsed / len(bodies))  # type: ignore[attr-defined]
        old = statistics.median(times["old"])
        for k in [k for k in times if k != "old"]:  # "new", then any other variant
            label = name if k == "new" else f"{name} [{k}]"
            t = times[k]
            print(f"| {label} | {old:.2f} ({min(times['old']):.2f}-{max(times['old']):.2f}) | "
                  f"{statistics.median(t):.2f} ({min(t):.2f}-{max(t):.2f}) | "
                  f"{statistics.median(t) / old:.2f} |", flush=True)
        for k in [k for k in times if k not in ("old", "new")]:
            ratios = [n / o for n, o in zip(times["new"], times[k], strict=True)]
            print(f"| {name}: new ÷ {k} by round | | | {statistics.median(ratios):.3f} "
                  f"({min(ratios):.3f}-{max(ratios):.3f}) |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
