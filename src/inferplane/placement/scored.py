"""`Scored`: a candidate after scoring, in a module of its own so that the compiled build
(`inferplane.compiled`) makes it a native class — the fused scoring pass builds one per
candidate per decision. `inferplane.placement.framework` exports it."""

from __future__ import annotations

from dataclasses import dataclass

from inferplane.fleet.state import EndpointView


@dataclass(slots=True)
class Scored:
    """A candidate after scoring: its weighted total and each scorer's clamped value. (Not
    frozen, like `FilterResult`: one per candidate per decision, read only by the picker.)"""

    view: EndpointView
    total: float
    scores: dict[str, float]
