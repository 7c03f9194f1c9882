"""Cross-tenant prompt inference through the prefix cache (issue 12 item 6), end to end: the
emulated engine and the gateway as real processes. Tenant B probes the prompts tenant A just sent
and reads ``cached_tokens``: with per-tenant cache salts it learns nothing (0 of 20); a tenant's
own repeats still hit; tenants that opt into one ``cache_group`` share."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from inferplane.dispatch.upstream import with_cache_salt
from inferplane.placement.classify import Classifier
from inferplane.placement.isolation import cache_salt, cache_scope
from inferplane.tokenization import VOCABULARY, block_hashes, salt_root, token_ids
from tests.builders import model, pool_fleet, tenant, to_yaml
from tests.support.procs import Proc, free_port

KEYS = {"a": "sk-iso-a", "b": "sk-iso-b", "c": "sk-iso-c", "d": "sk-iso-d"}


def fleet(gw_port: int, up_port: int, **gateway: Any) -> str:
    """The fleet file: ``gateway`` adds to its gateway block."""
    return to_yaml(pool_fleet(
        up_port, substrate={"cost": {"hourly_usd": 3.0}},
        models=[model("llama-3.1-8b", profile=None, max_context=4096)],
        endpoint_fields={"name": "e0", "emulation": {"num_gpu_blocks": 4096}},
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "token_estimate": "words",
                 **gateway},
        tenants=[tenant("a", KEYS["a"]), tenant("b", KEYS["b"]),
                 tenant("c", KEYS["c"], cache_group="team"),
                 tenant("d", KEYS["d"], cache_group="team")]))


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("iso")
    gw_port, up_port = free_port(), free_port()
    path = tmp / "fleet.yaml"
    path.write_text(fleet(gw_port, up_port))
    procs: list[Proc] = []
    try:
        emu = Proc(["-m", "inferplane.cli", "emulate", "--config", str(path),
                    "--time-scale", "50"], tmp / "emu.log")
        procs.append(emu)
        emu.wait_http(f"http://127.0.0.1:{up_port}/health")
        gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(path)], tmp / "gw.log")
        procs.append(gw)
        gw.wait_http(f"http://127.0.0.1:{gw_port}/ready")
        yield f"http://127.0.0.1:{gw_port}"
    finally:
        for p in procs:
            p.stop()


def cached(base: str, tenant: str, prompt: str, **extra: object) -> int:
    r = httpx.post(f"{base}/v1/completions", headers={"Authorization": f"Bearer {KEYS[tenant]}"},
                   json={"model": "llama-3.1-8b", "prompt": prompt, "max_tokens": 1, **extra},
                   timeout=30)
    assert r.status_code == 200, r.text
    return int(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


def secret(rng: random.Random) -> str:
    return " ".join(rng.choice(VOCABULARY) for _ in range(80))  # five 16-token blocks


def test_tenant_b_cannot_infer_tenant_a_prompts(base: str) -> None:
    rng = random.Random(12)
    right = 0
    for _ in range(20):
        prompt = secret(rng)
        assert cached(base, "a", prompt) == 0
        # B guesses "A just sent this" when its own probe is served from cache
        right += cached(base, "b", prompt) > 0
    assert right == 0


def test_own_repeats_still_hit_and_client_salt_narrows(base: str) -> None:
    prompt = secret(random.Random(7))
    assert cached(base, "a", prompt) == 0
    assert cached(base, "a", prompt) >= 64
    assert cached(base, "a", prompt, cache_salt="user-1") == 0  # a narrower scope of its own
    assert cached(base, "a", prompt, cache_salt="user-1") >= 64
    assert cached(base, "b", prompt, cache_salt="user-1") == 0  # never another tenant's scope


def test_a_cache_group_is_an_explicit_opt_in_to_share(base: str) -> None:
    prompt = secret(random.Random(8))
    assert cached(base, "c", prompt) == 0
    assert cached(base, "d", prompt) >= 64
    assert cached(base, "a", prompt) == 0


def test_salt_is_spliced_into_the_forwarded_body() -> None:
    body = orjson.dumps({"model": "m", "prompt": "x"})
    out = orjson.loads(with_cache_salt(body, "s1"))
    assert out == {"model": "m", "prompt": "x", "cache_salt": "s1"}
    client = orjson.dumps({"model": "m", "cache_salt": "mine"})
    assert orjson.loads(with_cache_salt(client, "s2"))["cache_salt"] == "s2"
    assert cache_salt(cache_scope("a", None)) != cache_salt(cache_scope("b", None))
    assert cache_salt(cache_scope("c", "team")) == cache_salt(cache_scope("d", "team"))
    assert cache_salt(cache_scope("a", None), "u") != cache_salt(cache_scope("a", None))


def test_gateway_prefix_hashes_are_per_scope() -> None:
    from inferplane.config.loader import parse_config
    cfg = parse_config(fleet(1, 2, engine_block_size=16))
    clf = Classifier(cfg)
    tenants = {t.name: t for t in cfg.tenants}
    body = {"model": "llama-3.1-8b", "prompt": "word " * 600}

    def profile(t: str):  # type: ignore[no-untyped-def]
        return clf.classify(request_id="r", api="completions", body=body, headers={},
                            tenant=tenants[t])[0]

    a, b, c, d = (profile(t) for t in "abcd")
    assert a.block_hashes and a.engine_block_hashes
    assert not set(a.block_hashes) & set(b.block_hashes)  # the learned index is per scope
    assert c.block_hashes == d.block_hashes
    assert a.cache_salt != b.cache_salt and c.cache_salt == d.cache_salt
    # the KV-event mirror's keys start at the scope's salt root, as the engine's chain does
    assert not set(a.engine_block_hashes) & set(b.engine_block_hashes)
    assert c.engine_block_hashes == d.engine_block_hashes
    ids = token_ids(body["prompt"])
    assert a.engine_block_hashes == tuple(block_hashes(ids, 16, salt_root(a.cache_salt)))
    # one session id in two scopes is two sessions; one group shares its sessions
    sess = {"x-session-id": "s-1"}
    pa, pb, pc, pd = (clf.classify(request_id="r", api="completions", body=body, headers=sess,
                                   tenant=tenants[t])[0] for t in "abcd")
    assert pa.session_key != pb.session_key and pc.session_key == pd.session_key
    assert pa.session_key is not None and "s-1" not in pa.session_key
