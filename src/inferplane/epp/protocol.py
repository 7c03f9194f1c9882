"""The endpoint-picker protocol of the Gateway API Inference Extension, as inferplane speaks it.

Names (headers and metadata keys) follow the extension's protocol document (proposal 004) and its
lightweight reference picker; the code is ours. Data plane → picker: the request's headers and
body, an optional subset hint in the filter metadata ``envoy.lb.subset_hint`` /
``x-gateway-destination-endpoint-subset`` (a list of ``ip[:port]``, or one comma-separated
string), and on the response the endpoint that served it (``envoy.lb`` /
``x-gateway-destination-endpoint-served``). Picker → data plane: the pick as the
``x-gateway-destination-endpoint`` header and as dynamic metadata ``envoy.lb`` /
``x-gateway-destination-endpoint``, with the same value; a refusal as an ImmediateResponse
(inferplane's: the OpenAI error body).
"""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

from inferplane.fleet.model import Endpoint

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
DESTINATION_NAMESPACE = "envoy.lb"
DESTINATION_KEY = "x-gateway-destination-endpoint"
SERVED_KEY = "x-gateway-destination-endpoint-served"
OBJECTIVE_HEADER = "x-gateway-inference-objective"
FAIRNESS_HEADER = "x-gateway-inference-fairness-id"
MODEL_REWRITE_HEADER = "x-gateway-model-name-rewrite"

CLUSTER_HEADER = "x-inferplane-cluster"
"""Which Envoy cluster carries the request: ``ORIGINAL_DST_CLUSTER`` for engines addressed by
``ip:port``, ``ep_<name>`` for an endpoint Envoy reaches by name (TLS, a hostname)."""
DECISION_HEADER = "x-inferplane-decision-id"
ENDPOINT_HEADER = "x-inferplane-endpoint"
SUBSTRATE_HEADER = "x-inferplane-substrate"
MODEL_HEADER = "x-inferplane-model"
SPILLOVER_HEADER = "x-inferplane-spillover"
ECHOED = (DECISION_HEADER, ENDPOINT_HEADER, SUBSTRATE_HEADER, MODEL_HEADER, SPILLOVER_HEADER,
          "x-inferplane-max-tokens-clamped")
"""Request headers the picker sets that Envoy copies onto the client's response."""
ANSWER_NAMESPACE = "inferplane.answer"
"""Dynamic metadata the picker sets with a pick for the bootstrap's answer filter: the
endpoint's ``retry_after_s``, ``others_back_at`` (Unix seconds: when the first other endpoint
of the model, rate limited after a 429, is back) and the endpoint's key to redact (``key``,
``key_json``)."""
ORIGINAL_DST_CLUSTER = "inferplane_original_dst"
FALLBACK_CLUSTER = "inferplane_fail_open"


def endpoint_cluster(name: str) -> str:
    return f"inferplane_ep_{name}"


def destination(endpoint: Endpoint) -> str | None:
    """``ip:port`` for an endpoint Envoy can reach with the original-destination cluster (plain
    HTTP to an IP literal), else None (the endpoint gets a cluster of its own)."""
    parts = urlsplit(endpoint.url)
    if parts.scheme != "http" or parts.hostname is None:
        return None
    try:
        ip = ipaddress.ip_address(parts.hostname)
    except ValueError:
        return None
    port = parts.port or 80
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def matches(hint: str, address: str) -> bool:
    """Does a subset entry (``ip:port`` or a bare ``ip``, any port) name this address?"""
    hint = hint.strip()
    if hint == address:
        return True
    host = address.rsplit(":", 1)[0]
    return hint == host or hint == host.strip("[]")
