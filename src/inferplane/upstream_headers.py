"""Which of an upstream's response headers a tenant sees: an allowlist.

One upstream session and one provider key serve every tenant, so what an upstream says about
itself in its headers is not the tenant's: its cookies (a provider's Cloudflare ``__cf_bm``, a
sticky load balancer's backend cookie), the provider account behind the shared key
(``openai-organization``, ``openai-project``, ``anthropic-organization-id``), that key's quota
state (``x-ratelimit-*``, ``anthropic-ratelimit-*``, a ``Retry-After``), its servers and proxies
(``server``, ``via``, ``cf-ray``, ``x-envoy-upstream-service-time``...). A denylist would have to
know every provider's and proxy's names, today's and next year's; an allowlist names what a
client needs, and anything new stays at the gateway until an operator passes it.

Passed by default (`PASSED`):

* ``content-type``: how to read the body (a stream's ``text/event-stream``);
* the upstream's request id, ``x-request-id`` (OpenAI, Azure OpenAI, vLLM with
  ``--enable-request-id-headers``, most proxies) and ``request-id`` (Anthropic), under their own
  names: a random id of this one request, no account or quota state, that the platform team
  quotes to the provider (or finds in the engine's log) when a tenant reports a bad answer; the
  OpenAI SDKs show ``x-request-id`` as the response's request id. The gateway already tells the
  client which endpoint, substrate and model answered (``x-inferplane-*``), so the id's format
  tells it nothing new.

An operator adds names or ``prefix*`` families with ``gateway.upstream_response_headers`` (a
single-tenant deployment that owns its provider key may want ``x-ratelimit-*``); `NEVER` and
the gateway's own ``x-inferplane-*`` are refused there and dropped whatever the list says: the
framing of the gateway's own response, cookies of a shared session, and the names the gateway
sets itself (an upstream must not be able to overwrite which endpoint answered).

The gateway's own headers are not upstream headers and are not filtered: ``x-inferplane-*``,
and on its own refusals the ``Retry-After`` of its rate limits, queue and budgets.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

PASSED = frozenset({"content-type", "x-request-id", "request-id"})
"""The upstream response headers a tenant sees by default (lower case)."""

NEVER = frozenset(
    {
        # the framing of the gateway's own response (aiohttp writes these for it)
        "content-length",
        "transfer-encoding",
        "content-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "te",
        "trailer",
        "date",
        "server",
        # a shared session's cookies are nobody's (the session keeps none either)
        "set-cookie",
        "set-cookie2",
    }
)
"""Never passed from an upstream, whatever ``gateway.upstream_response_headers`` says."""

GATEWAY_PREFIX = "x-inferplane-"
"""The gateway's own headers: never taken from an upstream."""

CLIENT_ACCOUNT_HEADERS = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "cookie",
    "openai-organization",
    "openai-project",
    # Gemini's OpenAI-compatible endpoint: a key, and the project billed for the quota
    "x-goog-api-key",
    "x-goog-user-project",
    # Azure OpenAI behind API Management
    "ocp-apim-subscription-key",
)
"""A client's request headers that carry a key or a cookie, or choose the provider account a
key acts for. The HTTP gateway sends an upstream none of a client's headers (only its own: the
endpoint's key, the content type, the trace context); behind Envoy, where the client's headers
travel on, the picker removes these from every request it places (a key of the endpoint's own
dialect is set in their place) and the fail-open route removes them too: the tenant's key never
reaches an upstream, nor can a tenant point the shared provider key at another organization or
project."""

_TOKEN = re.compile(r"[!#$%&'+.^_`|~0-9a-z-]+")  # RFC 9110 token, lower case, no '*'


def refusal(entry: str) -> str | None:
    """Why ``entry`` (a name or ``prefix*``) cannot be in ``gateway.upstream_response_headers``,
    or None when it can."""
    name = entry.lower()
    prefix = name.endswith("*")
    stem = name[:-1] if prefix else name
    if prefix and not stem:
        return (f"{entry!r} would pass every upstream header: name the headers (or a prefix "
                "such as 'x-ratelimit-*')")
    if not _TOKEN.fullmatch(stem):
        return (f"{entry!r} is not a header name (letters, digits and !#$%&'+-.^_`|~), "
                "optionally ending in '*' for every name that starts with what is before it")
    # a family too: ``set-cookie*`` or ``x-inferplane*`` would pass nothing (the rule never
    # passes those names) while the operator believes it does something
    if stem.startswith(GATEWAY_PREFIX.rstrip("-")):
        return (f"{entry!r}: x-inferplane-* are the gateway's own headers, never an "
                "upstream's")
    if stem in NEVER:
        if "cookie" in stem:
            return (f"{entry!r}: an upstream's cookie is never passed (one session serves "
                    "every tenant: a cookie it sets is no tenant's)")
        return f"{entry!r} frames the gateway's own response: the gateway sets it"
    return None


class ResponseHeaderRule:
    """Filter an upstream's response headers to what a tenant sees: `PASSED` and ``extra``
    (names, or ``prefix*`` families: a prefix passes every name it covers but these), never
    `NEVER` nor ``x-inferplane-*``. Names are matched without regard to case and passed as the
    upstream spelled them."""

    __slots__ = ("names", "prefixes")

    def __init__(self, extra: Iterable[str] = ()) -> None:
        names, prefixes = set(PASSED), []
        for entry in extra:
            e = entry.lower()
            if e.endswith("*"):
                prefixes.append(e[:-1])
            else:
                names.add(e)
        self.names = frozenset(n for n in names - NEVER if not n.startswith(GATEWAY_PREFIX))
        self.prefixes = tuple(prefixes)

    def __call__(self, headers: Mapping[str, str]) -> dict[str, str]:
        names, prefixes = self.names, self.prefixes
        out = {}
        for k, v in headers.items():
            lk = k.lower()
            if lk in names or (
                prefixes and lk.startswith(prefixes) and lk not in NEVER
                and not lk.startswith(GATEWAY_PREFIX)
            ):
                out[k] = v
        return out
