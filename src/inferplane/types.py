"""Shared type aliases."""

from __future__ import annotations

from typing import Any, Literal, TypeAlias

JSONObject: TypeAlias = dict[str, Any]
EndpointName: TypeAlias = str
SubstrateName: TypeAlias = str
TenantName: TypeAlias = str
BlockHash: TypeAlias = int

SubstrateKind: TypeAlias = Literal[
    "gpu", "low-latency", "giant-context", "provider-api", "sovereign-onprem", "cpu"
]
EngineType: TypeAlias = Literal["vllm", "sglang", "openai-compatible"]
CapacityClass: TypeAlias = Literal["reserved", "burst"]
ApiKind: TypeAlias = Literal["chat", "completions", "embeddings"]
