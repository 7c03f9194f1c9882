"""bench/answer_filter: what the bootstrap's Lua answer filter costs Envoy per response.

Two Envoys from one `inferplane envoy-config` bootstrap, each reduced to a static cluster in front
of one fake upstream that answers with a hosted provider's headers (``tests.support.fake_upstream
--mode provider``: a cookie, account ids, rate-limit state; non-streamed answers, no pauses):
``marker`` adds the served-endpoint header on the route as the picker's route does and runs no
Lua; ``filter`` is the same with the answer filter (`epp.envoy_config._answer_filter`) first in
the chain. No picker: its milliseconds would hide the filter's microseconds.

Sequential requests, the two interleaved request by request (same machine noise): the added p50
of ``filter`` over ``marker``. Then ``--requests`` at concurrency 32 on each in turn (twice, in
alternating order): Envoy's CPU per request.

    python bench/answer_filter.py [--seq-requests 3000] [--requests 6000]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from bench.envoy_epp import direct_bootstrap  # noqa: E402
from bench.overhead import BODY, KEY, cpu_seconds  # noqa: E402
from inferplane.config.loader import parse_config  # noqa: E402
from inferplane.epp import protocol as P  # noqa: E402
from inferplane.epp.envoy_config import _answer_filter, bootstrap  # noqa: E402
from tests.builders import pool_fleet, tenant, to_yaml  # noqa: E402
from tests.support.envoy import Envoy  # noqa: E402
from tests.support.procs import Proc, free_port  # noqa: E402


def envoys(upstream: int, workdir: Path) -> dict[str, Envoy]:
    cfg = parse_config(to_yaml(pool_fleet(upstream, tenants=[tenant("t", KEY)])))
    boot = bootstrap(cfg)
    out = {}
    for name in ("marker", "filter"):
        b = direct_bootstrap(boot, upstream, free_port(), free_port())
        hcm = b["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"]
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
        route["response_headers_to_add"] = [
            {"header": {"key": P.SERVED_KEY, "value": "%UPSTREAM_REMOTE_ADDRESS%"},
             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
        if name == "filter":
            hcm["http_filters"] = [copy.deepcopy(_answer_filter([])), *hcm["http_filters"]]
        out[name] = Envoy(b, workdir, name)
    return out


def url(e: Envoy) -> str:
    port = e.bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"][
        "port_value"]
    return f"http://127.0.0.1:{port}/v1/chat/completions"


async def one(s: aiohttp.ClientSession, u: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    async with s.post(u, json=BODY, headers={"Authorization": f"Bearer {KEY}"}) as r:
        await r.read()
        assert r.status == 200, r.status
        n = len(r.headers)
    return time.perf_counter() - t0, n


async def run(args: argparse.Namespace, es: dict[str, Envoy]) -> None:
    urls = {k: url(e) for k, e in es.items()}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for k, u in urls.items():
            for _ in range(200):
                _, n = await one(s, u)
            print(f"{k}: {n} response headers reach the client")
        lat: dict[str, list[float]] = {k: [] for k in urls}
        for _ in range(args.seq_requests):
            for k, u in urls.items():
                lat[k].append((await one(s, u))[0])
        p50 = {k: statistics.median(v) * 1e3 for k, v in lat.items()}
        print(f"sequential, {args.seq_requests} each, interleaved: p50 "
              + ", ".join(f"{k} {v:.3f} ms" for k, v in p50.items())
              + f"; filter - marker {1e3 * (p50['filter'] - p50['marker']):+.1f} us")
        cpu: dict[str, list[float]] = {k: [] for k in urls}
        for order in (("marker", "filter"), ("filter", "marker")):
            for k in order:
                pid = es[k].p.pid  # type: ignore[union-attr]
                c0 = cpu_seconds(pid)
                sem = asyncio.Semaphore(32)

                async def go(u: str = urls[k], sem: asyncio.Semaphore = sem) -> None:
                    async with sem:
                        await one(s, u)

                await asyncio.gather(*(go() for _ in range(args.requests)))
                cpu[k].append((cpu_seconds(pid) - c0) / args.requests * 1e6)
        print("Envoy CPU per request at c32 (us, two runs each): "
              + ", ".join(f"{k} {' / '.join(f'{x:.1f}' for x in v)}" for k, v in cpu.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-requests", type=int, default=3000)
    ap.add_argument("--requests", type=int, default=6000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        port = free_port()
        up = Proc(["-m", "tests.support.fake_upstream", "--port", str(port), "--mode",
                   "provider"], work / "upstream.log")
        es = envoys(port, work)
        try:
            up.wait_http(f"http://127.0.0.1:{port}/health")
            for e in es.values():
                e.start()
            for e in es.values():
                asyncio.run(e.ready())
            asyncio.run(run(args, es))
        finally:
            for e in es.values():
                e.stop()
            up.stop()


if __name__ == "__main__":
    main()
