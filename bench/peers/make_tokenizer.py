"""Build a tiny local word-level tokenizer for sglang-router (run with the peer's Python).

sglang-router loads a tokenizer for the model its workers report; the emulated workers serve
``llama-3.1-8b``, which is not on this machine and must not be downloaded. This script writes a
Hugging Face ``tokenizer.json`` + ``tokenizer_config.json`` into ``OUT_DIR``: a ``WordLevel``
model over the emulator's vocabulary (one whitespace-separated word = one token, like the
emulated engine) with an ``<unk>`` token and whitespace pre-tokenization.

    python make_tokenizer.py OUT_DIR WORD [WORD ...]

It imports only ``tokenizers`` (installed in the sglang-router venv), not inferplane; the harness
passes the vocabulary on the command line.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def build(out_dir: Path, words: list[str]) -> None:
    from tokenizers import (  # type: ignore[import-not-found,unused-ignore]
        Tokenizer,
        models,
        pre_tokenizers,
    )

    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate([*specials, *dict.fromkeys(words)])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 131072,
        "chat_template": (
            "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}\n{% endif %}"
            "{% endfor %}"
        ),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    build(Path(sys.argv[1]), sys.argv[2:])
