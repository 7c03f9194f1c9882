"""Render one decision record for a human: what was asked, where it went, why, and what happened.

`render_decision(record)` returns a `rich` renderable built only from the JSON record (the form
`decision_to_dict` writes and the ledgers return), so it works on records of any age: a missing
field shows as ``-``. `print_decision` prints it; tests capture it with
``Console(record=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

DASH = "-"


def render_decision(record: Mapping[str, Any]) -> RenderableType:
    """The whole explanation of one record, top to bottom."""
    parts: list[RenderableType] = [
        _header(record),
        _request(record),
        _pick(record),
        _envelope(record),
        _spillover_and_retries(record),
        _candidates(record),
    ]
    notes = record.get("notes") or []
    if notes:
        parts.append(Text("notes: " + "; ".join(str(n) for n in notes), style="yellow"))
    parts.append(_timings(record))
    return Group(*parts)


def print_decision(record: Mapping[str, Any], console: Console | None = None) -> None:
    """Print `render_decision(record)` to ``console`` (stdout by default)."""
    (console or Console()).print(render_decision(record))


# -- sections -------------------------------------------------------------------------------
def _header(rec: Mapping[str, Any]) -> RenderableType:
    out = _outcome(rec)
    status = out.get("status")
    style = "green" if isinstance(status, int) and status < 400 else "red"
    t = Text()
    t.append(f"decision {rec.get('decision_id') or DASH}", style="bold")
    t.append(f"  status {status if status is not None else DASH}", style=f"bold {style}")
    t.append(f"  policy {rec.get('policy') or DASH}")
    t.append(f"  tenant {rec.get('tenant') or DASH}")
    t.append(f"  at {_when(rec.get('at_unix'))}")
    t.append(f"  snapshot v{rec.get('snapshot_version', DASH)}", style="dim")
    if out.get("error"):
        t.append(f"\nerror: {out['error']}", style="red")
    return t


def _request(rec: Mapping[str, Any]) -> RenderableType:
    r: Mapping[str, Any] = rec.get("request") or {}
    juris = r.get("allowed_jurisdictions")
    return _kv(
        "request profile",
        [
            ("tenant", rec.get("tenant")),
            ("class", r.get("workload_class")),
            ("priority", r.get("priority")),
            ("model", r.get("model")),
            ("api", r.get("api")),
            ("stream", r.get("stream")),
            ("prompt tokens (est.)", r.get("prompt_tokens")),
            ("max output tokens", r.get("max_output_tokens")),
            ("prefix blocks", r.get("prefix_blocks")),
            ("session", r.get("session_id")),
            ("TTFT SLO", _secs(r.get("ttft_slo_s"))),
            ("ITL SLO", _secs(r.get("itl_slo_s"))),
            ("jurisdictions", "any" if juris is None else ", ".join(juris) or "none"),
            ("client region", r.get("client_region")),
        ],
    )


def _pick(rec: Mapping[str, Any]) -> RenderableType:
    p: Mapping[str, Any] | None = rec.get("picked")
    if p is None:
        removed = rec.get("removed_by") or {}
        why = ", ".join(f"{n} {name}" for name, n in removed.items()) or "no candidates"
        return Text(f"no endpoint picked: removed by {why}", style="bold red")
    return _kv(
        "pick",
        [
            ("endpoint", p.get("endpoint")),
            ("substrate", p.get("substrate")),
            ("hardware", p.get("hardware")),
            ("region", p.get("region")),
            ("jurisdiction", p.get("jurisdiction")),
            ("capacity class", p.get("capacity_class")),
            ("model variant", p.get("model_variant")),
            ("precision", p.get("precision")),
        ],
    )


def _envelope(rec: Mapping[str, Any]) -> RenderableType:
    pred: Mapping[str, Any] = rec.get("predicted") or {}
    out = _outcome(rec)
    r: Mapping[str, Any] = rec.get("request") or {}
    t = Table(title="predicted vs measured", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("")
    t.add_column("predicted", justify="right")
    t.add_column("measured", justify="right")
    rows: list[tuple[str, str, str]] = [
        ("TTFT", _secs(pred.get("ttft_s")), _secs(out.get("ttft_s"))),
        ("ITL", _secs(pred.get("itl_s")), _secs(out.get("itl_s"))),
        ("end to end", DASH, _secs(out.get("e2e_s"))),
        ("prompt tokens", _s(r.get("prompt_tokens")), _s(out.get("prompt_tokens"))),
        ("completion tokens", f"≤ {_s(r.get('max_output_tokens'))}", _s(
            out.get("completion_tokens"))),
        ("cached tokens", DASH, _s(out.get("cached_tokens"))),
        ("cost", _usd(pred.get("cost_usd")), _usd(out.get("cost_usd"))),
    ]
    for row in rows:
        t.add_row(*row)
    return t


def _spillover_and_retries(rec: Mapping[str, Any]) -> RenderableType:
    parts: list[RenderableType] = []
    s: Mapping[str, Any] | None = rec.get("spillover")
    if s is None:
        parts.append(Text("spillover: none", style="dim"))
    else:
        line = (
            f"spillover: {s.get('reason') or DASH}: {s.get('preferred') or DASH} → "
            f"{s.get('chosen') or DASH} ({s.get('from_region') or '?'} → "
            f"{s.get('to_region') or '?'})"
        )
        extras = [
            f"ΔTTFT {_secs(s.get('delta_ttft_s'))}" if s.get("delta_ttft_s") is not None else "",
            f"Δcost {_usd(s.get('delta_cost_usd'))}" if s.get("delta_cost_usd") is not None else "",
            f"egress {_usd(s.get('egress_usd'))}" if s.get("egress_usd") is not None else "",
        ]
        extra = ", ".join(e for e in extras if e)
        parts.append(Text(line + (f"; {extra}" if extra else ""), style="bold yellow"))
    out = _outcome(rec)
    failed: Sequence[str] = out.get("failed_endpoints") or []
    attempts = out.get("attempts")
    if failed or (isinstance(attempts, int) and attempts > 1):
        parts.append(
            Text(
                f"retries: attempt {attempts or DASH}; failed endpoints: "
                f"{', '.join(failed) or DASH}",
                style="yellow",
            )
        )
    else:
        parts.append(Text("retries: none", style="dim"))
    earlier: Sequence[Mapping[str, Any]] = rec.get("attempts") or []
    for i, a in enumerate(earlier, 1):
        ao = _outcome(a)
        parts.append(
            Text(
                f"  earlier record {i}: status {ao.get('status', DASH)} on "
                f"{ao.get('endpoint') or DASH} at {_when(a.get('at_unix'))}"
                + (f": {ao['error']}" if ao.get("error") else ""),
                style="dim",
            )
        )
    return Group(*parts)


def _candidates(rec: Mapping[str, Any]) -> RenderableType:
    picked = (rec.get("picked") or {}).get("endpoint")
    t = Table(title="candidates", box=box.SIMPLE_HEAD, title_justify="left")
    for col in ("endpoint", "substrate", "verdict", "total", "scores", "annotations"):
        t.add_column(col, justify="right" if col == "total" else "left")
    for c in rec.get("candidates") or []:
        name = c.get("endpoint")
        if c.get("rejected_by"):
            verdict = Text(f"removed by {c['rejected_by']}: {c.get('reason') or DASH}", "red")
        elif name == picked:
            verdict = Text("picked", style="bold green")
        else:
            verdict = Text("scored")
        total = c.get("total")
        t.add_row(
            str(name or DASH),
            str(c.get("substrate") or DASH),
            verdict,
            DASH if total is None else f"{total:.3f}",
            _pairs(c.get("scores")),
            _pairs(c.get("annotations")),
        )
    return t


def _timings(rec: Mapping[str, Any]) -> RenderableType:
    timings: Mapping[str, float] = rec.get("timings_s") or {}
    t = Table(title="plugin timings", box=box.SIMPLE_HEAD, title_justify="left")
    t.add_column("stage")
    t.add_column("plugin")
    t.add_column("µs", justify="right")
    for key, secs in timings.items():
        stage, _, plugin = key.partition(":")
        t.add_row(stage, plugin, f"{secs * 1e6:.1f}")
    if timings:
        t.add_row("", "total", f"{sum(timings.values()) * 1e6:.1f}", style="bold")
    return t


# -- formatting -----------------------------------------------------------------------------
def _kv(title: str, rows: Sequence[tuple[str, Any]]) -> Table:
    t = Table(title=title, box=box.SIMPLE, show_header=False, title_justify="left")
    t.add_column(style="dim")
    t.add_column()
    for k, v in rows:
        t.add_row(k, _s(v))
    return t


def _outcome(rec: Mapping[str, Any]) -> Mapping[str, Any]:
    out: Mapping[str, Any] = rec.get("outcome") or {}
    return out


def _s(v: Any) -> str:
    if v is None:
        return DASH
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _secs(v: Any) -> str:
    if not isinstance(v, int | float):
        return DASH
    return f"{v * 1e3:.1f} ms" if v < 10 else f"{v:.2f} s"


def _usd(v: Any) -> str:
    return f"${v:.4g}" if isinstance(v, int | float) else DASH


def _when(v: Any) -> str:
    if not isinstance(v, int | float):
        return DASH
    return datetime.fromtimestamp(v, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def _pairs(d: Any) -> str:
    if not isinstance(d, Mapping) or not d:
        return DASH
    return " ".join(f"{k}={_s(v)}" for k, v in d.items())
