"""Tests for the trace loaders (sim/traces.py) and deterministic prompt text (sim/tokens.py)."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest

from inferplane.twin.traces.loader import (
    TraceError,
    TraceRequest,
    load_azure,
    load_mooncake,
    load_trace,
    slice_trace,
)
from inferplane.twin.traces.tokens import (
    VOCABULARY,
    block_text,
    count_tokens,
    prompt_from_blocks,
    scaled_length,
    token_ids,
    unique_prompt,
    word_id,
)

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
MOONCAKE = TRACES / "mooncake_conversation.jsonl"
AZURE = TRACES / "azure_conv_2023.csv"
needs_traces = pytest.mark.skipif(not MOONCAKE.exists(), reason="shared traces not present")


# --- real traces --------------------------------------------------------------------------------


def _monotone(reqs: list[TraceRequest]) -> bool:
    return all(a.arrival_s <= b.arrival_s for a, b in itertools.pairwise(reqs))


@needs_traces
def test_load_mooncake_real_trace() -> None:
    reqs = load_trace(MOONCAKE)
    assert len(reqs) == 12_031
    assert reqs[0] == TraceRequest(0.0, 6758, 500, tuple(range(14)))
    assert _monotone(reqs)
    assert 3500 < reqs[-1].arrival_s < 3600  # about one hour
    assert all(len(r.hash_ids) == -(-r.input_tokens // 512) for r in reqs)


@needs_traces
def test_load_azure_real_trace() -> None:
    reqs = load_trace(AZURE)
    assert len(reqs) == 19_366
    assert reqs[0] == TraceRequest(0.0, 374, 44, ())
    # 18:15:50.9951690 - 18:15:46.6805900, exact to the 100 ns of the file
    assert reqs[1].arrival_s == pytest.approx(4.314579, abs=1e-9)
    assert _monotone(reqs)
    assert 3400 < reqs[-1].arrival_s < 3600


@needs_traces
def test_real_mooncake_prompts_share_prefixes() -> None:
    reqs = load_mooncake(MOONCAKE)
    a, b = reqs[0], reqs[1]  # both start with block 0, then diverge
    assert a.hash_ids[0] == b.hash_ids[0] and a.hash_ids[1] != b.hash_ids[1]
    ta = prompt_from_blocks(a.hash_ids, a.input_tokens)
    tb = prompt_from_blocks(b.hash_ids, b.input_tokens)
    assert count_tokens(ta) == a.input_tokens and count_tokens(tb) == b.input_tokens
    shared = block_text(0) + " "
    assert ta.startswith(shared) and tb.startswith(shared)
    assert ta.split()[512] != tb.split()[512]


# --- tokens -------------------------------------------------------------------------------------


def test_block_text_is_deterministic_across_processes() -> None:
    code = (
        "from inferplane.twin.traces.tokens import block_text, token_ids;"
        "print(block_text(17, 64)); print(token_ids('hello the world'))"
    )
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed},
        ).stdout
        for seed in ("1", "2")
    }
    assert outs == {block_text(17, 64) + "\n" + str(token_ids("hello the world")) + "\n"}


def test_block_text_shape() -> None:
    text = block_text(3)
    words = text.split()
    assert len(words) == 512 and count_tokens(text) == 512
    assert set(words) <= set(VOCABULARY)
    assert block_text(3, 32) == " ".join(words[:32])  # prefix-stable
    assert block_text(3) != block_text(4)
    assert block_text(3, 0) == ""
    assert block_text(5, 10, seed_words=["x", "y"]).split() != []
    assert set(block_text(5, 10, seed_words=["x", "y"]).split()) <= {"x", "y"}
    with pytest.raises(ValueError):
        block_text(1, -1)


@pytest.mark.parametrize("block_tokens", [512, 32])
def test_shared_ids_share_text_prefix_and_lengths_are_exact(block_tokens: int) -> None:
    a = prompt_from_blocks([0, 1, 2, 3], 1800, block_tokens)
    b = prompt_from_blocks([0, 1, 9], 1100, block_tokens)
    n_a, n_b = scaled_length(1800, block_tokens), scaled_length(1100, block_tokens)
    assert count_tokens(a) == n_a and count_tokens(b) == n_b
    two_blocks = 2 * block_tokens
    assert a.split()[:two_blocks] == b.split()[:two_blocks]
    assert a.split()[two_blocks] != b.split()[two_blocks]
    assert token_ids(a)[:two_blocks] == token_ids(b)[:two_blocks]


def test_scaled_lengths_keep_the_block_count() -> None:
    assert scaled_length(6758, 32) == 423  # ceil(6758 * 32 / 512)
    for n in (1, 511, 512, 513, 6758, 12_000, 126_195):
        assert -(-scaled_length(n, 32) // 32) == -(-n // 512)
    assert scaled_length(6758) == 6758


def test_prompt_edge_cases() -> None:
    assert prompt_from_blocks([], 0) == ""
    assert prompt_from_blocks([7], 1) == block_text(7, 1)
    # more tokens than the ids cover: padded deterministically, still exact
    padded = prompt_from_blocks([7], 700)
    assert count_tokens(padded) == 700 and padded.startswith(block_text(7))
    assert padded == prompt_from_blocks([7], 700)
    # extra ids are ignored
    assert prompt_from_blocks([1, 2, 3], 512) == block_text(1)
    with pytest.raises(ValueError):
        prompt_from_blocks([1], -1)


def test_unique_prompts_share_nothing() -> None:
    a, b = unique_prompt(0, 600), unique_prompt(1, 600)
    assert count_tokens(a) == 600 and count_tokens(unique_prompt(0, 600, 32)) == 38
    assert a.split()[:8] != b.split()[:8]
    assert not a.startswith(prompt_from_blocks([0], 512)[:40])
    assert a == unique_prompt(0, 600)


def test_token_ids_are_stable_ints() -> None:
    ids = token_ids("the of zebra the")
    assert ids[0] == ids[3] == word_id("the")
    assert ids[2] == word_id("zebra")
    assert all(0 <= i < 2**31 for i in ids)
    assert token_ids("") == []
    assert len({word_id(w) for w in VOCABULARY}) == len(VOCABULARY)


def test_building_a_long_prompt_is_fast() -> None:
    ids = list(range(1000, 1024))
    prompt_from_blocks(ids, 12_000)  # warm the per-block cache
    start = time.perf_counter()
    for _ in range(50):
        prompt_from_blocks(ids, 12_000)
    assert (time.perf_counter() - start) / 50 < 0.002


# --- malformed files ----------------------------------------------------------------------------

GOOD = '{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [0]}'


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ('{"timestamp": 5, "input_length": 10', "invalid JSON"),
        ('{"timestamp": 5, "output_length": 2, "hash_ids": []}', "missing field 'input_length'"),
        ('{"timestamp": 5, "input_length": -3, "output_length": 2, "hash_ids": []}', "negative"),
        ('{"timestamp": 5, "input_length": 1.5, "output_length": 2, "hash_ids": []}', "integer"),
        ('{"timestamp": 5, "input_length": "9", "output_length": 2, "hash_ids": []}', "integer"),
        ('{"timestamp": "x", "input_length": 9, "output_length": 2, "hash_ids": []}', "timestamp"),
        ('{"timestamp": 5, "input_length": 9, "output_length": 2, "hash_ids": ["a"]}', "hash_ids"),
        ('{"timestamp": 5, "input_length": 9, "output_length": 2, "hash_ids": 3}', "hash_ids"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_mooncake_errors_name_file_and_line(tmp_path: Path, line: str, problem: str) -> None:
    path = _write(tmp_path, "t.jsonl", f"{GOOD}\n\n{GOOD}\n{line}\n{GOOD}\n")
    with pytest.raises(TraceError, match=problem) as info:
        load_mooncake(path)
    assert str(info.value).startswith(f"{path}:4: ")
    assert (info.value.path, info.value.line) == (str(path), 4)


def test_mooncake_truncated_last_line(tmp_path: Path) -> None:
    path = _write(tmp_path, "t.jsonl", f"{GOOD}\n{GOOD[:30]}")
    with pytest.raises(TraceError, match=r":2: truncated last line"):
        load_mooncake(path)
    # a complete last line without a newline is fine
    assert len(load_mooncake(_write(tmp_path, "u.jsonl", f"{GOOD}\n{GOOD}"))) == 2


def test_mooncake_small_file_crlf_and_unsorted(tmp_path: Path) -> None:
    rows = [
        '{"timestamp": 2500, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}',
        '{"timestamp": 1000, "input_length": 10, "output_length": 2, "hash_ids": [0]}',
    ]
    reqs = load_mooncake(_write(tmp_path, "t.jsonl", "\r\n".join(rows) + "\r\n"))
    assert reqs == [TraceRequest(1.0, 10, 2, (0,)), TraceRequest(2.5, 600, 3, (0, 1))]


def test_empty_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no requests"):
        load_mooncake(_write(tmp_path, "e.jsonl", "\n\n"))
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(TraceError, match="empty"):
        load_azure(_write(tmp_path, "e.csv", ""))


AZ_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def test_azure_small_file(tmp_path: Path) -> None:
    text = (
        AZ_HEADER + "2023-11-16 23:59:59.9999999,10,1\n"
        "2023-11-17 00:00:00.5,20,2\r\n"
        "2023-11-17T00:00:01,30,3\n\n"
    )
    reqs = load_azure(_write(tmp_path, "a.csv", text))
    assert [r.input_tokens for r in reqs] == [10, 20, 30]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(0.5000001, abs=1e-12)  # across midnight
    assert reqs[2].arrival_s == pytest.approx(1.0000001, abs=1e-12)


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ("2023-11-16 18:15:46.68,-1,3", "negative ContextTokens"),
        ("2023-11-16 18:15:46.68,1.5,3", "ContextTokens must be a non-negative integer"),
        ("2023-11-16 18:15:46.68,4,x", "GeneratedTokens must be a non-negative integer"),
        ("2023-11-16 18:15:46.68,4", "expected 3 columns"),
        ("16/11/2023 18:15,4,5", "bad TIMESTAMP"),
        ("2023-13-16 18:15:46.68,4,5", "bad TIMESTAMP"),
        ("2023-11-16 25:15:46.68,4,5", "bad TIMESTAMP"),
    ],
)
def test_azure_errors_name_file_and_line(tmp_path: Path, row: str, problem: str) -> None:
    path = _write(
        tmp_path, "a.csv", AZ_HEADER + "2023-11-16 18:15:46.6805900,374,44\n" + row + "\n"
    )
    with pytest.raises(TraceError, match=problem) as info:
        load_azure(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_azure_missing_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.68,4\n")
    with pytest.raises(TraceError, match=r":1: missing column\(s\) GeneratedTokens"):
        load_azure(path)


def test_load_trace_format_selection(tmp_path: Path) -> None:
    path = _write(tmp_path, "t.txt", GOOD + "\n")
    with pytest.raises(TraceError, match="cannot guess the trace format"):
        load_trace(path)
    with pytest.raises(TraceError, match="unknown trace format 'parquet'"):
        load_trace(path, "parquet")
    assert load_trace(path, "mooncake") == [TraceRequest(0.0, 10, 2, (0,))]


# --- slicing ------------------------------------------------------------------------------------


def _reqs(*arrivals: float) -> list[TraceRequest]:
    return [TraceRequest(a, 100 + i, 10, ()) for i, a in enumerate(arrivals)]


def test_slice_window_rebase_and_limit() -> None:
    reqs = _reqs(0.0, 1.0, 2.0, 3.5, 5.0, 9.0)
    window = slice_trace(reqs, 1.0, 4.0)
    assert [r.arrival_s for r in window] == [0.0, 1.0, 2.5]  # [1, 5) re-based to 0
    assert [r.input_tokens for r in window] == [101, 102, 103]
    assert [r.arrival_s for r in slice_trace(reqs, 1.5)] == [0.5, 2.0, 3.5, 7.5]
    assert len(slice_trace(reqs, 0.0, None, limit=2)) == 2
    assert slice_trace(reqs, 100.0, 10.0) == []


def test_slice_rate_scale_compresses_inter_arrivals() -> None:
    reqs = _reqs(10.0, 12.0, 16.0)
    fast = slice_trace(reqs, 10.0, 100.0, rate_scale=2.0)
    assert [r.arrival_s for r in fast] == [0.0, 1.0, 3.0]
    slow = slice_trace(reqs, 10.0, 100.0, rate_scale=0.5)
    assert [r.arrival_s for r in slow] == [0.0, 4.0, 12.0]
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError):
            slice_trace(reqs, 0.0, 1.0, rate_scale=bad)


@needs_traces
def test_slice_real_trace() -> None:
    reqs = load_mooncake(MOONCAKE)
    ten_minutes = slice_trace(reqs, 600.0, 600.0, rate_scale=2.0)
    assert ten_minutes and ten_minutes[0].arrival_s >= 0.0
    assert ten_minutes[-1].arrival_s < 300.0
    assert _monotone(ten_minutes)
