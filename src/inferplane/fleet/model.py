"""The static fleet: substrates and endpoints as placement sees them, built once from config."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

from inferplane.config.schema import (
    CostModel,
    EndpointSpec,
    FleetConfig,
    RegionSpec,
    ServedModel,
    SubstrateSpec,
)

if TYPE_CHECKING:
    from inferplane.physics import Roofline


@dataclass(frozen=True, eq=False)
class Endpoint:
    """One serving instance of a substrate, with everything placement needs precomputed."""

    spec: EndpointSpec
    substrate: SubstrateSpec
    index: int
    name: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.spec.name)

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def max_concurrency(self) -> int:
        return self.spec.max_concurrency

    @property
    def region(self) -> str:
        return self.substrate.region

    @property
    def jurisdiction(self) -> str:
        return self.substrate.jurisdiction

    @property
    def cost(self) -> CostModel:
        return self.substrate.cost

    @cached_property
    def models(self) -> dict[str, ServedModel]:
        return {m.name: m for m in self.spec.models}

    def roofline(self, model: str) -> Roofline | None:
        """The physics model of this endpoint running `model`, or None if it does not serve it."""
        return self._rooflines.get(model)

    @cached_property
    def _rooflines(self) -> dict[str, Roofline]:
        from inferplane.physics import Roofline, get_hardware, get_model

        hw = get_hardware(self.substrate.hardware.lower())
        out: dict[str, Roofline] = {}
        for m in self.spec.models:
            try:
                out[m.name] = Roofline(
                    hw, get_model(m.physics_profile.lower()), tp=self.spec.tp, precision=m.precision
                )
            except ValueError:
                continue  # does not fit: the latency predictor treats it as unknown
        return out


@dataclass(frozen=True)
class Fleet:
    """All endpoints and the region topology. Immutable; shared by every snapshot."""

    endpoints: tuple[Endpoint, ...]
    regions: dict[str, RegionSpec] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: FleetConfig) -> Fleet:
        eps: list[Endpoint] = []
        for sub in config.substrates:
            for spec in sub.endpoints:
                eps.append(Endpoint(spec=spec, substrate=sub, index=len(eps)))
        return cls(endpoints=tuple(eps), regions={r.name: r for r in config.regions})

    @cached_property
    def by_name(self) -> dict[str, Endpoint]:
        return {e.name: e for e in self.endpoints}

    @cached_property
    def models(self) -> dict[str, list[ServedModel]]:
        """Every model name served anywhere, with its served variants."""
        out: dict[str, list[ServedModel]] = {}
        for e in self.endpoints:
            for m in e.spec.models:
                out.setdefault(m.name, []).append(m)
        return out

    def rtt_s(self, src: str | None, dst: str) -> float:
        """Network RTT between two regions (0 within a region or when unknown)."""
        if src is None or src == dst:
            return 0.0
        r = self.regions.get(src)
        if r is not None and dst in r.rtt_ms:
            return r.rtt_ms[dst] / 1000.0
        r2 = self.regions.get(dst)
        if r2 is not None and src in r2.rtt_ms:
            return r2.rtt_ms[src] / 1000.0
        return 0.0
