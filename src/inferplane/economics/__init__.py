"""Placement economics: utilisation against bands, unit cost by substrate kind and class, the
repatriation break-even and reassessment triggers, from the decision ledger (`analysis`), as
text and Prometheus gauges (`render`), and what-if deltas between two simulations (`whatif`).
See docs/economics.md."""

from inferplane.economics.analysis import EconomicsReport, analyse

__all__ = ["EconomicsReport", "analyse"]
