"""A served model's ``tokenizer``: exact prompt token counts and engine block hashes of text
completion prompts (what the KV-event index matches on a real engine), resolved relative to the
fleet file, and checked at load time with the file and field named."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from inferplane.config.loader import load_config
from inferplane.errors import ConfigError
from inferplane.placement.classify import Classifier, Prompt, estimate_tokens
from inferplane.placement.profile import RequestProfile
from inferplane.tokenization import (
    block_hashes,
    engine_block_hashes,
    hash_block_tokens,
    load_tokenizer,
    salt_root,
)
from inferplane.twin.traces.tokens import VOCABULARY
from inferplane.types import ApiKind
from tests.builders import endpoint, model, pool_fleet, to_yaml

SPECIALS = ["<unk>", "<s>", "</s>"]


def write_tokenizer(folder: Path, bos: bool) -> Path:
    """A word-level tokenizer: ids 0-2 specials, then the emulator's words; with ``bos`` its
    post-processor puts ``<s>`` first, as Llama tokenizers do."""
    vocab = {w: i for i, w in enumerate([*SPECIALS, *VOCABULARY])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 1)]
        )
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return folder


def fleet_file(tmp_path: Path, tokenizers: list[str | None], name: str = "fleet.yaml") -> Path:
    p = tmp_path / name
    p.write_text(to_yaml(pool_fleet(
        gateway={"token_estimate": "chars"},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoints=[
            endpoint(f"e{i}", 9000 + i, kv_events=f"tcp://127.0.0.1:{9100 + i}",
                     models=[model("llama-3.1-8b", None, 32768,
                                   **({} if t is None else {"tokenizer": t}))],
                     emulation={"block_size": 4})
            for i, t in enumerate(tokenizers)
        ],
        key="sk-t",
    )))
    return p


def classify(
    c: Classifier, body: dict[str, object], api: ApiKind = "completions"
) -> RequestProfile:
    tenant = c.config.tenants[0]
    profile, _ = c.classify(request_id="r", api=api, body=body, headers={}, tenant=tenant)
    return profile


TEXT = " ".join(VOCABULARY[:10])  # 10 words: 11 tokens with <s>


def test_text_completion_is_tokenized_and_hashed_like_the_engine(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "conf" / "tok", bos=True)
    cfg = load_config(fleet_file(tmp_path / "conf", ["tok", "tok"]))
    tok = cfg.substrates[0].endpoints[0].models[0].tokenizer
    assert tok == str(tmp_path / "conf" / "tok")  # relative to the fleet file, not the cwd
    c = Classifier(cfg)
    p = classify(c, {"model": "llama-3.1-8b", "prompt": TEXT})
    ids = [1, *(3 + i for i in range(10))]
    assert p.prompt_tokens == 11
    assert p.engine_block_hashes == tuple(block_hashes(ids, 4, salt_root(p.cache_salt)))
    # the word rule would have hashed other tokens (and counted by characters)
    assert p.engine_block_hashes != tuple(engine_block_hashes(TEXT, 4, salt_root(p.cache_salt)))


def test_token_id_prompts_are_hashed_as_given(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "tok", bos=False)
    c = Classifier(load_config(fleet_file(tmp_path, ["tok"])))
    p = classify(c, {"model": "llama-3.1-8b", "prompt": [5, 6, 7, 8, 9, 10, 11, 12, 13]})
    assert p.prompt_tokens == 9
    root = salt_root(p.cache_salt)  # the tenant's cache scope seeds the chain
    assert p.engine_block_hashes == tuple(block_hashes([5, 6, 7, 8, 9, 10, 11, 12], 4, root))
    batch = classify(c, {"model": "llama-3.1-8b", "prompt": [[5, 6, 7, 8], [1, 2]]})
    assert batch.prompt_tokens == 6
    assert batch.engine_block_hashes == tuple(block_hashes([5, 6, 7, 8], 4, root))


def test_chat_is_counted_but_not_hashed(tmp_path: Path) -> None:
    """The engine renders chat through its template: the gateway cannot know those tokens, so it
    leaves the engine hashes empty (placement uses the learned index) but counts exactly."""
    write_tokenizer(tmp_path / "tok", bos=True)
    c = Classifier(load_config(fleet_file(tmp_path, ["tok"])))
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": TEXT}]}
    p = classify(c, body, api="chat")
    assert p.prompt_tokens == 11 and p.engine_block_hashes == ()


def test_a_batch_of_texts_keeps_its_estimate_under_a_tokenizer(tmp_path: Path) -> None:
    """Only a single text's estimate is left out where the tokenizer counts (it replaces it); a
    batch of texts is still counted by the estimate (and its first text hashed)."""
    write_tokenizer(tmp_path / "tok", bos=True)
    c = Classifier(load_config(fleet_file(tmp_path, ["tok"])))
    batch = classify(c, {"model": "llama-3.1-8b", "prompt": [TEXT, "a b c"]})
    mode = c.config.gateway.token_estimate
    assert batch.prompt_tokens == estimate_tokens(TEXT, mode) + estimate_tokens("a b c", mode)
    ids = [1, *(3 + i for i in range(10))]
    assert batch.engine_block_hashes == tuple(block_hashes(ids, 4, salt_root(batch.cache_salt)))


@pytest.mark.parametrize(
    ("count", "template", "tokens", "ids"),
    [
        (1, False, 11, [1, *range(3, 13)]),  # one text: counted and hashed
        (1, True, 11, None),  # chat: counted, not hashed (the engine's template decides)
        (3, False, 99, [1, *range(3, 13)]),  # a batch: the first hashed, the estimate kept
        (3, True, 11, None),  # templated with a count (no caller makes one): the template wins
    ],
    ids=["text", "chat", "batch", "batch-templated"],
)
def test_tokenize_sets_count_and_ids_and_carries_every_other_field(
    tmp_path: Path, count: int, template: bool, tokens: int, ids: list[int] | None
) -> None:
    """`Classifier._tokenize` builds its `Prompt` directly (for speed, not with
    `dataclasses.replace`): the result is the prompt with only ``tokens`` and ``ids`` changed."""
    tok = load_tokenizer(str(write_tokenizer(tmp_path / "tok", bos=True)))
    prompt = Prompt(TEXT, 99, 7, None, count, template)
    assert Classifier._tokenize(tok, prompt) == dataclasses.replace(prompt, tokens=tokens, ids=ids)
    given = dataclasses.replace(prompt, ids=[5, 6])  # token ids: exact already, kept as given
    assert Classifier._tokenize(tok, given) is given


def test_without_a_tokenizer_the_word_rule_stays(tmp_path: Path) -> None:
    c = Classifier(load_config(fleet_file(tmp_path, [None])))
    p = classify(c, {"model": "llama-3.1-8b", "prompt": TEXT})
    assert p.engine_block_hashes == tuple(engine_block_hashes(TEXT, 4, salt_root(p.cache_salt)))


def test_a_missing_tokenizer_names_the_file_and_field(tmp_path: Path) -> None:
    path = fleet_file(tmp_path, ["nowhere"])
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert msg.startswith(f"{path}: substrates[0].endpoints[0].models[0].tokenizer: ")
    assert "no tokenizer file at" in msg and str(tmp_path / "nowhere") in msg


def test_a_broken_tokenizer_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError) as info:
        load_config(fleet_file(tmp_path, ["bad.json"]))
    assert "models[0].tokenizer: cannot load tokenizer" in str(info.value)


def test_one_model_name_has_one_tokenizer(tmp_path: Path) -> None:
    write_tokenizer(tmp_path / "a", bos=False)
    write_tokenizer(tmp_path / "b", bos=True)
    with pytest.raises(ConfigError) as info:
        load_config(fleet_file(tmp_path, ["a", "b"]))
    assert "endpoints[1].models[0].tokenizer: model 'llama-3.1-8b' already has tokenizer" in str(
        info.value
    )


def _bpe(tmp_path: Path) -> Tokenizer:
    """A byte-level BPE tokenizer trained here on a few lines, with Llama's ``<s>`` first."""
    from tokenizers import decoders, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    lines = [f"{TEXT} héllo wörld {i} 日本語 tabs\tand\nnewlines" for i in range(50)]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    return tok


class _Spy:
    """A tokenizer that records which of its encoders ran."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.calls = tok, []  # type: list[str]

    def encode(self, text: str, add_special_tokens: bool = True) -> object:
        self.calls.append("encode")
        return self.tok.encode(text, add_special_tokens=add_special_tokens)

    def encode_batch_fast(self, texts: list[str], add_special_tokens: bool = True) -> object:
        self.calls.append("encode_batch_fast")
        return self.tok.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


@pytest.mark.parametrize(
    ("setting", "path"),
    [("false", "encode_batch_fast"), ("0", "encode_batch_fast"), ("", "encode_batch_fast"),
     ("true", "encode"), (None, "encode")],
)
def test_encode_gives_the_tokenizers_ids_without_a_pool_thread_where_the_pool_is_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, setting: str | None, path: str
) -> None:
    """With the library's rayon pool off (``TOKENIZERS_PARALLELISM`` off, as `inferplane.cli`
    sets it) `encode` takes the offset-free batch path and starts no thread; with it on or
    unset, plain ``encode``. Either way the ids are the tokenizer's own, special tokens
    included."""
    from inferplane.tokenization import encode

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # training must not start the pool
    tok = _bpe(tmp_path)
    if setting is None:
        monkeypatch.delenv("TOKENIZERS_PARALLELISM")
    else:
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", setting)
    spy = _Spy(tok)
    texts = ["", " ", TEXT, "héllo wörld 12 日本語\tx\n", "unseen ünïcode " * 300]
    threads = set(os.listdir("/proc/self/task"))
    for text in texts:
        want = tok.encode(text, add_special_tokens=True).ids
        assert encode(spy, text) == want  # type: ignore[arg-type]
    assert encode(spy, TEXT)[0] == tok.token_to_id("<s>")  # type: ignore[arg-type]
    assert set(spy.calls) == {path}
    if path == "encode_batch_fast":
        assert not set(os.listdir("/proc/self/task")) - threads, "a pool thread started"


def test_the_cli_turns_the_tokenizers_pool_off_unless_the_environment_chose() -> None:
    """`inferplane` sets ``TOKENIZERS_PARALLELISM=false`` before any thread starts, and keeps
    a value the environment gave (checked in a child process: the variable is process-wide)."""
    import subprocess
    import sys

    code = ("import os, inferplane.cli as c; "
            "c.app = lambda: print(os.environ['TOKENIZERS_PARALLELISM']); c.main()")
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "false"
    out = subprocess.run([sys.executable, "-c", code],
                         env={**env, "TOKENIZERS_PARALLELISM": "true"},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "true"


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 32, 100])
@pytest.mark.parametrize("parent", [None, 0, 12345, (1 << 64) - 1])
@pytest.mark.parametrize("size", [1, 7, 16])
def test_block_hashes_chain_hash_block_tokens(n: int, parent: int | None, size: int) -> None:
    ids = [(i * 7919) % 32000 for i in range(n)]
    want: list[int] = []
    h = parent
    for start in range(0, n - size + 1, size):
        h = hash_block_tokens(h, ids[start : start + size])
        want.append(h)
    assert block_hashes(ids, size, parent) == want
    assert block_hashes(tuple(ids), size, parent) == want
