"""The static fleet: substrates and endpoints as placement sees them, built once from config."""

from __future__ import annotations

import logging
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
    from inferplane.physics import HardwareProfile, Roofline

log = logging.getLogger("inferplane.fleet")

KIND_APIS: dict[str, tuple[str, ...]] = {
    "generate": ("chat", "completions"),
    "embed": ("embeddings",),
}
"""The APIs a served model's ``kind`` answers."""


@dataclass(frozen=True, eq=False)
class Endpoint:
    """One serving instance of a substrate, with everything placement needs precomputed."""

    spec: EndpointSpec
    substrate: SubstrateSpec
    index: int
    hardware: HardwareProfile | None = None  # resolved by `Fleet.from_config` (calibrated too)
    name: str = field(init=False)
    # the substrate's name and capacity class as plain attributes: placement reads them per
    # candidate, and a pydantic model's attributes cost several times a plain one's
    substrate_name: str = field(init=False)
    capacity_class: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", self.spec.name)
        object.__setattr__(self, "substrate_name", self.substrate.name)
        object.__setattr__(self, "capacity_class", self.substrate.capacity_class)

    @property
    def url(self) -> str:
        return self.spec.url

    def same_definition(self, other: Endpoint) -> bool:
        """Whether ``other`` (from a reloaded fleet file) defines this endpoint identically:
        the same endpoint entry under the same substrate settings (its siblings aside)."""
        if self.spec != other.spec or self.hardware != other.hardware:
            return False
        if self.substrate is other.substrate:
            return True
        skip = {"endpoints"}
        return self.substrate.model_dump(exclude=skip) == other.substrate.model_dump(exclude=skip)

    @property
    def dialect(self) -> str:
        """The API the upstream speaks (``openai`` or ``anthropic``)."""
        return self.spec.dialect

    @cached_property
    def health_check(self) -> str:
        """``health`` (GET /health), ``models`` (GET /v1/models) or ``passive`` (no probe)."""
        if self.spec.health_check is not None:
            return self.spec.health_check
        return "passive" if self.substrate.kind == "provider-api" else "health"

    @cached_property
    def scrape_metrics(self) -> bool:
        """Whether the engine's Prometheus ``/metrics`` is scraped."""
        if self.spec.scrape_metrics is not None:
            return self.spec.scrape_metrics
        return self.substrate.kind != "provider-api"

    @cached_property
    def joins_steps(self) -> bool:
        """Whether requests sent together join one engine step: a self-hosted engine (vLLM,
        SGLang, or an OpenAI-compatible server such as TGI, TensorRT-LLM, LMDeploy or llama.cpp,
        all of which batch continuously), not a provider API (`gateway.send_bursts_together`
        holds only requests for these)."""
        return self.substrate.kind != "provider-api"

    def api_url(self, path: str) -> str:
        """The upstream URL of an API path such as ``/v1/chat/completions``: the endpoint URL
        with the path appended, except that a base path ending in ``/v1`` (as hosted APIs'
        base URLs do: ``https://host/openai/v1``) is not followed by a second ``/v1``."""
        url = self._urls.get(path)
        if url is None:
            base = self.spec.url
            if self.spec.base_path.endswith("/v1") and path.startswith("/v1/"):
                path_part = path[3:]
            else:
                path_part = path
            url = self._urls[path] = base + path_part
        return url

    @cached_property
    def _urls(self) -> dict[str, str]:
        return {}

    def upstream_model(self, model: str) -> str:
        """The upstream's name for a served model (its ``upstream_name``, else the same)."""
        m = self.models.get(model)
        return model if m is None else m.upstream

    @cached_property
    def renames_models(self) -> bool:
        """Whether any served model has another name upstream (the body must be rewritten)."""
        return any(m.upstream != m.name for m in self.spec.models)

    def serves_api(self, api: str) -> bool:
        """Whether the endpoint's dialect carries this API (``chat``, ``completions``,
        ``embeddings``): the Anthropic Messages API carries chat only."""
        return self.spec.dialect == "openai" or api == "chat"

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

    def prefill_s_per_token(self, model: str) -> float | None:
        """Prefill seconds per uncached prompt token of `model` here (the roofline's cost of a
        2,048-token prefill ÷ 2,048, as the dispatch gate counts it), or None without a physics
        model. Computed once per model."""
        cache = self._prefill_s_per_token
        if model not in cache:
            r = self._rooflines.get(model)
            cache[model] = None if r is None else r.prefill_time_s(2048) / 2048
        return cache[model]

    @cached_property
    def _prefill_s_per_token(self) -> dict[str, float | None]:
        return {}

    @cached_property
    def _rooflines(self) -> dict[str, Roofline]:
        from inferplane.physics import Roofline, get_hardware, get_model

        hw = self.hardware or get_hardware(self.substrate.hardware.lower())
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
        from inferplane.physics import get_hardware
        from inferplane.physics.calibration import load_profile_file

        calibrated: dict[str, HardwareProfile] = {}
        probed: dict[str, tuple[str | None, str]] = {}  # name -> (probed model, file)
        for path in config.hardware_profiles:
            hw, model = load_profile_file(path)
            calibrated[hw.name] = hw
            probed[hw.name] = (model, path)
        eps: list[Endpoint] = []
        others: dict[tuple[str, str], list[str]] = {}  # (profile, model) -> endpoints
        for sub in config.substrates:
            hw = calibrated.get(sub.hardware) or get_hardware(sub.hardware.lower())
            model = probed.get(sub.hardware, (None, ""))[0]
            for spec in sub.endpoints:
                eps.append(Endpoint(spec=spec, substrate=sub, index=len(eps), hardware=hw))
                for m in spec.models:
                    if model is not None and m.physics_profile != model:
                        others.setdefault((sub.hardware, m.physics_profile), []).append(spec.name)
        for (name, served), where in others.items():
            model, path = probed[name]
            log.warning(
                "calibrated hardware profile %r (%s) was probed with model %r; endpoint(s) %s "
                "serve %r on it: its factors are fitted to the probed model's steps and say "
                "little about another's (predictions for %r may be far off; probe that model "
                "to calibrate for it)",
                name, path, model, ", ".join(where), served, served,
            )
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

    @cached_property
    def apis(self) -> dict[str, frozenset[str]]:
        """Every model name with the APIs (``chat``, ``completions``, ``embeddings``) through
        which some endpoint serves it: the model's ``kind`` (`KIND_APIS`: an ``embed`` model
        answers embeddings only, a ``generate`` model chat and completions) and the
        endpoint's dialect bound its APIs."""
        out: dict[str, set[str]] = {}
        for e in self.endpoints:
            for m in e.spec.models:
                apis = out.setdefault(m.name, set())
                for api in KIND_APIS[m.kind]:
                    if e.serves_api(api):
                        apis.add(api)
        return {k: frozenset(v) for k, v in out.items()}

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
