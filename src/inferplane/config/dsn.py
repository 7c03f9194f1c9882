"""The PostgreSQL DSN a fleet file names for a part of the plane (the ledger, the batch store):
``<section>.postgres_dsn``, or the variable ``<section>.postgres_dsn_env`` names. Read by the
part that connects and by `inferplane check --connect`, so neither imports the other's
internals."""

from __future__ import annotations

import os
from typing import Literal

from inferplane.config.schema import FleetConfig
from inferplane.errors import ConfigError

Section = Literal["ledger", "batch"]


def postgres_dsn(config: FleetConfig, section: Section, file: str) -> str | None:
    """The DSN of ``section`` (None: no PostgreSQL); a `ConfigError` naming
    ``<section>.postgres_dsn_env`` when the variable it names is unset or empty."""
    spec = config.ledger if section == "ledger" else config.batch
    if spec.postgres_dsn_env:
        dsn = os.environ.get(spec.postgres_dsn_env)
        if not dsn:
            raise ConfigError(
                file, [(f"{section}.postgres_dsn_env", f"${spec.postgres_dsn_env} is not set")]
            )
        return dsn
    return spec.postgres_dsn
