"""`Scored`: a candidate after scoring, in a module of its own so that the compiled build
compiles it (a native class: the compiled scoring pass builds one per candidate and the
compiled picker reads them without Python attribute lookups; docs/placement.md, "The compiled
build"). `inferplane.placement.framework` exports it."""

from __future__ import annotations

from inferplane.fleet.state import EndpointView


class Scored:
    """A candidate after scoring: its weighted total and each scorer's clamped value. (Not
    frozen: one per candidate per decision, read only by the picker and the evidence.) Equal
    when view, total and scores are, as the dataclass it replaces."""

    __slots__ = ("scores", "total", "view")

    def __init__(self, view: EndpointView, total: float, scores: dict[str, float]) -> None:
        self.view = view
        self.total = total
        self.scores = scores

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Scored):
            return NotImplemented
        return (self.view, self.total, self.scores) == (other.view, other.total, other.scores)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Scored(view={self.view!r}, total={self.total!r}, scores={self.scores!r})"
