"""Operational routes of an emulated endpoint, and the application that wires every route.

``GET /v1/models`` (under the URL's base path, like the generation routes), ``/health``,
``/metrics``, ``/version``; ``POST /tokenize``,
``/detokenize``, ``/v1/completions/render`` and ``/v1/chat/completions/render`` (the token ids
the request would use, in the shape of vLLM's render server: ``token_ids`` plus the model and
sampling parameters; completions render answers a list, one entry per prompt),
``/reset_prefix_cache``; and the SGLang-style routes peer routers call: ``/get_server_info``
(alias ``/server_info``), ``/model_info`` (alias ``/get_model_info``) and ``/get_load``.
"""

from __future__ import annotations

import time
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from inferplane.config.schema import ServedModel
from inferplane.tokenization import VOCABULARY, word_id
from inferplane.twin.emulator.app import (
    EMU,
    VLLM_VERSION,
    body_of,
    chat_completions,
    completions,
    embeddings,
    error_middleware,
    generate_model,
    json_response,
    request_ids,
)
from inferplane.twin.emulator.endpoint import EmulatedEndpoint, EmulatedRequestError, new_request_id
from inferplane.twin.emulator.messages import OPS_PREFIX, key_middleware, messages, ops_prefix
from inferplane.twin.emulator.metrics import restricted

_ID_WORDS = {word_id(w): w for w in VOCABULARY}
_SEEN_WORDS: dict[int, str] = {}  # words /tokenize has seen, so /detokenize can invert them
_MAX_SEEN_WORDS = 1 << 16


async def models(request: web.Request) -> web.StreamResponse:
    created = int(time.time())
    data: list[dict[str, Any]] = [
        {
            "id": m.upstream,
            "object": "model",
            "created": created,
            "owned_by": "vllm",
            "root": m.upstream,
            "parent": None,
            "max_model_len": m.max_context,
            "permission": [],
        }
        for m in request.app[EMU].endpoint.spec.models
    ]
    return json_response({"object": "list", "data": data})


async def health(request: web.Request) -> web.StreamResponse:
    return web.Response(status=200)


async def metrics(request: web.Request) -> web.StreamResponse:
    return web.Response(
        text=request.app[EMU].metrics.render(), content_type="text/plain", charset="utf-8"
    )


async def metrics_filtered(request: web.Request) -> web.StreamResponse:
    """``/metrics/``: as vLLM serves it (prometheus_client's app, mounted there), only the
    samples ``name[]`` names when the query names any, else the whole page."""
    page = request.app[EMU].metrics.render()
    names = request.query.getall("name[]", [])
    return web.Response(
        text=restricted(page, names) if names else page, content_type="text/plain",
        charset="utf-8",
    )


async def version(request: web.Request) -> web.StreamResponse:
    return json_response({"version": VLLM_VERSION})


def _tokenize_ids(emu: EmulatedEndpoint, body: dict[str, Any]) -> list[int]:
    model = body.get("model")
    emu.served(model if isinstance(model, str) else None)
    return request_ids(body, chat="messages" in body)


async def tokenize(request: web.Request) -> web.StreamResponse:
    emu, body = request.app[EMU], await body_of(request)
    ids = _tokenize_ids(emu, body)
    text = body.get("prompt")
    if isinstance(text, str):
        if len(_SEEN_WORDS) > _MAX_SEEN_WORDS:
            _SEEN_WORDS.clear()
        _SEEN_WORDS.update(zip(ids, text.split(), strict=True))
    return json_response(
        {"count": len(ids), "max_model_len": emu.max_model_len, "tokens": ids, "token_strs": None}
    )


def _word(token: int) -> str:
    return _ID_WORDS.get(token) or _SEEN_WORDS.get(token) or f"<|{token}|>"


async def detokenize(request: web.Request) -> web.StreamResponse:
    emu, body = request.app[EMU], await body_of(request)
    model = body.get("model")
    emu.served(model if isinstance(model, str) else None)
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
        raise EmulatedRequestError(400, "`tokens` must be a list of token ids.", param="tokens")
    return json_response({"prompt": " ".join(_word(t) for t in ids)})


def _render(body: dict[str, Any], ids: list[int], served: ServedModel) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    return {
        "request_id": new_request_id("render"),
        "token_ids": ids,
        "model": served.name,
        "sampling_params": {"max_tokens": max_tokens},
        "features": None,
    }


async def render_chat(request: web.Request) -> web.StreamResponse:
    emu, body = request.app[EMU], await body_of(request)
    served = generate_model(emu, body)
    return json_response(_render(body, request_ids(body, chat=True), served))


async def render_completion(request: web.Request) -> web.StreamResponse:
    emu, body = request.app[EMU], await body_of(request)
    served = generate_model(emu, body)
    return json_response([_render(body, request_ids(body, chat=False), served)])


async def reset_prefix_cache(request: web.Request) -> web.StreamResponse:
    if not request.app[EMU].reset_prefix_cache():
        raise EmulatedRequestError(400, "Cannot reset the prefix cache while requests run.")
    return web.Response(status=200)


async def server_info(request: web.Request) -> web.StreamResponse:
    emu = request.app[EMU]
    cfg, spec = emu.engine.config, emu.endpoint.spec
    return json_response(
        {
            "model_path": emu.model.name,
            "served_model_name": emu.model.name,
            "tp_size": spec.tp,
            "dp_size": 1,
            "context_length": emu.max_model_len,
            "max_total_num_tokens": cfg.num_gpu_blocks * cfg.block_size,
            "max_running_requests": cfg.max_num_seqs,
            "chunked_prefill_size": cfg.max_num_batched_tokens,
            "page_size": cfg.block_size,
            "kv_events_port": spec.emulation.kv_events_port,
            "version": VLLM_VERSION,
            "internal_states": [
                {"num_running": emu.engine.num_running, "num_waiting": emu.engine.num_waiting}
            ],
        }
    )


async def model_info(request: web.Request) -> web.StreamResponse:
    emu = request.app[EMU]
    return json_response(
        {
            "model_path": emu.model.name,
            "tokenizer_path": emu.model.name,
            "is_generation": emu.model.kind == "generate",
        }
    )


async def get_load(request: web.Request) -> web.StreamResponse:
    """``{"load": …}`` as sglang/vllm-router's power-of-two policy reads it: tokens in flight
    (prompt + generated of running and waiting requests), with the counts beside it."""
    emu = request.app[EMU]
    e, tokens = emu.engine, emu.tokens_in_flight()
    return json_response(
        {
            "load": tokens,
            "num_reqs": e.num_running,
            "num_waiting_reqs": e.num_waiting,
            "num_tokens": tokens,
        }
    )


def build_app(emu: EmulatedEndpoint) -> web.Application:
    """The aiohttp application of one emulated endpoint."""
    app = web.Application(
        middlewares=[error_middleware, key_middleware], client_max_size=64 * 1024 * 1024
    )
    app[EMU] = emu
    app[OPS_PREFIX] = prefix = ops_prefix(emu)
    r = app.router
    ep = emu.endpoint

    def api(path: str) -> str:  # the API under the endpoint URL's base path, if any
        return urlsplit(ep.api_url(path)).path

    if ep.dialect == "anthropic":
        r.add_post(api("/v1/messages"), messages)
    else:
        r.add_post(api("/v1/chat/completions"), chat_completions)
        r.add_post(api("/v1/completions"), completions)
        r.add_post(api("/v1/embeddings"), embeddings)
    r.add_get(api("/v1/models"), models)
    # at the root, and under the URL's base path less a trailing /v1 too (`ops_prefix`): the
    # gateway probes `<url>/health` and scrapes `<url>/metrics`, which an engine behind a
    # path-prefix proxy answers for a URL such as `…/proxy`, but not for `…/v1`
    for under in dict.fromkeys(("", prefix)):
        r.add_get(under + "/health", health)
        r.add_get(under + "/metrics", metrics)
        r.add_get(under + "/metrics/", metrics_filtered)
    r.add_get("/version", version)
    r.add_post("/tokenize", tokenize)
    r.add_post("/detokenize", detokenize)
    r.add_post("/v1/chat/completions/render", render_chat)
    r.add_post("/v1/completions/render", render_completion)
    r.add_post("/reset_prefix_cache", reset_prefix_cache)
    for path in ("/get_server_info", "/server_info"):
        r.add_get(path, server_info)
    for path in ("/model_info", "/get_model_info"):
        r.add_get(path, model_info)
    r.add_get("/get_load", get_load)
    return app
