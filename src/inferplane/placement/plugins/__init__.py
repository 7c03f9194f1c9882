"""Built-in placement plugins. Importing this package registers every type."""

from inferplane.placement.plugins import (
    affinity,
    baselines,
    basic,
    constraints,
    economics,
    latency,
    rate_limit,
    slo_first,
)

__all__ = ["affinity", "baselines", "basic", "constraints", "economics", "latency", "rate_limit",
           "slo_first"]
