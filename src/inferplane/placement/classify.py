"""classify: turn an API request (already JSON-checked) into a `RequestProfile`.

Reads the body's model, prompt and ``max_tokens`` and these headers, each validated and named in
its 400 error when invalid:

====================================  ==========================================================
``x-inferplane-class``                workload class (must exist)
``x-inferplane-slo-ttft-ms``          TTFT SLO override, positive number
``x-inferplane-slo-itl-ms``           ITL SLO override, positive number
``x-inferplane-jurisdictions``        comma list; narrows the tenant's allowed set, never widens
``x-inferplane-precision``            comma list of tolerated precisions
``x-inferplane-client-region``        client region (must be a configured region)
``x-inferplane-data-region``          region of a data store the request uses (RAG index)
``x-inferplane-data-source``          a configured data source (``data_sources``): its region
                                      is the data region; with ``residency`` the request runs
                                      only in the source's jurisdiction
``x-inferplane-agent-step``           agent loop step, non-negative integer
``x-session-id``                      session affinity key
====================================  ==========================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from inferplane.config.schema import (
    ClassRule,
    DataSourceSpec,
    FleetConfig,
    TenantSpec,
    WorkloadClass,
)
from inferplane.errors import InvalidRequestError
from inferplane.placement.hashing import prompt_block_hashes
from inferplane.placement.isolation import cache_salt, cache_scope, session_key
from inferplane.placement.profile import RequestProfile
from inferplane.tokenization import (
    block_hashes,
    encode,
    engine_block_hashes,
    load_tokenizer,
    salt_root,
)
from inferplane.types import ApiKind

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PRECISIONS = frozenset({"fp32", "bf16", "fp16", "fp8", "int8", "int4"})


@dataclass(frozen=True, slots=True)
class Prompt:
    """What classify extracted from the body."""

    text: str
    tokens: int
    max_output_tokens: int | None
    ids: list[int] | None = None
    count: int = 1  # prompts in the request (completions and embeddings accept a list)
    template: bool = False  # a chat prompt: the engine renders it through a chat template


def estimate_tokens(text: str, mode: str) -> int:
    """``words``: one whitespace-separated word is one token (the emulator's rule);
    ``chars``: about four characters a token (a common estimate for BPE tokenizers)."""
    if mode == "words":
        return len(text.split())
    return (len(text) + 3) // 4


def extract_prompt(
    api: ApiKind, body: Mapping[str, Any], mode: str, *, counted: bool = False
) -> Prompt:
    """Prompt text and size of a chat, completions or embeddings body (types already checked).
    ``counted``: the model's tokenizer will count the prompt (`Classifier._tokenize`), so a
    single text's estimate, which it replaces, is not computed (left 0)."""
    max_out: Any = body.get("max_completion_tokens", body.get("max_tokens"))
    if api == "chat":
        parts: list[str] = []
        for m in body["messages"]:
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                parts.extend(str(p.get("text", "")) for p in content if isinstance(p, dict))
        text = "\n".join(parts)
        return Prompt(text, 0 if counted else estimate_tokens(text, mode), max_out, template=True)
    key = "prompt" if api == "completions" else "input"
    value = body[key]
    if isinstance(value, str):
        return Prompt(value, 0 if counted else estimate_tokens(value, mode), max_out)
    if value and all(isinstance(v, int) for v in value):  # token ids
        return Prompt(" ".join(map(str, value)), len(value), max_out, list(value))
    if value and all(isinstance(v, list) for v in value):  # batches of token ids
        return Prompt(
            " ".join(map(str, value[0])),
            sum(len(v) for v in value),
            max_out,
            list(value[0]),
            len(value),
        )
    texts = [str(v) for v in value]
    return Prompt(
        texts[0] if texts else "",
        sum(estimate_tokens(t, mode) for t in texts),
        max_out,
        None,
        max(1, len(texts)),
    )


def _positive_ms(headers: Mapping[str, str], name: str) -> float | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        v = float(raw)
    except ValueError:
        v = -1.0
    if not v > 0 or v == float("inf"):
        raise InvalidRequestError(
            f"header {name} must be a positive number of milliseconds, got {raw!r}", param=name
        )
    return v / 1000.0


def _csv(headers: Mapping[str, str], name: str) -> list[str] | None:
    raw = headers.get(name)
    if raw is None:
        return None
    items = [x.strip() for x in raw.split(",") if x.strip()]
    if not items:
        raise InvalidRequestError(f"header {name} is empty", param=name)
    return items


class Classifier:
    """Builds profiles for one config (classes and rules indexed once)."""

    def __init__(self, config: FleetConfig) -> None:
        self.config = config
        self.classes: dict[str, WorkloadClass] = {c.name: c for c in config.classes}
        self.rules: list[ClassRule] = list(config.class_rules)
        self.regions = {r.name for r in config.regions}
        self.data_sources: dict[str, DataSourceSpec] = {d.name: d for d in config.data_sources}
        self.mode = config.gateway.token_estimate
        self.block_chars = config.gateway.prefix_block_chars
        self.largest_context: dict[str, int] = {}
        for sub in config.substrates:
            for ep in sub.endpoints:
                for m in ep.models:
                    ctx = self.largest_context.get(m.name, 0)
                    self.largest_context[m.name] = max(ctx, m.max_context)
        # A served model's tokenizer: exact prompt token counts, and engine block hashes of
        # text completion prompts that match a real engine's KV events.
        self.tokenizers: dict[str, Tokenizer] = {}
        for sub in config.substrates:
            for ep in sub.endpoints:
                for m in ep.models:
                    if m.tokenizer is not None and m.name not in self.tokenizers:
                        self.tokenizers[m.name] = load_tokenizer(m.tokenizer)
        # The largest context of the GPU pools (every kind but giant-context and provider-api)
        # per model: a prompt beyond it is long-context whatever the rules say.
        self.pool_context: dict[str, int] = {}
        for sub in config.substrates:
            if sub.kind in ("giant-context", "provider-api"):
                continue
            for ep in sub.endpoints:
                for m in ep.models:
                    self.pool_context[m.name] = max(self.pool_context.get(m.name, 0), m.max_context)
        self.engine_block_size = config.gateway.engine_block_size or next(
            (
                e.emulation.block_size
                for s in config.substrates
                for e in s.endpoints
                if e.kv_events is not None
            ),
            None,
        )

    def workload_class(
        self,
        api: ApiKind,
        tenant: TenantSpec,
        headers: Mapping[str, str],
        prompt_tokens: int,
        model: str | None = None,
        min_tokens: int | None = None,
    ) -> WorkloadClass:
        """The header's class; else ``long-context`` (when defined) for a request of
        ``min_tokens`` (prompt + explicit max_tokens) beyond every GPU pool's context for its
        model; else the first matching rule; else the tenant's default."""
        name = headers.get("x-inferplane-class")
        if name is not None:
            cls = self.classes.get(name)
            if cls is None:
                raise InvalidRequestError(
                    f"header x-inferplane-class: unknown class {name!r}; "
                    f"known: {', '.join(sorted(self.classes))}",
                    param="x-inferplane-class",
                )
            return cls
        if api != "embeddings" and model is not None and "long-context" in self.classes:
            ctx = self.pool_context.get(model)
            need = prompt_tokens if min_tokens is None else min_tokens
            if ctx is not None and need > ctx:
                return self.classes["long-context"]
        agent = "x-inferplane-agent-step" in headers
        for rule in self.rules:
            if rule.api is not None and rule.api != api:
                continue
            if rule.min_prompt_tokens is not None and prompt_tokens < rule.min_prompt_tokens:
                continue
            if rule.agent_step is not None and rule.agent_step != agent:
                continue
            return self.classes[rule.workload_class]
        if api == "embeddings" and "embeddings" in self.classes:
            return self.classes["embeddings"]
        return self.classes[tenant.default_class]

    def classify(
        self,
        *,
        request_id: str,
        api: ApiKind,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        tenant: TenantSpec,
    ) -> tuple[RequestProfile, Prompt]:
        """The request's profile. Raises `InvalidRequestError` for a bad header."""
        model = str(body["model"])
        tok = self.tokenizers.get(model) if self.tokenizers else None
        prompt = extract_prompt(api, body, self.mode, counted=tok is not None)
        if tok is not None:
            prompt = self._tokenize(tok, prompt)
        explicit = prompt.max_output_tokens
        cls = self.workload_class(
            api,
            tenant,
            headers,
            prompt.tokens,
            model,
            prompt.tokens + (int(explicit) if isinstance(explicit, int) else 0),
        )
        ttft = _positive_ms(headers, "x-inferplane-slo-ttft-ms")
        itl = _positive_ms(headers, "x-inferplane-slo-itl-ms")

        allowed = (
            frozenset(tenant.allowed_jurisdictions)
            if tenant.allowed_jurisdictions is not None
            else None
        )
        asked = _csv(headers, "x-inferplane-jurisdictions")
        if asked is not None:
            if allowed is not None:
                outside = [j for j in asked if j not in allowed]
                if outside:
                    raise InvalidRequestError(
                        f"header x-inferplane-jurisdictions: tenant {tenant.name!r} may not use "
                        f"{', '.join(outside)} (allowed: {', '.join(sorted(allowed))})",
                        param="x-inferplane-jurisdictions",
                    )
            allowed = frozenset(asked)

        precisions = _csv(headers, "x-inferplane-precision")
        if precisions is not None:
            bad = [p for p in precisions if p not in PRECISIONS]
            if bad:
                raise InvalidRequestError(
                    f"header x-inferplane-precision: unknown precision {', '.join(bad)}; "
                    f"known: {', '.join(sorted(PRECISIONS))}",
                    param="x-inferplane-precision",
                )

        client_region = headers.get("x-inferplane-client-region", tenant.region)
        data_region = headers.get("x-inferplane-data-region")
        for hname, region in (
            ("x-inferplane-client-region", client_region),
            ("x-inferplane-data-region", data_region),
        ):
            if region is not None and self.regions and region not in self.regions:
                raise InvalidRequestError(
                    f"header {hname}: unknown region {region!r}; "
                    f"known: {', '.join(sorted(self.regions))}",
                    param=hname,
                )
        source = self._data_source(headers, cls)
        if source is not None:
            if data_region is not None and data_region != source.region:
                raise InvalidRequestError(
                    f"header x-inferplane-data-region: {data_region!r}, but data source "
                    f"{source.name!r} lives in {source.region!r}; send one of them",
                    param="x-inferplane-data-region",
                )
            data_region = source.region
            if source.residency:
                if allowed is not None and source.jurisdiction not in allowed:
                    raise InvalidRequestError(
                        f"data source {source.name!r} keeps its data in jurisdiction "
                        f"{source.jurisdiction!r}, which this request may not use (allowed: "
                        f"{', '.join(sorted(allowed))})",
                        param="x-inferplane-data-source",
                    )
                allowed = frozenset({source.jurisdiction})
        step = headers.get("x-inferplane-agent-step")
        if step is not None and not (step.isascii() and step.isdigit()):
            raise InvalidRequestError(
                f"header x-inferplane-agent-step must be a non-negative integer, got {step!r}",
                param="x-inferplane-agent-step",
            )

        salt = cache_salt(cache_scope(tenant.name, tenant.cache_group), body.get("cache_salt"))
        sid = headers.get("x-session-id")
        max_out = prompt.max_output_tokens
        if api == "embeddings":
            max_out = 0
        elif max_out is None:
            # a default never makes a request impossible: cap it at what the largest context
            # leaves after the prompt (an engine's own default does the same)
            room = self.largest_context.get(model, 0) - prompt.tokens
            max_out = min(cls.default_max_tokens, room) if room > 0 else cls.default_max_tokens
        profile = RequestProfile(
            request_id=request_id,
            tenant=tenant.name,
            model=model,
            api=api,
            workload_class=cls.name,
            priority=cls.priority,
            prompt_tokens=prompt.tokens,
            max_output_tokens=int(max_out),
            sequences=prompt.count * _n(body),
            block_hashes=prompt_block_hashes(model, prompt.text, self.block_chars, salt=salt),
            engine_block_hashes=self._engine_hashes(
                prompt, tok is not None, None if api == "embeddings" else salt
            ),
            cache_salt=salt,
            session_id=sid,
            session_key=session_key(salt, sid) if sid is not None else None,
            ttft_slo_s=ttft if ttft is not None else _ms(cls.ttft_slo_ms),
            itl_slo_s=itl if itl is not None else _ms(cls.itl_slo_ms),
            allowed_jurisdictions=allowed,
            precisions=frozenset(precisions) if precisions else None,
            allowed_kinds=frozenset(cls.allowed_kinds) if cls.allowed_kinds else None,
            preferred_kinds=frozenset(cls.preferred_kinds) if cls.preferred_kinds else None,
            allow_burst=cls.allow_burst,
            energy_aware=cls.energy_aware,
            client_region=client_region,
            data_region=data_region,
            data_source=source.name if source is not None else None,
            stream=bool(body.get("stream", False)),
        )
        return profile, prompt

    def _data_source(
        self, headers: Mapping[str, str], cls: WorkloadClass
    ) -> DataSourceSpec | None:
        """The data store the request uses: the header's, else its class's."""
        name = headers.get("x-inferplane-data-source")
        if name is None:
            return self.data_sources.get(cls.data_source) if cls.data_source else None
        source = self.data_sources.get(name)
        if source is None:
            known = ", ".join(sorted(self.data_sources)) or "none configured"
            raise InvalidRequestError(
                f"header x-inferplane-data-source: unknown data source {name!r}; known: {known}",
                param="x-inferplane-data-source",
            )
        return source

    @staticmethod
    def _tokenize(tok: Tokenizer, prompt: Prompt) -> Prompt:
        """Exact token count (and, for one text prompt, its ids) with the model's tokenizer.
        Token-id prompts are already exact; a batch counts every prompt and keeps the ids of
        the first, whose blocks placement matches."""
        if prompt.ids is not None:
            return prompt
        ids = encode(tok, prompt.text)
        count, template = prompt.count, prompt.template
        # a chat prompt: the chat template adds tokens we do not render, so count, no ids; a
        # batch of texts: hash the first, the count stays the estimate of them all
        tokens = prompt.tokens if count > 1 and not template else len(ids)
        # one constructor call, not `dataclasses.replace` (several µs a call): a field added
        # to `Prompt` must be carried here too
        return Prompt(text=prompt.text, tokens=tokens, max_output_tokens=prompt.max_output_tokens,
                      ids=None if template else ids, count=count, template=template)

    def _engine_hashes(
        self, prompt: Prompt, tokenized: bool, salt: str | None
    ) -> tuple[int, ...]:
        """Engine token-block hashes: of the prompt's token ids (a token-id prompt, or a text
        prompt through the model's tokenizer), else of its words (the emulator's one word a
        token). A chat prompt with a real tokenizer has none: the engine's chat template decides
        its tokens, so placement uses the learned prefix index for it. The chain starts at the
        cache salt's root (`tokenization.salt_root`), as the engine's own chain does and as the
        KV-event mirror keys a scope's blocks (`fleet.salts`): a request matches only blocks of
        its own cache scope. Embeddings carry no salt (the engines take none there)."""
        bs = self.engine_block_size
        if not bs:
            return ()
        root = salt_root(salt)
        if prompt.ids is not None:
            return tuple(block_hashes(prompt.ids, bs, root))
        if tokenized:
            return ()
        return tuple(engine_block_hashes(prompt.text, bs, root))


def _n(body: Mapping[str, Any]) -> int:
    """Choices per prompt (``n``; validated as a positive integer)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1


def _ms(v: float | None) -> float | None:
    return None if v is None else v / 1000.0
