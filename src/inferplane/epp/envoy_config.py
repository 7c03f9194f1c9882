"""`inferplane envoy-config`: an Envoy bootstrap for running Envoy in front of `inferplane epp`.

What it builds (all from the fleet file, `epp:` and `gateway:` sections):

* a listener on ``epp.envoy_host:epp.envoy_port`` whose HTTP connection manager first strips
  the routing headers a client might forge (``x-gateway-destination-endpoint``,
  ``x-inferplane-cluster``, the echoed ``x-inferplane-*``) and every ``x-envoy-*`` control
  header (retries, timeouts: a client never steers the router), then runs
* the **answer filter** (Lua, first in the chain, so last on the way back): of an upstream's
  answer the client gets only the headers the HTTP gateway would pass it
  (`inferplane.upstream_headers`: content type, request id, ``gateway.upstream_response_headers``)
  and the picker's own; the filters after it (the picker, the observer) see the answer whole (an
  upstream's ``Retry-After`` included), and answers that never reached an upstream (the picker's
  refusals with their ``Retry-After``, Envoy's own) pass unchanged;
* the **picker** ext_proc filter (request headers and buffered request body; response headers
  only without the observer; ``message_timeout`` = ``epp.message_timeout_s``; a picker failure
  lets the request continue without a destination, which the routes below answer)
  and, with ``epp.observe_responses``, the **observer** ext_proc filter in observability mode
  (response headers and streamed body, never waited on), then the router;
* routes: a request that carries ``x-inferplane-cluster`` goes to that cluster (the picker always
  sets it); without it (the picker failed open) it goes to ``inferplane_fail_open``, a
  round-robin cluster over the plain engine endpoints without the client's ``Authorization``,
  cookies and provider-account headers (``upstream_headers.CLIENT_ACCOUNT_HEADERS``, which the
  picker removes from every request it places), or, fail-closed, gets a 503 in the OpenAI error
  shape;
* clusters: ``inferplane_epp`` (HTTP/2 to the picker), ``inferplane_original_dst`` (an
  ORIGINAL_DST cluster that connects to the ``x-gateway-destination-endpoint`` header's
  ``ip:port``), and one ``inferplane_ep_<name>`` cluster per endpoint that is not a plain-HTTP IP
  address (a hostname resolved by DNS; TLS with SNI for ``https``);
* with ``epp.observe_responses``, an **access log to the picker** (Envoy's gRPC access log
  service, only exchanges with an upstream-side response flag, ``BROKEN_UPSTREAM_FLAGS``): the
  observer's stream ends alike when the client left and when the engine cut its answer, and
  the log's flags tell the picker which (`epp.server.Picker.upstream_broke`);
* ``local_reply_config``: Envoy's own failures (upstream unreachable, reset, timeouts) in the
  OpenAI error shape; the picker's ImmediateResponses pass through unchanged;
* route ``response_headers_to_add``: the served endpoint (``x-gateway-destination-endpoint-served``
  from the upstream address, which also marks an answer as an upstream's for the answer filter)
  and the picker's decision headers, copied from the request (an upstream's own of those names
  are removed first).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import yaml

from inferplane.config.schema import FleetConfig
from inferplane.epp import protocol as P
from inferplane.fleet.model import Fleet
from inferplane.upstream_headers import (
    CLIENT_ACCOUNT_HEADERS,
    GATEWAY_PREFIX,
    NEVER,
    ResponseHeaderRule,
)

EXT_PROC = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"
HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
    "HttpConnectionManager"
)
HTTP_OPTIONS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
EARLY_MUTATION = (
    "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3."
    "HeaderMutation"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
LUA = "type.googleapis.com/envoy.extensions.filters.http.lua.v3.Lua"
GRPC_ACCESS_LOG = (
    "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"
)
BROKEN_UPSTREAM_FLAGS = ("UC", "UR", "UPE", "UT")
"""Envoy's response flags of an exchange broken on the upstream's side (its connection
terminated or reset, a protocol error, the route timeout): only these are logged to the
picker (`_broken_upstream_log`). A client that left is ``DC`` and is not sent."""
ACCESS_LOG_FLUSH_S = 0.1
"""How often Envoy sends the picker its buffered access log entries: well inside the
observer's deferred close (`OBSERVER_CLOSE_S`), so the picker learns an upstream broke a
response before the observer's stream ends."""
ENVOY_FRAMING = ("content-length", "transfer-encoding", "content-encoding", "date")
"""An upstream answer's headers Envoy frames the client's response with: kept by the answer
filter (the HTTP gateway writes its own). ``content-encoding`` among them: Envoy relays the
upstream's bytes as they are, so the upstream's encoding is the only true description of the
body the client gets (the picker asks upstreams for ``identity``, but the fail-open route and
an upstream that compresses unasked still need it)."""

OBSERVER_CLOSE_S = 5.0
"""How long Envoy keeps an observer stream after the response ended (its
``deferred_close_timeout``, Envoy's default); the picker waits this and a margin for an
observer's report before it records a pick without one (`epp.server.Picker.stream_ended`; the
pick's reservation is released at once)."""

BODY_MARGIN_BYTES = 64 * 1024
"""Room above ``gateway.max_body_bytes`` for framing: Envoy's per-connection buffer and the
picker's gRPC receive limit are both ``max_body_bytes`` plus this (`buffer_bytes`), so a body at
the limit reaches the picker whole (its ext_proc message adds a few bytes of protobuf framing)
and one over it gets the picker's 413."""


def buffer_bytes(max_body_bytes: int) -> int:
    """Envoy's buffer and the picker's largest gRPC message for a body limit of
    ``max_body_bytes``."""
    return max_body_bytes + BODY_MARGIN_BYTES



def _secs(s: float) -> str:
    return f"{s:.3f}s"


def _address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def dial_host(listen: str) -> str:
    """The address to reach a listener bound to ``listen`` on the same host: its loopback for
    the wildcards (0.0.0.0, ::, empty), which name no host to connect to."""
    if listen in ("", "0.0.0.0"):
        return "127.0.0.1"
    if listen == "::":
        return "::1"
    return listen


def _load_assignment(name: str, hosts: list[tuple[str, int]]) -> dict[str, Any]:
    return {
        "cluster_name": name,
        "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _address(h, p)}} for h, p in hosts]}
        ],
    }


def _openai_error(message: str, etype: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


def bootstrap(config: FleetConfig, *, epp_port: int | None = None,
              envoy_port: int | None = None, admin_port: int | None = None) -> dict[str, Any]:
    """The bootstrap as a dict (`render` gives the YAML). The ports default to ``epp:``."""
    e, g = config.epp, config.gateway
    fleet = Fleet.from_config(config)
    epp_port = e.port if epp_port is None else epp_port
    envoy_port = e.envoy_port if envoy_port is None else envoy_port
    admin_port = e.envoy_admin_port if admin_port is None else admin_port
    picker: dict[str, Any] = {
        "name": "inferplane.picker",
        "typed_config": {
            "@type": EXT_PROC,
            "grpc_service": {"envoy_grpc": {"cluster_name": "inferplane_epp"}},
            # a picker failure never answers by itself: the request goes on without a
            # destination and the routes decide (fail open: an engine; fail closed: a 503)
            "failure_mode_allow": True,
            "message_timeout": _secs(e.message_timeout_s),
            # headers and body in one go: one wake-up of the picker instead of two
            "send_body_without_waiting_for_header_response": True,
            "processing_mode": {
                "request_header_mode": "SEND",
                "request_body_mode": "BUFFERED",
                "request_trailer_mode": "SKIP",
                # with the observer, the picker never holds the response
                "response_header_mode": "SKIP" if e.observe_responses else "SEND",
                "response_body_mode": "NONE",
                "response_trailer_mode": "SKIP",
            },
            "metadata_options": {
                "forwarding_namespaces": {"untyped": [P.SUBSET_NAMESPACE, P.DESTINATION_NAMESPACE]},
                # what the answer filter reads (Envoy drops any namespace not listed here)
                "receiving_namespaces": {"untyped": [P.ANSWER_NAMESPACE]},
            },
            # the picker rewrites :path (an endpoint's base path) and :authority (an endpoint
            # reached by name)
            "mutation_rules": {"allow_all_routing": True},
        },
    }
    filters: list[dict[str, Any]] = [_answer_filter(g.upstream_response_headers), picker]
    if e.observe_responses:
        filters.append({
            "name": "inferplane.observer",
            "typed_config": {
                "@type": EXT_PROC,
                "grpc_service": {"envoy_grpc": {"cluster_name": "inferplane_epp"}},
                "observability_mode": True,
                "failure_mode_allow": True,
                # Envoy keeps an observer stream open this long after the response ended and
                # then resets it, dropping what the picker has not read yet (a busy picker
                # reads late); the picker ends each observer stream itself once it has seen
                # the response's end, so streams do not linger this long
                "deferred_close_timeout": _secs(OBSERVER_CLOSE_S),
                # the decision id reaches it on the response (route response_headers_to_add)
                "processing_mode": {
                    "request_header_mode": "SKIP",
                    "request_body_mode": "NONE",
                    "request_trailer_mode": "SKIP",
                    "response_header_mode": "SEND",
                    "response_body_mode": "STREAMED",
                    "response_trailer_mode": "SKIP",
                },
                "response_attributes": ["upstream.address"],
                "metadata_options": {
                    "forwarding_namespaces": {"untyped": [P.DESTINATION_NAMESPACE]},
                },
            },
        })
    filters.append({"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}})

    timeout = _secs(g.upstream_timeout_s)
    plain: list[tuple[str, int]] = []
    named: list[dict[str, Any]] = []
    for ep in fleet.endpoints:
        if ep.dialect != "openai":  # needs translation: the picker never places on it
            continue
        addr = P.destination(ep)
        parts = urlsplit(ep.url)
        if addr is not None:
            plain.append((parts.hostname or "", parts.port or 80))
            continue
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        cluster: dict[str, Any] = {
            "name": P.endpoint_cluster(ep.name),
            "type": "LOGICAL_DNS",
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": _secs(g.connect_timeout_s),
            "load_assignment": _load_assignment(
                P.endpoint_cluster(ep.name), [(parts.hostname or "", port)]
            ),
        }
        if tls:
            cluster["transport_socket"] = {
                "name": "envoy.transport_sockets.tls",
                "typed_config": {"@type": TLS, "sni": parts.hostname},
            }
        named.append(cluster)

    fallback_action: dict[str, Any]
    served = {"header": {"key": P.SERVED_KEY, "value": "%UPSTREAM_REMOTE_ADDRESS%"},
              "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
    if e.fail_open and plain:
        fallback_action = {
            "route": {"cluster": P.FALLBACK_CLUSTER, "timeout": timeout,
                      "idle_timeout": timeout},
            # unpicked, so not stripped by the picker: the tenant's key never reaches an engine,
            # nor a client's own decision id (the access log names the decision by it: a
            # forged one would account another request's flight)
            "request_headers_to_remove": [*CLIENT_ACCOUNT_HEADERS, *P.ECHOED],
            # the answer filter keeps the echoed names (the picked route's own): an engine's
            # copies of them must go here, where nothing is echoed
            "response_headers_to_remove": [P.SERVED_KEY, *P.ECHOED],
            "response_headers_to_add": [served],  # an upstream's answer (the answer filter)
        }
    else:
        body = _openai_error(
            "the endpoint picker gave no destination", "service_unavailable", "picker_unavailable"
        )
        fallback_action = {
            "direct_response": {"status": 503, "body": {"inline_string": _json(body)}},
            "response_headers_to_add": [{
                "header": {"key": "content-type", "value": "application/json"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
            }],
        }
    routes = [
        {
            "match": {
                "prefix": "/",
                "headers": [{"name": P.CLUSTER_HEADER, "present_match": True}],
            },
            "route": {"cluster_header": P.CLUSTER_HEADER, "timeout": timeout,
                      # Envoy's own stream idle timeout (300 s unless set) would cut a silent
                      # engine before gateway.upstream_timeout_s (600 s), flagged SI: not in
                      # the access log, so recorded 499 and blaming no one. Aligned with the
                      # route timeout, whose cut (UT) is logged and blamed
                      "idle_timeout": timeout},
            # removed before the adds: an upstream's own of these names never reach the client
            # (an echoed header the request lacks is not added, and would leave the upstream's)
            "response_headers_to_remove": [P.SERVED_KEY, *P.ECHOED],
            "response_headers_to_add": [
                served,
                *(
                    {"header": {"key": h, "value": f"%REQ({h})%"},
                     "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                    for h in P.ECHOED
                ),
            ],
        },
        {"match": {"prefix": "/"}, **fallback_action},
    ]
    hcm: dict[str, Any] = {
        "@type": HCM,
        "stat_prefix": "inferplane",
        "codec_type": "AUTO",
        "early_header_mutation_extensions": [{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": EARLY_MUTATION,
                "mutations": [
                    *({"remove": h}
                      for h in (P.DESTINATION_KEY, P.CLUSTER_HEADER, *P.ECHOED)),
                    # Envoy's own control headers (x-envoy-retry-on, -max-retries,
                    # -upstream-rq-timeout-ms...): the router honours them on a request it
                    # deems internal, and Envoy before 1.36 deems an RFC1918 address (a
                    # forged X-Forwarded-For: 10.0.0.1) internal. A tenant must not retry one
                    # placed request against the shared key nor lift the route timeout
                    {"remove_on_match": {"key_matcher": {"prefix": "x-envoy-"}}},
                ],
            },
        }],
        # nothing is internal (Envoy 1.36+'s default, explicit for older ones)
        "internal_address_config": {},
        "route_config": {
            "name": "inferplane",
            "virtual_hosts": [{"name": "inferplane", "domains": ["*"], "routes": routes}],
        },
        "http_filters": filters,
        "local_reply_config": _local_replies(),
    }
    if e.observe_responses:
        hcm["access_log"] = [_broken_upstream_log()]
    clusters: list[dict[str, Any]] = [
        {
            "name": "inferplane_epp",
            "type": "STATIC",
            "connect_timeout": "1s",
            # every request holds one or two streams to the picker: the default breakers
            # (1,024 requests) would refuse picks under load, which fails closed as a 503
            "circuit_breakers": {"thresholds": [{
                "max_requests": 1_000_000, "max_pending_requests": 1_000_000,
                "max_connections": 1_000_000,
            }]},
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": HTTP_OPTIONS,
                    "explicit_http_config": {"http2_protocol_options": {}},
                }
            },
            # the picker beside Envoy (one pod, one host): epp.host is where it listens, often
            # 0.0.0.0, which is no address to dial
            "load_assignment": _load_assignment("inferplane_epp",
                                                [(dial_host(e.host), epp_port)]),
        },
        {
            "name": P.ORIGINAL_DST_CLUSTER,
            "type": "ORIGINAL_DST",
            "lb_policy": "CLUSTER_PROVIDED",
            "connect_timeout": _secs(g.connect_timeout_s),
            "original_dst_lb_config": {
                "use_http_header": True,
                "http_header_name": P.DESTINATION_KEY,
            },
        },
        *named,
    ]
    if e.fail_open and plain:
        clusters.append({
            "name": P.FALLBACK_CLUSTER,
            "type": "STATIC",
            "lb_policy": "ROUND_ROBIN",
            "connect_timeout": _secs(g.connect_timeout_s),
            "load_assignment": _load_assignment(P.FALLBACK_CLUSTER, plain),
        })
    buffer = buffer_bytes(g.max_body_bytes)
    return {
        "admin": {"address": _address("127.0.0.1", admin_port)},
        "static_resources": {
            "listeners": [{
                "name": "inferplane",
                "address": _address(e.envoy_host, envoy_port),
                "per_connection_buffer_limit_bytes": buffer,
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": hcm,
                }]}],
            }],
            "clusters": clusters,
        },
    }


def _broken_upstream_log() -> dict[str, Any]:
    """The access log that tells the picker which picked exchanges the upstream broke after the
    observer saw their head (`BROKEN_UPSTREAM_FLAGS`; the request's decision id names the
    pick). Envoy buffers entries and sends them every `ACCESS_LOG_FLUSH_S` on one long-lived
    stream to the picker's cluster; the log is lossy by design, so a lost entry only leaves
    such an exchange recorded as before (499, blaming no endpoint)."""
    return {
        "name": "inferplane.broken_upstreams",
        "filter": {"response_flag_filter": {"flags": list(BROKEN_UPSTREAM_FLAGS)}},
        "typed_config": {
            "@type": GRPC_ACCESS_LOG,
            "common_config": {
                "log_name": "inferplane",
                "grpc_service": {"envoy_grpc": {"cluster_name": "inferplane_epp"}},
                "transport_api_version": "V3",
                "buffer_flush_interval": _secs(ACCESS_LOG_FLUSH_S),
            },
            "additional_request_headers_to_log": [P.DECISION_HEADER],
        },
    }


def _answer_filter(extra: list[str]) -> dict[str, Any]:
    """The Lua filter that leaves an upstream's answer only the headers a client may see: the
    rule of `inferplane.upstream_headers` (``extra``: ``gateway.upstream_response_headers``),
    the picker's echoed headers, the served endpoint and Envoy's framing; an event stream gets
    the gateway's own ``Cache-Control: no-cache``, as `inferplane serve` sets it. An answer
    without the served-endpoint header never came from an upstream (the picker's refusals, its
    ImmediateResponses) and passes unchanged: the gateway's ``Retry-After`` stays.

    With what the picker left in the ``P.ANSWER_NAMESPACE`` metadata at the pick
    (`epp.server.Picker.route_template`), it also answers as the gateway does: an upstream's
    429 becomes the gateway's 429 ``upstream_rate_limited`` with its own ``Retry-After`` (the
    upstream's, else the endpoint's ``limits.retry_after_s``; sooner when another endpoint of
    the model, rate limited at the pick, is back before), and the endpoint's own key is
    replaced by ``[redacted]`` in an upstream's error body (any status from 400) and in the
    chunks of its event stream (a key split across two chunks passes: the stream is not
    held)."""
    rule = ResponseHeaderRule(extra)
    keep = sorted(rule.names | set(ENVOY_FRAMING) | {P.SERVED_KEY, *P.ECHOED})
    never = sorted(NEVER)
    return {
        "name": "inferplane.answer_headers",
        "typed_config": {
            "@type": LUA,
            "default_source_code": {"inline_string": _ANSWER_LUA % {
                "keep": _lua_set(keep), "never": _lua_set(never),
                "prefixes": "{" + ", ".join(_lua_str(p) for p in rule.prefixes) + "}",
                "gateway": _lua_str(GATEWAY_PREFIX), "served": _lua_str(P.SERVED_KEY),
                "answer": _lua_str(P.ANSWER_NAMESPACE), "endpoint": _lua_str(P.ENDPOINT_HEADER),
            }},
        },
    }


_ANSWER_LUA = """\
-- inferplane: the upstream answer headers a client sees (inferplane.upstream_headers)
local keep = %(keep)s
local never = %(never)s
local prefixes = %(prefixes)s
local gateway = %(gateway)s

local function passes(name)
  if keep[name] or name:sub(1, 1) == ":" then
    return true
  end
  if never[name] or name:sub(1, #gateway) == gateway then
    return false
  end
  for _, p in ipairs(prefixes) do
    if name:sub(1, #p) == p then
      return true
    end
  end
  return false
end

local function replace_plain(text, find, with)
  local out, at = {}, 1
  while true do
    local i, j = text:find(find, at, true)
    if i == nil then
      break
    end
    out[#out + 1] = text:sub(at, i - 1)
    out[#out + 1] = with
    at = j + 1
  end
  out[#out + 1] = text:sub(at)
  return table.concat(out)
end

-- the endpoint's key, as is and as JSON escapes it (dispatch.credentials.redact)
local function redact(text, md)
  text = replace_plain(text, md.key, "[redacted]")
  if md.key_json ~= nil then
    text = replace_plain(text, md.key_json, "[redacted]")
  end
  return text
end

local function json_string(s)
  s = s:gsub('[%%c"\\\\]', function(c)
    return string.format("\\\\u%%04x", c:byte())
  end)
  return '"' .. s .. '"'
end

-- an upstream's 429 as the gateway answers it (core.plane.Core._failed): 429
-- upstream_rate_limited, Retry-After when the first endpoint of the model is back
local MONTHS = {Jan = 1, Feb = 2, Mar = 3, Apr = 4, May = 5, Jun = 6, Jul = 7, Aug = 8,
                Sep = 9, Oct = 10, Nov = 11, Dec = 12}

-- days since 1970-01-01 of a proleptic Gregorian date (UTC: os.time(table) is local time)
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) %% 12) + 2) / 5) + d - 1
  return era * 146097 + yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy - 719468
end

-- seconds from a Retry-After, by the gateway's rules (dispatch.upstream.parse_retry_after):
-- delta-seconds or an HTTP date (IMF-fixdate), never below 0; non-finite or unreadable: nil
local function retry_after_seconds(value)
  if value == nil then return nil end
  local v = value:match("^%%s*(.-)%%s*$")
  local n = nil
  if v:match("^[+-]?%%d*%%.?%%d*[eE]?[+-]?%%d*$") and v:match("%%d") then
    n = tonumber(v)
  else
    local d, mon, y, hh, mm, ss = v:match(
      "^%%a+, (%%d%%d?) (%%a+) (%%d%%d%%d%%d) (%%d%%d):(%%d%%d):(%%d%%d) GMT$")
    if d ~= nil and MONTHS[mon] ~= nil then
      n = days_from_civil(tonumber(y), MONTHS[mon], tonumber(d)) * 86400
        + tonumber(hh) * 3600 + tonumber(mm) * 60 + tonumber(ss) - os.time()
    end
  end
  if n == nil or n ~= n or n == math.huge or n == -math.huge then return nil end
  return math.max(0, n)
end

local function rate_limited(handle, headers, md, upstream_retry)
  local sent = retry_after_seconds(upstream_retry)
  local wait = sent or md.retry_after_s or 1
  if md.others_back_at ~= nil and md.others_back_at - os.time() < wait then
    wait = md.others_back_at - os.time()
  end
  local name = headers:get(%(endpoint)s) or "?"
  local message = "upstream '" .. name .. "': answered HTTP 429"
  if sent ~= nil then
    message = message .. string.format(" (Retry-After %%g s)", sent)
  end
  local answer = '{"error":{"message":' .. json_string(message)
    .. ',"type":"rate_limit_exceeded","param":null,"code":"upstream_rate_limited"}}'
  -- whole seconds rounded up, at least 1, in digits (errors.retry_after_header)
  headers:replace("retry-after", string.format("%%.0f", math.max(1, math.ceil(wait))))
  headers:replace("content-type", "application/json")
  headers:remove("content-encoding")
  local body = handle:body() -- the provider's, replaced (setBytes sets content-length)
  if body ~= nil then
    body:setBytes(answer)
  end
end

function envoy_on_response(handle)
  local headers = handle:headers()
  if headers:get(%(served)s) == nil then
    return -- not an upstream's answer: the picker's or Envoy's own
  end
  local upstream_retry = headers:get("retry-after") -- removed below, read for a 429
  local drop = {}
  for name, _ in pairs(headers) do
    if not passes(name) then
      drop[#drop + 1] = name
    end
  end
  for _, name in ipairs(drop) do
    headers:remove(name)
  end
  local ctype = headers:get("content-type")
  local stream = ctype ~= nil and ctype:sub(1, #"text/event-stream") == "text/event-stream"
  if stream then
    headers:replace("cache-control", "no-cache") -- the gateway's own, as on inferplane serve
  end
  local md = handle:streamInfo():dynamicMetadata():get(%(answer)s)
  if md == nil then
    return -- not picked (the fail-open route), or a bootstrap newer than its picker
  end
  local status = tonumber(headers:get(":status")) or 0
  if status == 429 then
    rate_limited(handle, headers, md, upstream_retry)
  elseif status >= 400 and md.key ~= nil then
    local body = handle:body()
    if body ~= nil then
      local text = body:getBytes(0, body:length())
      local clean = redact(text, md)
      if clean ~= text then
        body:setBytes(clean)
      end
    end
  elseif stream and md.key ~= nil then
    for chunk in handle:bodyChunks() do
      local text = chunk:getBytes(0, chunk:length())
      local clean = redact(text, md)
      if clean ~= text then
        chunk:setBytes(clean)
      end
    end
  end
end
"""


def _lua_str(s: str) -> str:
    import json

    return json.dumps(s)  # header names are ASCII tokens: a JSON string is a Lua string


def _lua_set(names: list[str]) -> str:
    return "{" + ", ".join(f"[{_lua_str(n)}] = true" for n in names) + "}"


def _local_replies() -> dict[str, Any]:
    """Envoy's own failures (upstream unreachable, reset, timed out: any response flag) in the
    OpenAI error shape; every other local reply (the picker's ImmediateResponses, the fail-closed
    route's answer) is already OpenAI-shaped and passes unchanged."""
    return {
        "mappers": [{
            "filter": {"response_flag_filter": {}},
            "body_format_override": {
                "json_format": _openai_error(
                    "the proxy answered %RESPONSE_CODE% itself: %RESPONSE_CODE_DETAILS%",
                    "upstream_error", "proxy_error",
                ),
            },
        }],
    }


def _json(obj: Any) -> str:
    import json

    return json.dumps(obj, separators=(",", ":"))


def render(config: FleetConfig, **ports: int | None) -> str:
    """The bootstrap as YAML."""
    return yaml.safe_dump(bootstrap(config, **ports), sort_keys=False)
