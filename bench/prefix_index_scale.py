"""Memory and lookup time of the prefix index at fleet scale: the inverted index (block hash →
bitmask of endpoints, `inferplane.fleet.prefix_index.PrefixIndex`) against the per-endpoint
layout it replaced (one ordered dict of block hashes per endpoint), side by side in one run.

    .venv/bin/python bench/prefix_index_scale.py [--endpoints 1000] [--blocks 2800]
                                                 [--shared 0.5] [--lookups 200]

Each endpoint holds ``blocks`` blocks, as a KV-event mirror would: ``shared`` of them come from
a pool of popular prefix chains (system prompts, documents) that many endpoints hold, the rest
are the endpoint's own conversations. Memory is the growth of the process's resident set while
one layout is built (each in a fresh child process, so neither sees the other's garbage).
Lookup is "who holds how much of this prompt" for every endpoint: the old layout walks every
endpoint's dict, the inverted one walks the prompt's chain once. Prompts are a popular prefix
plus a tail, and a cold prompt nobody holds. An H100 with Llama-3.1-8B holds ~28k blocks of 16
tokens; ``--blocks 28000`` at 1,000 endpoints needs several GB for the old layout, so the
default is a tenth of that and memory scales linearly in blocks.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import platform
import random
import sys
import time
from collections import OrderedDict

from inferplane.fleet.prefix_index import PrefixIndex

CHAIN = 64  # blocks per popular prefix chain (1,024 tokens at 16 tokens a block)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _workload(endpoints: int, blocks: int, shared: float, seed: int) -> tuple[
    list[list[int]], list[list[int]], list[tuple[int, ...]]
]:
    """Per endpoint the block hashes it holds (a popular chain may repeat: the pairs held
    are counted after de-duplication); the popular chains; lookup prompts."""
    rng = random.Random(seed)
    nchains = max(4, int(endpoints * blocks * shared / CHAIN / 50))  # each chain on ~50 endpoints
    chains = [[rng.getrandbits(64) for _ in range(CHAIN)] for _ in range(nchains)]
    per: list[list[int]] = []
    for _ in range(endpoints):
        held: list[int] = []
        while len(held) < blocks * shared:
            held.extend(rng.choice(chains))
        del held[int(blocks * shared):]
        held.extend(rng.getrandbits(64) for _ in range(blocks - len(held)))
        per.append(held)
    prompts: list[tuple[int, ...]] = []
    for i in range(16):
        c = chains[i % nchains]
        tail = tuple(rng.getrandbits(64) for _ in range(8))
        prompts.append(tuple(c) + tail if i % 4 else tail)  # one in four cold
    return per, chains, prompts


def _run(layout: str, endpoints: int, blocks: int, shared: float, lookups: int,
         out: mp.Queue) -> None:  # type: ignore[type-arg]
    per, _, prompts = _workload(endpoints, blocks, shared, seed=7)
    names = [f"e{i}" for i in range(endpoints)]
    before = _rss_bytes()
    t0 = time.process_time()
    if layout == "inverted":
        idx = PrefixIndex(0)
        for name, held in zip(names, per, strict=True):
            idx.block_stored(name, held)
        build = time.process_time() - t0
        mem = _rss_bytes() - before
        entries = idx.distinct_blocks()
        pairs = sum(idx.size(n) for n in names)

        def lookup(p: tuple[int, ...]) -> dict[str, int]:
            return idx.match_lengths(p)
    else:
        dicts: dict[str, OrderedDict[int, None]] = {}
        for name, held in zip(names, per, strict=True):
            dicts[name] = OrderedDict.fromkeys(held)
        build = time.process_time() - t0
        mem = _rss_bytes() - before
        entries = pairs = sum(len(d) for d in dicts.values())

        def lookup(p: tuple[int, ...]) -> dict[str, int]:
            res: dict[str, int] = {}
            for name in names:
                d = dicts[name]
                n = 0
                for h in p:
                    if h not in d:
                        break
                    n += 1
                if n:
                    res[name] = n
            return res
    answers = [lookup(p) for p in prompts]
    t0 = time.process_time()
    for i in range(lookups):
        lookup(prompts[i % len(prompts)])
    per_lookup = (time.process_time() - t0) / lookups
    out.put((layout, mem, pairs, entries, build, per_lookup,
             [sorted(a.items()) for a in answers]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--endpoints", type=int, default=1000)
    ap.add_argument("--blocks", type=int, default=2800, help="blocks held per endpoint")
    ap.add_argument("--shared", type=float, default=0.5, help="share of blocks from popular chains")
    ap.add_argument("--lookups", type=int, default=200)
    ap.add_argument("--layouts", nargs="+", default=["per-endpoint", "inverted"])
    a = ap.parse_args()
    print(f"# prefix index at {a.endpoints} endpoints × {a.blocks} blocks ({a.shared:.0%} from "
          f"popular chains); python {platform.python_version()}, {platform.machine()}")
    print(f"{'layout':13} {'pairs held':>12} {'map entries':>12} {'RSS MiB':>8} "
          f"{'B/pair':>7} {'build s':>8} {'lookup µs':>10}")
    ctx = mp.get_context("fork")
    results = []
    for layout in a.layouts:
        q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
        p = ctx.Process(target=_run, args=(layout, a.endpoints, a.blocks, a.shared, a.lookups, q))
        p.start()
        results.append(q.get())
        p.join()
    for layout, mem, pairs, entries, build, per_lookup, _ in results:
        print(f"{layout:13} {pairs:12,} {entries:12,} {mem / 2**20:8.0f} {mem / pairs:7.1f} "
              f"{build:8.2f} {per_lookup * 1e6:10.1f}")
    if len(results) == 2:
        same = results[0][6] == results[1][6]
        print(f"# same answers for every prompt: {same}")
        if not same:
            sys.exit(1)


if __name__ == "__main__":
    main()
