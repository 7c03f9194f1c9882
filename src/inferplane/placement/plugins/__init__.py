"""Built-in placement plugins. Importing this package registers every type."""

from inferplane.placement.plugins import basic

__all__ = ["basic"]
