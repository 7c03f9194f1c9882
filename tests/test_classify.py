"""classify: request → `RequestProfile` (class, SLOs, jurisdictions, precision, regions, agent
step, token estimates), and the prompt block hashes it carries (placement/hashing.py)."""

from __future__ import annotations

from typing import Any

import pytest

from inferplane.config.schema import TenantSpec
from inferplane.errors import InvalidRequestError
from inferplane.placement.classify import Classifier, estimate_tokens, extract_prompt
from inferplane.placement.hashing import prompt_block_hashes
from inferplane.placement.profile import RequestProfile
from inferplane.types import ApiKind
from tests.builders import SMALL_FLEET_YAML, config

RULES = """\
classes:
  - name: gold
    ttft_slo_ms: 250
    itl_slo_ms: 20
    priority: critical
    allowed_kinds: [gpu]
    allow_burst: false
    energy_aware: true
    default_max_tokens: 77
class_rules:
  - {class: agent-step, agent_step: true}
  - {class: long-context, min_prompt_tokens: 1000, api: chat}
  - {class: batch, api: completions}
"""

CLASSIFIER = Classifier(config(SMALL_FLEET_YAML + RULES))
TENANTS = {t.name: t for t in CLASSIFIER.config.tenants}
ACME = TENANTS["acme"]  # allowed: eu, us; region eu-west; default class interactive
GLOBEX = TENANTS["globex"]  # any jurisdiction; no region; default class batch


def chat(text: str = "hello there", **extra: Any) -> dict[str, Any]:
    return {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": text}], **extra}


def classify(
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    *,
    api: ApiKind = "chat",
    tenant: TenantSpec = ACME,
    classifier: Classifier = CLASSIFIER,
) -> RequestProfile:
    profile, _ = classifier.classify(
        request_id="r-1",
        api=api,
        body=body if body is not None else chat(),
        headers=headers or {},
        tenant=tenant,
    )
    return profile


def bad_header(headers: dict[str, str], *, tenant: TenantSpec = ACME) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as info:
        classify(headers=headers, tenant=tenant)
    err = info.value
    assert err.status == 400 and err.error_type == "invalid_request_error"
    return err


LONG = "x" * 4000  # 1000 tokens at ~4 characters a token

# -- workload class -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("api", "body", "headers", "tenant", "expected"),
    [
        ("chat", chat(), {}, ACME, "interactive"),  # tenant default
        ("chat", chat(), {}, GLOBEX, "batch"),  # another tenant's default
        ("chat", chat(), {"x-inferplane-class": "gold"}, ACME, "gold"),  # header
        # the header wins over every rule
        ("chat", chat(LONG), {"x-inferplane-class": "gold"}, ACME, "gold"),
        ("chat", chat(), {"x-inferplane-agent-step": "2"}, ACME, "agent-step"),
        # first matching rule wins: agent step before prompt size
        ("chat", chat(LONG), {"x-inferplane-agent-step": "0"}, ACME, "agent-step"),
        ("chat", chat(LONG), {}, ACME, "long-context"),  # min_prompt_tokens reached
        ("chat", chat(LONG[:-4]), {}, ACME, "interactive"),  # 999 tokens: not reached
        # the size rule is for chat only; completions match the next rule
        ("completions", {"model": "m", "prompt": LONG}, {}, ACME, "batch"),
        ("embeddings", {"model": "m", "input": "hi"}, {}, ACME, "embeddings"),
        ("embeddings", {"model": "m", "input": LONG}, {}, GLOBEX, "embeddings"),
    ],
    ids=[
        "tenant-default",
        "other-tenant-default",
        "header",
        "header-over-rules",
        "agent-step-rule",
        "rule-order",
        "min-prompt-tokens",
        "below-min",
        "api-rule",
        "embeddings",
        "embeddings-long",
    ],
)
def test_workload_class(
    api: ApiKind,
    body: dict[str, Any],
    headers: dict[str, str],
    tenant: TenantSpec,
    expected: str,
) -> None:
    assert classify(body, headers, api=api, tenant=tenant).workload_class == expected


def test_unknown_class_header_is_a_400_naming_it() -> None:
    err = bad_header({"x-inferplane-class": "platinum"})
    assert err.param == "x-inferplane-class"
    assert "x-inferplane-class: unknown class 'platinum'" in err.message
    assert "gold" in err.message and "interactive" in err.message


def test_class_settings_reach_the_profile() -> None:
    p = classify(headers={"x-inferplane-class": "gold"})
    assert p.priority == "critical"
    assert (p.ttft_slo_s, p.itl_slo_s) == (0.25, 0.02)
    assert p.allowed_kinds == frozenset({"gpu"})
    assert p.allow_burst is False and p.energy_aware is True
    assert p.max_output_tokens == 77  # the class default when the body sets none
    q = classify()
    assert q.allowed_kinds is None and q.allow_burst and not q.energy_aware
    assert (q.ttft_slo_s, q.itl_slo_s) == (1.0, 0.1)  # built-in interactive: 1000 / 100 ms
    assert classify(tenant=GLOBEX).ttft_slo_s is None  # built-in batch: no SLO


def test_rules_without_an_embeddings_class_fall_back_to_the_tenant_default() -> None:
    c = config(SMALL_FLEET_YAML)
    classes = [k for k in c.classes if k.name != "embeddings"]
    classifier = Classifier(c.model_copy(update={"classes": classes}))
    p = classify({"model": "m", "input": "x"}, api="embeddings", classifier=classifier)
    assert p.workload_class == "interactive"


# -- SLO headers ----------------------------------------------------------------------------------


def test_slo_headers_override_the_class() -> None:
    p = classify(headers={"x-inferplane-slo-ttft-ms": "250", "x-inferplane-slo-itl-ms": "12.5"})
    assert p.ttft_slo_s == 0.25 and p.itl_slo_s == 0.0125
    p = classify(headers={"x-inferplane-slo-itl-ms": "40"}, tenant=GLOBEX)
    assert p.ttft_slo_s is None and p.itl_slo_s == 0.04


@pytest.mark.parametrize("header", ["x-inferplane-slo-ttft-ms", "x-inferplane-slo-itl-ms"])
@pytest.mark.parametrize("value", ["0", "-5", "abc", "", "inf", "nan", "1e400"])
def test_bad_slo_header_is_a_400_naming_it(header: str, value: str) -> None:
    err = bad_header({header: value})
    assert err.param == header
    assert err.message == (
        f"header {header} must be a positive number of milliseconds, got {value!r}"
    )


# -- jurisdictions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "header", "expected"),
    [
        (ACME, None, {"eu", "us"}),  # the tenant's set
        (ACME, "eu", {"eu"}),  # narrowed
        (ACME, " eu , us ,", {"eu", "us"}),  # spaces and empty items ignored
        (GLOBEX, None, None),  # no restriction
        (GLOBEX, "ch,sg", {"ch", "sg"}),  # an unrestricted tenant may ask for any
    ],
    ids=["tenant", "narrowed", "same", "unrestricted", "unrestricted-narrowed"],
)
def test_jurisdictions_narrowed(
    tenant: TenantSpec, header: str | None, expected: set[str] | None
) -> None:
    headers = {} if header is None else {"x-inferplane-jurisdictions": header}
    got = classify(headers=headers, tenant=tenant).allowed_jurisdictions
    assert got == (None if expected is None else frozenset(expected))


@pytest.mark.parametrize("header", ["cn", "eu,cn", "EU"])
def test_jurisdictions_never_widened(header: str) -> None:
    err = bad_header({"x-inferplane-jurisdictions": header})
    assert err.param == "x-inferplane-jurisdictions"
    assert err.message.startswith("header x-inferplane-jurisdictions: tenant 'acme' may not use")
    assert "(allowed: eu, us)" in err.message


@pytest.mark.parametrize("value", ["", " , ,"])
def test_empty_list_header(value: str) -> None:
    for header in ("x-inferplane-jurisdictions", "x-inferplane-precision"):
        err = bad_header({header: value})
        assert (err.param, err.message) == (header, f"header {header} is empty")


# -- precision ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, None), ("fp8", {"fp8"}), ("bf16, fp8,int4", {"bf16", "fp8", "int4"})],
)
def test_precision(header: str | None, expected: set[str] | None) -> None:
    headers = {} if header is None else {"x-inferplane-precision": header}
    got = classify(headers=headers).precisions
    assert got == (None if expected is None else frozenset(expected))


def test_unknown_precision_is_a_400() -> None:
    err = bad_header({"x-inferplane-precision": "fp8,fp5,q4"})
    assert err.param == "x-inferplane-precision"
    assert "unknown precision fp5, q4; known: bf16, fp16, fp32, fp8, int4, int8" in err.message


# -- regions --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tenant", "headers", "client", "data"),
    [
        (ACME, {}, "eu-west", None),  # tenant's default region
        (GLOBEX, {}, None, None),
        (ACME, {"x-inferplane-client-region": "us-east"}, "us-east", None),
        (GLOBEX, {"x-inferplane-data-region": "eu-west"}, None, "eu-west"),
    ],
    ids=["tenant-default", "none", "header", "data-region"],
)
def test_regions(
    tenant: TenantSpec, headers: dict[str, str], client: str | None, data: str | None
) -> None:
    p = classify(headers=headers, tenant=tenant)
    assert (p.client_region, p.data_region) == (client, data)


@pytest.mark.parametrize("header", ["x-inferplane-client-region", "x-inferplane-data-region"])
def test_unknown_region_is_a_400(header: str) -> None:
    err = bad_header({header: "mars"})
    assert err.param == header
    assert err.message == f"header {header}: unknown region 'mars'; known: eu-west, us-east"


# -- agent step, session, stream ------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0", "7", "120"])
def test_agent_step_accepted(value: str) -> None:
    assert classify(headers={"x-inferplane-agent-step": value}).workload_class == "agent-step"


@pytest.mark.parametrize("value", ["-1", "one", "1.5", "", "\u0663"])  # last: Arabic-Indic 3
def test_bad_agent_step_is_a_400(value: str) -> None:
    err = bad_header({"x-inferplane-agent-step": value})
    assert err.param == "x-inferplane-agent-step"
    assert f"must be a non-negative integer, got {value!r}" in err.message


def test_identity_session_and_stream() -> None:
    p = classify(chat(stream=True), {"x-session-id": "s-42"}, tenant=GLOBEX)
    assert (p.request_id, p.tenant, p.model, p.api) == ("r-1", "globex", "llama-3.1-8b", "chat")
    assert p.session_id == "s-42" and p.stream is True
    assert classify().session_id is None and classify().stream is False


# -- token estimates and max output ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode", "tokens"),
    [
        ("", "chars", 0),
        ("abc", "chars", 1),
        ("abcd", "chars", 1),
        ("abcde", "chars", 2),
        ("x" * 400, "chars", 100),
        ("", "words", 0),
        ("one two  three\nfour", "words", 4),
        ("x" * 400, "words", 1),
    ],
)
def test_estimate_tokens(text: str, mode: str, tokens: int) -> None:
    assert estimate_tokens(text, mode) == tokens


@pytest.mark.parametrize(
    ("api", "body", "text", "tokens"),
    [
        (
            "chat",
            {"messages": [{"role": "system", "content": "a b"}, {"role": "user", "content": "c"}]},
            "a b\nc",
            3,
        ),
        (
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "x y"},
                                                        {"type": "image_url"}]}]},
            "x y\n",
            2,
        ),
        ("chat", {"messages": [{"role": "assistant", "content": None}]}, "", 0),
        ("completions", {"prompt": "p q r"}, "p q r", 3),
        ("completions", {"prompt": [5, 6, 7, 8]}, "5 6 7 8", 4),  # token ids
        ("completions", {"prompt": [[1, 2], [3, 4, 5]]}, "1 2", 5),  # batches of ids
        ("completions", {"prompt": ["a b", "c"]}, "a b", 3),  # several prompts
        ("embeddings", {"input": "e f"}, "e f", 2),
        ("embeddings", {"input": []}, "", 0),
    ],
    ids=["chat", "parts", "null-content", "completions", "ids", "id-batches", "strings",
         "embeddings", "empty"],
)  # fmt: skip
def test_extract_prompt_in_words(
    api: ApiKind, body: dict[str, Any], text: str, tokens: int
) -> None:
    prompt = extract_prompt(api, body, "words")
    assert (prompt.text, prompt.tokens) == (text, tokens)


def test_token_estimate_mode_from_config() -> None:
    words = Classifier(config(SMALL_FLEET_YAML.replace("seed: 7", "token_estimate: words")))
    text = "alpha beta gamma delta"  # 4 words, 22 characters
    assert classify(chat(text), classifier=words).prompt_tokens == 4
    assert classify(chat(text)).prompt_tokens == 6  # chars mode: ceil(22 / 4)


@pytest.mark.parametrize(
    ("api", "body", "expected"),
    [
        ("chat", chat(max_tokens=50), 50),
        ("chat", chat(max_completion_tokens=60, max_tokens=50), 60),
        ("chat", chat(), 1024),  # built-in interactive default_max_tokens
        ("completions", {"model": "m", "prompt": "p"}, 4096),  # batch class default
        ("embeddings", {"model": "m", "input": "e", "max_tokens": 9}, 0),
    ],
)
def test_max_output_tokens(api: ApiKind, body: dict[str, Any], expected: int) -> None:
    assert classify(body, api=api).max_output_tokens == expected


# -- block hashes ---------------------------------------------------------------------------------


def test_block_hashes_shared_for_a_shared_prefix() -> None:
    system = "S" * 1024  # four whole 256-character blocks
    a = prompt_block_hashes("m", system + "question one " * 30)
    b = prompt_block_hashes("m", system + "another question " * 30)
    assert len(a) >= 5 and len(b) >= 5
    assert a[:4] == b[:4]
    assert a[4] != b[4]  # diverged, and every later hash differs because it chains
    assert not set(a[4:]) & set(b[4:])


def test_block_hashes_seeded_by_model_and_chained() -> None:
    text = "A" * 1024
    assert prompt_block_hashes("m1", text) != prompt_block_hashes("m2", text)
    h = prompt_block_hashes("m1", text)
    assert len(set(h)) == 4  # identical blocks hash differently at each position
    assert prompt_block_hashes("m1", text) == h  # deterministic
    assert all(0 <= x < 2**64 for x in h)


@pytest.mark.parametrize(
    ("chars", "block", "max_blocks", "count"),
    [(255, 256, 512, 0), (256, 256, 512, 1), (511, 256, 512, 1), (1000, 100, 512, 10),
     (1000, 100, 3, 3), (0, 16, 512, 0)],
)  # fmt: skip
def test_only_whole_blocks_hashed(chars: int, block: int, max_blocks: int, count: int) -> None:
    assert len(prompt_block_hashes("m", "z" * chars, block, max_blocks)) == count


def test_block_boundaries_are_bytes_of_utf8() -> None:
    # "é" is two bytes: 128 of them fill one 256-byte block.
    assert len(prompt_block_hashes("m", "é" * 128)) == 1
    assert prompt_block_hashes("m", "\ud800" * 100, 100)  # lone surrogates do not raise


def test_block_hashes_stable_across_processes() -> None:
    # A pinned value: the hash must not depend on PYTHONHASHSEED, the process or the replica.
    assert prompt_block_hashes("llama-3.1-8b", "a" * 16, 16) == (8971754350237062532,)


def test_classify_hashes_the_prompt_with_the_configured_block_size() -> None:
    text = "shared system prompt. " * 40
    p = classify(chat(text + "tail one"))
    q = classify(chat(text + "tail two, different"))
    assert p.cache_salt  # a tenant's prefixes are salted with its cache scope's salt
    assert p.block_hashes == prompt_block_hashes(
        "llama-3.1-8b", text + "tail one", 256, salt=p.cache_salt
    )
    assert p.block_hashes[:3] == q.block_hashes[:3] and len(p.block_hashes) == 3
    small = Classifier(config(SMALL_FLEET_YAML.replace("seed: 7", "prefix_block_chars: 64")))
    assert len(classify(chat(text), classifier=small).block_hashes) == len(text) // 64
    other_model = classify({**chat(text + "tail one"), "model": "qwen3-32b"})
    assert not set(other_model.block_hashes) & set(p.block_hashes)
