"""core: the transport-neutral request pipeline every front end drives (see `core.plane`)."""

from inferplane.core.plane import API_PATHS, Attempt, Core, Placement, hash_key

__all__ = ["API_PATHS", "Attempt", "Core", "Placement", "hash_key"]
