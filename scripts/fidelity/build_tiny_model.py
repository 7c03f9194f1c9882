"""Build the fidelity tier's model: a tiny random Llama and a word-level tokenizer, no downloads.

    .fidelity-venv/bin/python scripts/fidelity/build_tiny_model.py OUT_DIR [--force]

The model follows the ``tiny-llama`` physics profile (``inferplane.physics.models``): 2 layers,
hidden 64, 4 heads, 2 KV heads, MLP 128, vocabulary 1000, 2048 positions, untied embeddings,
with seeded random weights, saved as float32 safetensors — except that each head is 32 wide,
not 16 (vLLM's CPU attention has no kernel for 16), so it has 226,624 parameters, not 202,048.

The tokenizer is word-level (``tokenizers``' ``WordLevel`` model with a whitespace split): ids
0-3 are ``<unk> <s> </s> <pad>``, then the emulator's 256 words
(``inferplane.tokenization.VOCABULARY``) in order, then fillers ``w260`` … ``w999`` so that
every id the model can sample decodes. One whitespace-separated word is one token, as in the
emulator; nothing is added around a prompt (no BOS), so a text prompt's token count is the
same on both engines. The chat template joins the message contents with newlines — the
emulator's chat rule — so chat prompts also count the same.

The script does not import inferplane (the fidelity venv need not have it): it reads the
vocabulary out of ``src/inferplane/tokenization.py`` next to it, and checks it has 256 words.
Writes config.json, generation_config.json, model.safetensors, tokenizer.json and
tokenizer_config.json, and a ``.built`` stamp; an existing complete build is kept unless
``--force``.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VOCAB_SIZE = 1000
HEAD_DIM = 32
"""vLLM's CPU attention supports head sizes 32, 64, 80, … (``CPUAttentionBackend.
get_supported_head_sizes``), not the profile's 16: the heads are widened to 32 (q/o projections
64 <-> 128). Timing is not compared, so the profile keeps its own numbers."""
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "{% if not loop.last %}{{ '\\n' }}{% endif %}"  # not a bare newline: trim_blocks eats it
    "{% endfor %}"
)
FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)
STAMP = ".built"
STAMP_TEXT = "tiny-llama v2\n"


def vocabulary() -> list[str]:
    """The emulator's 256 words, read from ``inferplane/tokenization.py`` without importing it."""
    src = (ROOT / "src" / "inferplane" / "tokenization.py").read_text()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "_WORDS" for t in node.targets
        ):
            words = ast.literal_eval(node.value).split()
            if len(words) != 256 or len(set(words)) != 256:
                raise SystemExit(
                    f"expected 256 distinct words in tokenization.py, got {len(words)}"
                )
            return list(words)
    raise SystemExit("no _WORDS in src/inferplane/tokenization.py")


def build_tokenizer(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = vocabulary()
    tokens = SPECIALS + words
    tokens += [f"w{i}" for i in range(len(tokens), VOCAB_SIZE)]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Decoding joins word tokens with single spaces (the WordPiece decoder with an empty
    # prefix does exactly that and keeps streaming detokenization well-defined).
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 2048,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
            indent=2,
        )
        + "\n"
    )


def build_model(out: Path, seed: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HEAD_DIM,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    # No sampling defaults: vLLM would otherwise take them from here.
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3}, indent=2) + "\n"
    )
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", type=Path, help="directory to write the model into")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="rebuild even if a build is there")
    args = ap.parse_args(argv)
    out: Path = args.out
    stamp = out / STAMP
    if (
        not args.force
        and stamp.is_file()
        and stamp.read_text() == STAMP_TEXT
        and all((out / f).is_file() for f in FILES)
    ):
        print(f"tiny model already built in {out}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    n = build_model(out, args.seed)
    build_tokenizer(out)
    stamp.write_text(STAMP_TEXT)
    print(f"built tiny-llama ({n:,} parameters, vocabulary {VOCAB_SIZE}) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
