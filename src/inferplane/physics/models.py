"""Model profiles: the architecture numbers that set a model's FLOPs and bytes.

Figures come from each model's published ``config.json`` (Hugging Face) and model card.
``params`` counts every weight (embeddings and LM head included); ``active_params`` is what
one token multiplies through (equal to ``params`` for dense models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from inferplane.physics.errors import UnknownProfileError

Precision = Literal["bf16", "fp16", "fp8", "int8", "int4", "fp32"]

BYTES_PER_PARAM: Final[dict[str, float]] = {
    "fp32": 4.0,
    "bf16": 2.0,
    "fp16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}
PRECISIONS: Final = frozenset(BYTES_PER_PARAM)


@dataclass(frozen=True, slots=True)
class ModelProfile:
    """Architecture of one model. ``embedding`` marks encoder-only embedding models, which
    are prefilled but never decoded."""

    name: str
    params: float
    active_params: float
    layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    embedding: bool = False
    source: str = ""

    def __post_init__(self) -> None:
        if not 0 < self.active_params <= self.params:
            raise ValueError(f"model {self.name!r}: need 0 < active_params <= params")
        for field_name in ("layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim"):
            if getattr(self, field_name) <= 0:
                raise ValueError(f"model {self.name!r}: {field_name} must be > 0")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model {self.name!r}: num_heads must be a multiple of num_kv_heads")

    def kv_bytes_per_token(self, dtype_bytes: float = 2) -> float:
        """KV-cache bytes one token occupies: 2 (K and V) x layers x kv_heads x head_dim x
        dtype_bytes. Llama-3.1-8B in BF16: 2 x 32 x 8 x 128 x 2 = 131072."""
        return 2 * self.layers * self.num_kv_heads * self.head_dim * dtype_bytes

    def weight_bytes(self, precision: str = "bf16") -> float:
        """Bytes of all weights: params x bytes per parameter (fp32 4, bf16/fp16 2,
        fp8/int8 1, int4 0.5; quantisation scales are ignored, < 2 %)."""
        try:
            return self.params * BYTES_PER_PARAM[precision]
        except KeyError:
            raise ValueError(
                f"unknown precision {precision!r}; known: {', '.join(sorted(PRECISIONS))}"
            ) from None

    @property
    def attention_width(self) -> int:
        """Query width num_heads x head_dim (equals hidden_size for Llama, not for Qwen3)."""
        return self.num_heads * self.head_dim


_LLAMA_8B = ModelProfile(
    name="llama-3.1-8b",
    params=8.03e9,
    active_params=8.03e9,
    layers=32,
    hidden_size=4096,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=128_256,
    max_context=131_072,
    source="meta-llama/Llama-3.1-8B config.json",
)

_LLAMA_70B = ModelProfile(
    name="llama-3.1-70b",
    params=70.6e9,
    active_params=70.6e9,
    layers=80,
    hidden_size=8192,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=128_256,
    max_context=131_072,
    source="meta-llama/Llama-3.1-70B config.json",
)

_QWEN3_32B = ModelProfile(
    name="qwen3-32b",
    params=32.8e9,
    active_params=32.8e9,
    layers=64,
    hidden_size=5120,
    num_heads=64,
    num_kv_heads=8,
    head_dim=128,
    vocab_size=151_936,
    max_context=32_768,
    source="Qwen/Qwen3-32B config.json and model card (32k native, 131k with YaRN)",
)

# A tiny random Llama for CPU tests: 2 layers, hidden 64, 4 heads (head_dim 16), 2 KV heads,
# MLP width 128, untied embeddings. Params: embed 64,000 + head 64,000 + 2 x (attention
# 4,096+2,048+2,048+4,096 + MLP 3 x 64 x 128 + norms 128) + final norm 64 = 202,048.
_TINY_LLAMA = ModelProfile(
    name="tiny-llama",
    params=202_048,
    active_params=202_048,
    layers=2,
    hidden_size=64,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    vocab_size=1000,
    max_context=2048,
    source="synthetic test model",
)

_BGE_LARGE = ModelProfile(
    name="bge-large",
    params=335e6,
    active_params=335e6,
    layers=24,
    hidden_size=1024,
    num_heads=16,
    num_kv_heads=16,
    head_dim=64,
    vocab_size=30_522,
    max_context=512,
    embedding=True,
    source="BAAI/bge-large-en-v1.5 config.json (BERT-large encoder)",
)

MODELS: Final[dict[str, ModelProfile]] = {
    m.name: m for m in (_LLAMA_8B, _LLAMA_70B, _QWEN3_32B, _TINY_LLAMA, _BGE_LARGE)
}


def get_model(name: str) -> ModelProfile:
    """Return the profile registered as ``name.lower()``; raise ``UnknownProfileError``
    (a ``LookupError`` listing the known names) otherwise."""
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise UnknownProfileError("model", name, MODELS) from None
