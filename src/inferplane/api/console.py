"""The web console: fleet and pool health, spend, the decision explorer and the economics report,
served under ``/console`` by the gateway behind an admin key (docs/console.md).

Pages are rendered on the server with Jinja2 (``data/console/templates``) and refreshed with htmx
(vendored in ``data/console/static``; nothing is loaded from elsewhere at run time). The admin keys
are the ones that may read ``/metrics`` (``gateway.metrics.api_keys``): a script sends one as
``Authorization: Bearer <key>``; a browser logs in with one and gets the ``inferplane_console``
cookie (HttpOnly, SameSite=Strict, path ``/console``, Secure over TLS) holding a signed session
token, never the key (`api.console_auth`). Failed log-ins are throttled per client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from ipaddress import ip_network
from typing import Any
from urllib.parse import quote

import jinja2
import orjson
from aiohttp import web
from prometheus_client.registry import CollectorRegistry

from inferplane.api.console_auth import (
    LoginThrottle,
    RedisRevocations,
    Sessions,
    client_address,
    console_secret,
    matching_hash,
)
from inferplane.api.pipeline import Gateway
from inferplane.core.plane import hash_key
from inferplane.economics.analysis import EconomicsReport
from inferplane.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    PermissionDeniedError,
)
from inferplane.fleet.health import endpoint_summary
from inferplane.ledger.chain import canonical, receipt_of
from inferplane.ledger.query import BadQuery, Query, decode_cursor, parse_time

COOKIE = "inferplane_console"
COOKIE_MAX_AGE_S = 8 * 3600
PREFIX = "/console"
RECENT_WINDOW_S = 3600.0
RECENT_SHOWN = 50
RECENT_MAX_PAGES = 10
"""The recent list reads at most this many pages of 1,000 records (the newest are kept)."""
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
HISTORY_INTERVAL_S = 5.0
HISTORY_POINTS = 120
"""The fleet page's sparklines: one sample of every pool every 5 s, the last 10 minutes."""
SPARK_W, SPARK_H = 64, 22
log = logging.getLogger("inferplane.console")
GATEWAY: web.AppKey[Gateway] = web.AppKey("console_gateway", Gateway)
TEMPLATES: web.AppKey[jinja2.Environment] = web.AppKey("console_templates", jinja2.Environment)
STATIC: web.AppKey[dict[str, bytes]] = web.AppKey("console_static", dict)
SESSIONS: web.AppKey[Sessions] = web.AppKey("console_sessions", Sessions)
THROTTLE: web.AppKey[LoginThrottle] = web.AppKey("console_throttle", LoginThrottle)


# -- access ----------------------------------------------------------------------------------
class NeedsLogin(Exception):
    """A browser asking for a page with no key: it is sent to the login form."""


def admin_hashes(gw: Gateway) -> frozenset[str]:
    return frozenset(gw.config.gateway.metrics.api_keys)


def bearer_key(request: web.Request) -> str | None:
    scheme, _, key = (request.headers.get("Authorization") or "").partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return None


def admin_hash(key: str, hashes: frozenset[str]) -> str | None:
    """The admin key hash ``key`` matches (constant-time comparison), or None."""
    return matching_hash(hash_key(key), hashes)


def wants_page(request: web.Request) -> bool:
    """A browser navigating (not htmx, not a script): it gets a redirect to the login form."""
    return (
        request.method == "GET"
        and "HX-Request" not in request.headers
        and "text/html" in request.headers.get("Accept", "")
    )


async def check_admin(request: web.Request) -> None:
    """The request carries an admin key (Bearer) or a valid session cookie, or it gets 401 (none,
    or a session expired or logged out) / 403 (not an admin key) in the OpenAI error shape; a
    browser navigating without either is sent to the login form instead."""
    gw = request.app[GATEWAY]
    hashes = admin_hashes(gw)
    if not hashes:
        raise PermissionDeniedError(
            "the console is not served: set gateway.metrics.api_keys (the admin keys' hashes)"
        )
    key = bearer_key(request)
    if key is not None:
        if admin_hash(key, hashes) is None:
            raise PermissionDeniedError(
                "this key may not use the console (gateway.metrics.api_keys)")
        return
    token = request.cookies.get(COOKIE, "").strip()
    if token and await request.app[SESSIONS].check_shared(token, hashes):
        return
    if wants_page(request):
        raise NeedsLogin  # no session, or an expired or logged-out one: log in again
    if token:
        raise AuthenticationError(
            f"the console session is not valid (expired or logged out): log in at "
            f"{PREFIX}/login", code="invalid_session")
    raise AuthenticationError(
        "the console needs an admin key: send 'Authorization: Bearer <key>' or log in at "
        f"{PREFIX}/login",
        code="missing_api_key",
    )


def _login_redirect(request: web.Request) -> web.Response:
    resp = web.Response(status=303, headers={
        "Location": f"{PREFIX}/login?next={quote(request.path_qs, safe='')}", **SECURITY_HEADERS
    })
    if COOKIE in request.cookies:
        resp.del_cookie(COOKIE, path=PREFIX)
    return resp


def _safe_next(value: str | None) -> str:
    """Only a path of the console itself (never another site: no open redirect)."""
    if value and value.startswith(PREFIX + "/") and "\\" not in value and "//" not in value:
        return value
    return f"{PREFIX}/fleet"


# -- rendering -------------------------------------------------------------------------------
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("inferplane", "data/console/templates"),
        autoescape=jinja2.select_autoescape(default=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(secs=fmt_secs, num=fmt_num, pct=fmt_pct, usd=fmt_usd, when=fmt_when,
                       pairs=fmt_pairs, json=fmt_json)
    return env


def render(request: web.Request, template: str, status: int = 200, **ctx: Any) -> web.Response:
    env = request.app[TEMPLATES]
    html = env.get_template(template).render(prefix=PREFIX, **ctx)
    return web.Response(text=html, status=status, content_type="text/html",
                        headers=SECURITY_HEADERS)


DASH = "–"


def fmt_secs(v: Any) -> str:
    if not isinstance(v, int | float):
        return DASH
    return f"{v * 1000:.0f} ms" if v < 10 else f"{v:.1f} s"


def fmt_num(v: Any, digits: int = 2) -> str:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return DASH if v is None else str(v)
    if isinstance(v, int):
        return f"{v:,}"
    text = f"{v:,.{digits}f}"
    return text[1:] if text.startswith("-") and not text.strip("-0.,") else text  # never -0.00


def fmt_pct(v: Any) -> str:
    return f"{v * 100:.0f} %" if isinstance(v, int | float) else DASH


def fmt_usd(v: Any) -> str:
    if not isinstance(v, int | float):
        return DASH
    return f"${v:,.6f}" if abs(v) < 1 else f"${v:,.2f}"


def fmt_when(v: Any) -> str:
    if not isinstance(v, int | float):
        return DASH
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(v)) + " UTC"


def fmt_pairs(d: Any) -> str:
    if not isinstance(d, Mapping) or not d:
        return DASH
    return ", ".join(
        f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()
    )


def fmt_json(v: Any) -> str:
    return orjson.dumps(v, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode()


# -- pool history (sparklines) --------------------------------------------------------------
SERIES = ("waiting", "kv_mean", "ttft_divergence", "inflight_ratio")


class PoolHistory:
    """The last `HISTORY_POINTS` samples of each pool's queue, KV pressure, TTFT divergence and
    in-flight ratio, taken every `HISTORY_INTERVAL_S` while the gateway runs (this process's
    view; each worker of a multi-process gateway keeps its own)."""

    def __init__(self, points: int = HISTORY_POINTS) -> None:
        self.points = points
        self.samples: dict[str, deque[dict[str, float | None]]] = {}
        self._task: asyncio.Task[None] | None = None

    def sample(self, pools: list[dict[str, Any]]) -> None:
        for p in pools:
            ring = self.samples.setdefault(p["substrate"], deque(maxlen=self.points))
            ring.append({k: p[k] for k in SERIES})

    def sparklines(self, pool: str) -> dict[str, str]:
        """SVG polyline points per series (empty below two samples)."""
        ring = self.samples.get(pool) or deque()
        return {k: spark_points([s[k] for s in ring]) for k in SERIES}

    async def _loop(self, gw: Gateway) -> None:
        while True:
            try:
                self.sample([p.to_json() for p in gw.pool_health().values()])
            except Exception:  # a sample missed is no reason to stop sampling
                log.exception("console: pool sample failed")
            await asyncio.sleep(HISTORY_INTERVAL_S)

    def start(self, gw: Gateway) -> None:
        self._task = asyncio.create_task(self._loop(gw))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def spark_points(values: list[float | None], w: int = SPARK_W, h: int = SPARK_H) -> str:
    """``x,y`` pairs of a polyline of ``values`` across ``w`` × ``h`` (y grows downwards; a
    missing value is skipped; a flat series is drawn at the bottom)."""
    known = [(i, v) for i, v in enumerate(values) if isinstance(v, int | float)]
    if len(values) < 2 or not known:
        return ""
    lo, hi = min(0.0, *(v for _, v in known)), max(v for _, v in known)
    span = hi - lo or 1.0
    step = w / (len(values) - 1)
    return " ".join(
        f"{i * step:.1f},{h - 1 - (v - lo) / span * (h - 2):.1f}" for i, v in known
    )


HISTORY: web.AppKey[PoolHistory] = web.AppKey("console_history", PoolHistory)
ECONOMICS_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("console_economics_lock", asyncio.Lock)


# -- data ------------------------------------------------------------------------------------
def fleet_view(gw: Gateway, history: PoolHistory) -> dict[str, Any]:
    """What ``GET /v1/fleet/health`` shows: every endpoint and every pool, each pool with the
    sparklines of its recent history."""
    snap = gw.live.snapshot()
    records = gw.outliers.records
    endpoints = [endpoint_summary(v, records.get(v.name), snap.now) for v in snap.endpoints]
    pools = [{**p.to_json(), "spark": history.sparklines(name)}
             for name, p in gw.pool_health().items()]
    return {
        "endpoints": endpoints,
        "pools": pools,
        "usable": sum(1 for e in endpoints if e["healthy"] and not e["ejected"]),
        "history_min": HISTORY_POINTS * HISTORY_INTERVAL_S / 60,
        "at": time.time(),
    }


def spillovers_by_reason(registry: CollectorRegistry) -> list[dict[str, Any]]:
    """``inferplane_spillovers_total`` summed by reason and by (class, from, to, reason)."""
    rows: list[dict[str, Any]] = []
    for family in registry.collect():
        if family.name != "inferplane_spillovers":
            continue
        for s in family.samples:
            if s.name.endswith("_total") and s.value:
                rows.append({**s.labels, "count": int(s.value)})
    rows.sort(key=lambda r: (-r["count"], r.get("reason", "")))
    return rows


async def spend_view(gw: Gateway) -> dict[str, Any]:
    tenants: list[dict[str, Any]] = []
    problems: list[str] = []
    for t in gw.config.tenants:
        try:
            rows = await gw.admission.usage(t.name, ["workflow", "model"])
        except GatewayError as exc:  # e.g. the admission store is unreachable
            problems.append(f"{t.name}: {exc.message}")
            continue
        tenants.append({
            "name": t.name,
            "rows": rows,
            "requests": sum(r["requests"] for r in rows),
            "tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in rows),
            "cost_usd": sum(r["cost_usd"] for r in rows),
        })
    by_model: dict[str, dict[str, float]] = {}
    for row in tenants:
        for r in row["rows"]:
            m = by_model.setdefault(r["model"], {"requests": 0, "tokens": 0, "cost_usd": 0.0})
            m["requests"] += r["requests"]
            m["tokens"] += r["prompt_tokens"] + r["completion_tokens"]
            m["cost_usd"] += r["cost_usd"]
    spill = spillovers_by_reason(gw.metrics.registry)
    reasons: dict[str, int] = {}
    for s in spill:
        reasons[s.get("reason", "?")] = reasons.get(s.get("reason", "?"), 0) + s["count"]
    return {
        "tenants": tenants,
        "by_model": sorted(by_model.items()),
        "total": sum(row["cost_usd"] for row in tenants),
        "spillovers": spill,
        "spill_reasons": sorted(reasons.items(), key=lambda kv: -kv[1]),
        "problems": problems,
    }


async def recent_decisions(gw: Gateway, params: Mapping[str, str]) -> dict[str, Any]:
    """The newest records of the last hour (every tenant), newest first, filtered by class,
    model and substrate; bounded to `RECENT_MAX_PAGES` pages of the ledger's query API."""
    now = time.time()
    since = now - RECENT_WINDOW_S
    filters = {k: (params.get(k) or "").strip() or None for k in ("class", "model", "substrate")}
    error = None
    if params.get("since"):
        try:
            since = parse_time(params["since"], "since")
        except BadQuery as exc:
            error = str(exc)
    rows: list[dict[str, Any]] = []
    after, pages, more = 0, 0, False
    while pages < RECENT_MAX_PAGES:
        q = Query(tenant=None, since=since, workload_class=filters["class"],
                  model=filters["model"], substrate=filters["substrate"], limit=1000,
                  after=after)
        page = await gw.ledger.query(q)
        pages += 1
        rows.extend(page.items)
        rows = rows[-RECENT_SHOWN:]
        if page.next_cursor is None:
            break
        after = decode_cursor(page.next_cursor)
        more = pages == RECENT_MAX_PAGES
    rows.reverse()
    return {"items": rows, "filters": filters, "since": since, "error": error, "truncated": more}


def record_receipt(record: Mapping[str, Any]) -> str:
    """The receipt of a record as the ledger stores it (a looked-up record carries its earlier
    attempts under ``attempts``, which are not part of it)."""
    own = {k: v for k, v in record.items() if k != "attempts"}
    return receipt_of(canonical(own))


async def check_receipt(gw: Gateway, text: str, receipt: str) -> dict[str, Any]:
    """Check a pasted record (bare, or a ``{"receipt", "record"}`` item of ``/v1/decisions``)
    and/or a receipt against each other and against the ledger's own record of that decision."""
    text, receipt = text.strip(), receipt.strip().lower()
    out: dict[str, Any] = {"checks": [], "ok": None, "decision_id": None}

    def check(ok: bool | None, what: str) -> None:
        out["checks"].append({"ok": ok, "what": what})
        if ok is False:
            out["ok"] = False
        elif ok and out["ok"] is None:
            out["ok"] = True

    if not text and not receipt:
        check(None, "paste a record (JSON), a receipt, or both")
        return out
    record: dict[str, Any] | None = None
    decision_id: str | None = None
    if text:
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            check(False, f"the record is not JSON: {exc}")
            return out
        if isinstance(parsed, dict) and isinstance(parsed.get("record"), dict):
            if not receipt and isinstance(parsed.get("receipt"), str):
                receipt = parsed["receipt"].strip().lower()
            parsed = parsed["record"]
        if not isinstance(parsed, dict) or not isinstance(parsed.get("decision_id"), str):
            check(False, "the record must be a JSON object with a decision_id")
            return out
        record = parsed
        decision_id = parsed["decision_id"]
    elif len(receipt) == 64 and all(c in "0123456789abcdef" for c in receipt):
        check(None, "a receipt alone names no record: paste the record too (from "
              "GET /v1/decisions, an export, or this console's decision page)")
        return out
    if receipt and not (len(receipt) == 64 and all(c in "0123456789abcdef" for c in receipt)):
        check(False, "a receipt is 64 lowercase hex digits (sha256)")
        return out
    out["decision_id"] = decision_id
    assert record is not None
    computed = record_receipt(record)
    out["computed"] = computed
    if receipt:
        check(computed == receipt,
              "the record hashes to the receipt" if computed == receipt
              else f"the record hashes to {computed}, not to the receipt given")
    stored = await gw.ledger.lookup(decision_id or "")
    if stored is None:
        check(False, f"the ledger holds no record of decision {decision_id}")
        return out
    versions = [*(stored.get("attempts") or []), stored]
    held = [record_receipt(v) for v in versions]
    check(computed in held,
          "the ledger holds this very record" if computed in held
          else "the ledger's record of this decision differs from the one pasted "
          f"(it hashes to {held[-1]})")
    return out


def economics_source(gw: Gateway) -> tuple[Any, str | None]:
    """The ledger to read the report from, or why there is none."""
    refresher = gw.economics
    if refresher is not None:
        return refresher.source, None
    from inferplane.ledger.tools import SourceError, source_from_config

    try:
        return source_from_config(gw.config, "the configuration"), None
    except SourceError as exc:
        return None, str(exc)
    except Exception as exc:  # e.g. a signing key that cannot be read: no report, no 500
        return None, f"cannot open the ledger: {exc}"


def economics_view(gw: Gateway, source: Any) -> dict[str, Any]:
    from inferplane.economics.render import from_ledger

    return report_json(from_ledger(gw.config, source))


def report_json(r: EconomicsReport) -> dict[str, Any]:
    report = r.to_json()
    for p in report["pools"]:
        days = list(p["divergence"].values())
        p["divergence_latest"] = days[-1] if days else None
    return report


Handler = Callable[[web.Request], Awaitable[web.Response]]


def admin(handler: Handler) -> Handler:
    """The handler, for admins only (`check_admin`); a browser with no key goes to the login."""

    async def guarded(request: web.Request) -> web.Response:
        try:
            await check_admin(request)
        except NeedsLogin:
            return _login_redirect(request)
        return await handler(request)

    guarded.__name__ = handler.__name__
    guarded.__doc__ = handler.__doc__
    return guarded


# -- handlers --------------------------------------------------------------------------------
async def login_form(request: web.Request) -> web.Response:
    return render(request, "login.html", next=_safe_next(request.query.get("next")), error=None)


async def read_form(request: web.Request) -> Mapping[str, Any]:
    """The posted form; 400 (OpenAI shape) for undecodable or malformed form bytes."""
    try:
        return await request.post()
    except (ValueError, LookupError) as exc:
        raise InvalidRequestError(f"malformed form: {type(exc).__name__}") from None


def _secure(request: web.Request) -> bool:
    """Served over TLS (here, or at a proxy that says so)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


async def login(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    throttle = request.app[THROTTLE]
    proxies = [ip_network(n, strict=False) for n in gw.config.gateway.trusted_proxies]
    address = client_address(request.remote, request.headers.getall("X-Forwarded-For", []),
                             proxies)
    wait = throttle.retry_after(address)
    if wait is not None:
        resp = render(request, "login.html", status=429, next=f"{PREFIX}/fleet",
                      error=f"Too many failed log-ins: try again in {wait} s.")
        resp.headers["Retry-After"] = str(wait)
        return resp
    form = await read_form(request)
    key = str(form.get("key") or "").strip()
    nxt = _safe_next(str(form.get("next") or ""))
    hashes = admin_hashes(gw)
    if not hashes:
        return render(request, "login.html", status=403, next=nxt,
                      error="The console is off: no admin keys (gateway.metrics.api_keys).")
    matched = admin_hash(key, hashes) if key else None
    if matched is None:
        throttle.failed(address)
        return render(request, "login.html", status=403, next=nxt,
                      error="That is not an admin key.")
    resp = web.Response(status=303, headers={"Location": nxt, **SECURITY_HEADERS})
    resp.set_cookie(COOKIE, request.app[SESSIONS].issue(matched), path=PREFIX,
                    max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="Strict",
                    secure=_secure(request))
    return resp


async def logout(request: web.Request) -> web.Response:
    token = request.cookies.get(COOKIE, "").strip()
    if token:
        await request.app[SESSIONS].revoke_shared(token)
    resp = web.Response(status=303, headers={"Location": f"{PREFIX}/login", **SECURITY_HEADERS})
    resp.del_cookie(COOKIE, path=PREFIX)
    return resp


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    data = request.app[STATIC].get(name)
    if data is None:
        raise web.HTTPNotFound()
    ctype = STATIC_TYPES.get(name[name.rfind("."):], "application/octet-stream")
    return web.Response(body=data, content_type=ctype, headers={
        "Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"})


@admin
async def index(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther(f"{PREFIX}/fleet")


@admin
async def fleet_page(request: web.Request) -> web.Response:
    view = fleet_view(request.app[GATEWAY], request.app[HISTORY])
    return render(request, "fleet.html", page="fleet", **view)


@admin
async def fleet_panel(request: web.Request) -> web.Response:
    view = fleet_view(request.app[GATEWAY], request.app[HISTORY])
    return render(request, "fleet_panel.html", **view)


@admin
async def spend_page(request: web.Request) -> web.Response:
    return render(request, "spend.html", page="spend", **await spend_view(request.app[GATEWAY]))


@admin
async def decisions_page(request: web.Request) -> web.Response:
    wanted = (request.query.get("id") or "").strip()
    if wanted:
        raise web.HTTPSeeOther(f"{PREFIX}/decisions/{quote(wanted, safe='')}")
    view = await recent_decisions(request.app[GATEWAY], request.query)
    template = "decisions_list.html" if "HX-Request" in request.headers else "decisions.html"
    return render(request, template, page="decisions", **view)


@admin
async def decision_page(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    did = request.match_info["decision_id"]
    rec = await gw.ledger.lookup(did)
    if rec is None:
        return render(request, "decision.html", status=404, page="decisions", decision_id=did,
                      rec=None, receipt=None)
    return render(request, "decision.html", page="decisions", decision_id=did, rec=rec,
                  receipt=record_receipt(rec))


@admin
async def receipt_page(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    result = None
    text = receipt = ""
    if request.method == "POST":
        form = await read_form(request)
        text, receipt = str(form.get("record") or ""), str(form.get("receipt") or "")
        result = await check_receipt(gw, text, receipt)
        if "HX-Request" in request.headers:
            return render(request, "receipt_result.html", result=result)
    return render(request, "receipt.html", page="receipt", result=result, record=text,
                  receipt=receipt)


@admin
async def economics_page(request: web.Request) -> web.Response:
    """The gateway's latest report where its refresher keeps one (``economics.refresh_s``),
    else (or with ``?fresh=1``) one computed now, one at a time, off the event loop."""
    gw = request.app[GATEWAY]
    cached = gw.economics.collector if gw.economics is not None else None
    if cached is not None and cached.report is not None and not request.query.get("fresh"):
        return render(request, "economics.html", page="economics", why=None,
                      report=report_json(cached.report), computed_at=cached.computed_at,
                      refreshed=True)
    source, why = economics_source(gw)
    report = None
    if source is not None:
        try:  # the report reads the whole window from the ledger: off the event loop
            async with request.app[ECONOMICS_LOCK]:
                report = await asyncio.to_thread(economics_view, gw, source)
        except Exception as exc:  # an unreadable ledger is a message on the page
            why = f"cannot read the ledger: {exc}"
    return render(request, "economics.html", page="economics", report=report, why=why,
                  computed_at=time.time(), refreshed=False)


def _load_static() -> dict[str, bytes]:
    root = resources.files("inferplane").joinpath("data/console/static")
    names = ("htmx.min.js", "console.css", "favicon.svg")
    return {name: root.joinpath(name).read_bytes() for name in names}


def _shared_revocations(gateway: Gateway) -> RedisRevocations | None:
    """Log-outs through Redis when the admission store is Redis (its client and prefix)."""
    from inferplane.admission.outage import OutageStore

    store = gateway.admission.store
    if not isinstance(store, OutageStore):
        return None
    return RedisRevocations(store.remote.r, store.remote.p, lambda: store.up)


def setup(app: web.Application, gateway: Gateway) -> None:
    """Add the console's routes to the gateway's app (`api.app.build_app`)."""
    app[GATEWAY] = gateway
    app[TEMPLATES] = _environment()
    app[STATIC] = _load_static()
    app[SESSIONS] = Sessions(console_secret(), COOKIE_MAX_AGE_S, _shared_revocations(gateway))
    app[THROTTLE] = LoginThrottle()
    history = app[HISTORY] = PoolHistory()
    app[ECONOMICS_LOCK] = asyncio.Lock()

    async def start(_: web.Application) -> None:
        if admin_hashes(gateway):  # no console, no sampling
            history.start(gateway)

    async def stop(_: web.Application) -> None:
        await history.stop()

    app.on_startup.append(start)
    app.on_cleanup.insert(0, stop)
    r = app.router
    r.add_get(PREFIX, index)
    r.add_get(PREFIX + "/", index)
    r.add_get(PREFIX + "/login", login_form)
    r.add_post(PREFIX + "/login", login)
    r.add_post(PREFIX + "/logout", logout)
    r.add_get(PREFIX + "/static/{name}", static)
    r.add_get(PREFIX + "/fleet", fleet_page)
    r.add_get(PREFIX + "/fleet/panel", fleet_panel)
    r.add_get(PREFIX + "/spend", spend_page)
    r.add_get(PREFIX + "/decisions", decisions_page)
    r.add_get(PREFIX + "/decisions/{decision_id}", decision_page)
    r.add_get(PREFIX + "/receipt", receipt_page)
    r.add_post(PREFIX + "/receipt", receipt_page)
    r.add_get(PREFIX + "/economics", economics_page)
