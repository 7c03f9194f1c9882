"""What a fleet file reload may change, and what needs a restart.

`Core.reload` (SIGHUP to `inferplane serve` / `inferplane epp`, or a change of the file with
``--watch-config``) validates the new file exactly as start-up does and then swaps it in, in one
step of the event loop, or refuses it whole. These sections are applied on a reload:

- ``substrates`` (endpoints added, removed or changed), ``regions``, ``hardware_profiles``,
  ``data_sources``: the fleet. An endpoint kept under the same name and URL keeps its live
  state (in-flight counts, health, ejection, latency windows and corrections, scrapes); a new
  endpoint (or one whose URL changed) is scraped and probed once before it joins; a removed
  one takes no new request and its requests in flight finish where they are.
- ``tenants`` (API keys, budgets, limits), ``model_aliases``, ``class_rules``, ``mix``.
- ``plugins`` and ``profiles``: the placement policies are rebuilt when either changed (the
  state they learned — session affinity, the learned prefix index — starts over); otherwise
  the running policies are kept with what they learned.

Every other section needs a restart, because what it configures is built once per process:
``gateway`` (listener address and port, limits, timeouts, ledger file, metrics listener),
``admission`` (store kind, Redis URL, queues), ``ledger`` (backend), ``batch``, ``classes``
(admission queues and leases are sized from them), ``health``, ``epp``, ``economics`` and
``telemetry``; and an endpoint's ``kv_events`` (its KV-event subscription) — adding, removing or
changing an endpoint that publishes KV events. A reload that changes any of these is refused
with each such field named, and the running configuration stays as it was.
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from inferplane.config.schema import FleetConfig

if TYPE_CHECKING:
    from inferplane.core.plane import Core


class _Heap:
    """Whether `freeze_heap` froze this process's heap and it was not given back since. Kept
    here rather than read from ``gc.get_freeze_count()``: CPython 3.12 starts every process
    with objects (375 on 3.12.1) already in the permanent generation, so a count above zero
    does not mean that this process froze its heap."""

    frozen = False


def freeze_heap(enabled: bool) -> None:
    """``gateway.gc_freeze`` for a server process: collect, then move every object alive (code,
    fleet, tokenizers: ~100k objects once started) out of the cyclic garbage collector's reach,
    so that no full collection scans them again in the middle of a burst of requests (a
    190-280 ms pause of the event loop on a shared 2-vCPU host). Frozen objects are still freed
    by reference counting; only reference cycles among them are never reclaimed while frozen,
    which is why `refreeze_after_reload` gives them back after a reload. Called once the server
    listens (the one collection it runs then can delay the first requests) and never in a
    process that runs many gateways (tests, the simulator)."""
    if enabled:
        gc.collect()
        gc.freeze()
        _Heap.frozen = True


def unfreeze_heap() -> None:
    """Give every frozen object back to the collector (``gc.unfreeze``) and forget that
    `freeze_heap` froze them."""
    gc.unfreeze()
    _Heap.frozen = False


def refreeze_after_reload(enabled: bool) -> None:
    """After an applied reload, in a process whose heap `freeze_heap` froze: give the frozen
    objects back to the collector, so that the replaced fleet's and policies' reference cycles
    are reclaimed, and freeze again what is alive (one full collection, run in the reload's
    step of the event loop). A process that never froze its heap is left alone."""
    if not _Heap.frozen:
        return
    unfreeze_heap()
    freeze_heap(enabled)


RESTART_SECTIONS = (
    "gateway",
    "admission",
    "ledger",
    "batch",
    "classes",
    "health",
    "epp",
    "economics",
    "telemetry",
)
"""Top-level sections a reload cannot change (see the module docstring)."""

POLICY_SECTIONS = ("plugins", "profiles")

_RESTART = "changed, and this needs a restart; the reload was refused and the running " \
    "configuration is unchanged"


def file_sha256(path: str | Path) -> str | None:
    """The SHA-256 of a file's bytes (None when it cannot be read)."""
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


def _diff(a: Any, b: Any, path: str, out: list[str]) -> None:
    """The paths (``gateway.port``, ``classes[2].priority``) where two JSON values differ."""
    if a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            _diff(a.get(k), b.get(k), f"{path}.{k}" if path else str(k), out)
        return
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _diff(x, y, f"{path}[{i}]", out)
        return
    out.append(path)


def _kv_endpoints(config: FleetConfig) -> dict[str, tuple[str, Any, str]]:
    """Endpoints that publish KV events: name -> (url, kv_events, path in the file)."""
    out: dict[str, tuple[str, Any, str]] = {}
    for i, sub in enumerate(config.substrates):
        for j, ep in enumerate(sub.endpoints):
            if ep.kv_events:
                out[ep.name] = (ep.url, ep.kv_events, f"substrates[{i}].endpoints[{j}].kv_events")
    return out


def restart_needed(old: FleetConfig, new: FleetConfig) -> list[tuple[str, str]]:
    """Every change from ``old`` to ``new`` that a reload cannot apply, as ``(path, problem)``
    pairs in the shape of `ConfigError`; empty when the reload can be applied."""
    problems: list[tuple[str, str]] = []
    for section in RESTART_SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        if a == b:
            continue
        paths: list[str] = []
        _diff(_dump(a), _dump(b), section, paths)
        problems += [(p, _RESTART) for p in paths or [section]]
    ka, kb = _kv_endpoints(old), _kv_endpoints(new)
    for name in sorted(set(ka) | set(kb)):
        if ka.get(name, (None, None))[:2] != kb.get(name, (None, None))[:2]:
            where = (kb.get(name) or ka[name])[2]
            problems.append(
                (where, f"endpoint {name!r} publishing KV events was added, removed or "
                 f"changed (its KV-event subscription is made at start-up); {_RESTART}")
            )
    return problems


def policies_changed(old: FleetConfig, new: FleetConfig) -> bool:
    return any(getattr(old, s) != getattr(new, s) for s in POLICY_SECTIONS)


def _dump(value: Any) -> Any:
    if isinstance(value, list):
        return [_dump(v) for v in value]
    dump = getattr(value, "model_dump", None)
    return dump(mode="json") if dump is not None else value


def _stat(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def watch_file(core: Core, path: str | Path, interval_s: float = 1.0) -> None:
    """Reload ``core`` from ``path`` when the file changes (`Core.reload_file`), until
    cancelled. The file is polled (its modification time, size and inode) every ``interval_s``;
    a change is acted on once the file has stayed the same for one more poll (an editor still
    writing it is not read half-written), and only when its content differs from the running
    configuration's."""
    p = Path(path)
    seen = _stat(p)
    pending: tuple[int, int, int] | None = None
    while True:
        await asyncio.sleep(interval_s)
        st = _stat(p)
        if st is None or st == seen:
            pending = None
            continue
        if st != pending:
            pending = st  # changed: wait one poll for it to settle
            continue
        seen, pending = st, None
        if file_sha256(p) != core.config_sha256:
            await core.reload_file(p)
