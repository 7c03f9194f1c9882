"""The ledger a fleet file configures: PostgreSQL, SQLite or memory, with its signer."""

from __future__ import annotations

import os
import re
from collections.abc import Callable

from inferplane.config.dsn import postgres_dsn
from inferplane.config.files import writable_file_problem
from inferplane.config.schema import NAME_PATTERN as SHARD_NAME
from inferplane.config.schema import FleetConfig
from inferplane.errors import ConfigError
from inferplane.ledger.chain import KeyError_, Signer, signer_from
from inferplane.ledger.memory import MemoryLedger
from inferplane.ledger.record import Ledger
from inferplane.ledger.sqlite import CONFIG_FIELD, SqliteLedger


def configured_signer(config: FleetConfig, file: str) -> Signer | None:
    spec = config.ledger
    try:
        return signer_from(spec.signing_key_file, spec.signing_key_env, file)
    except KeyError_ as exc:
        field = "ledger.signing_key_file" if spec.signing_key_file else "ledger.signing_key_env"
        raise ConfigError(file, [(field, str(exc).removeprefix(f"{file}: "))]) from None


def configured_shard(config: FleetConfig, file: str) -> str:
    """This writer's shard: ``$ledger.shard_env`` when that is set, else ``ledger.shard``."""
    spec = config.ledger
    if not spec.shard_env:
        return spec.shard
    value = os.environ.get(spec.shard_env, "")
    if not value:
        raise ConfigError(file, [("ledger.shard_env", f"${spec.shard_env} is not set")])
    if not re.fullmatch(SHARD_NAME, value):
        raise ConfigError(file, [("ledger.shard_env", f"${spec.shard_env} is {value!r}, not a "
                                  "shard name (letters, digits and . _ : / -)")])
    return value


def _names_postgres(config: FleetConfig) -> bool:
    """Whether the fleet file's ledger is PostgreSQL's: it names a DSN, or the variable that
    holds one (set or not)."""
    return bool(config.ledger.postgres_dsn or config.ledger.postgres_dsn_env)


def ledger_problems(config: FleetConfig, file: str) -> list[tuple[str, str]]:
    """What `build_ledger` would refuse in this environment, each as (field, problem), found
    by the same checks without opening a file or a connection (`inferplane check` reports
    them): the checkpoint signing key, the DSN's variable, the ledger file's directory."""
    problems: list[tuple[str, str]] = []
    spec = config.ledger
    checks: list[Callable[[FleetConfig, str], object]] = [configured_signer, configured_shard]
    if _names_postgres(config):
        checks.append(lambda c, f: postgres_dsn(c, "ledger", f))
    for step in checks:
        try:
            step(config, file)
        except ConfigError as exc:
            problems.extend(exc.problems)
    if spec.spool_path and _names_postgres(config):
        problem = writable_file_problem(spec.spool_path)
        if problem is not None:
            problems.append(("ledger.spool_path", f"{spec.spool_path}: {problem}"))
    path = config.gateway.ledger_path
    if path and not _names_postgres(config):
        problem = writable_file_problem(path)
        if problem is not None:
            problems.append((CONFIG_FIELD, f"{path}: {problem}"))
    return problems


def ignored_settings(config: FleetConfig) -> list[tuple[str, str]]:
    """Ledger settings the configured ledger does not use, each as (field, why), for
    `inferplane check` to note: ``ledger.spool_path`` without PostgreSQL (only a PostgreSQL
    ledger spools; a SQLite or in-memory ledger never opens the file)."""
    spec = config.ledger
    if spec.spool_path and not _names_postgres(config):
        kind = ("SQLite (gateway.ledger_path)" if config.gateway.ledger_path
                else "in memory (no gateway.ledger_path)")
        return [("ledger.spool_path", (
            f"ignored: the ledger is {kind}, and only a PostgreSQL ledger "
            "(ledger.postgres_dsn or ledger.postgres_dsn_env) spools its records"))]
    return []


def in_memory(config: FleetConfig) -> bool:
    """Whether `build_ledger` gives the ledger in memory (records lost on restart, one
    process's): no PostgreSQL DSN (nor its variable) and no ``gateway.ledger_path``. ``serve``
    warns of it (cli.py)."""
    return not (_names_postgres(config) or config.gateway.ledger_path)


def build_ledger(config: FleetConfig, file: str) -> Ledger:
    """The configured ledger (not started). Raises `ConfigError` naming the field at fault."""
    spec = config.ledger
    signer = configured_signer(config, file)
    dsn = postgres_dsn(config, "ledger", file)
    shard = configured_shard(config, file)
    if dsn:
        from inferplane.ledger.postgres import PostgresLedger

        return PostgresLedger(
            dsn, schema=spec.postgres_schema, prefix=spec.table_prefix, shard=shard,
            signer=signer, checkpoint_every=spec.checkpoint_every,
            checkpoint_interval_s=spec.checkpoint_interval_s, batch_size=spec.batch_size,
            source=file, spool_path=spec.spool_path, stall_timeout_s=spec.commit_timeout_s,
        )
    path = config.gateway.ledger_path
    if path:
        return SqliteLedger(
            path, source=file, shard=shard, signer=signer,
            checkpoint_every=spec.checkpoint_every,
            checkpoint_interval_s=spec.checkpoint_interval_s, batch_size=spec.batch_size,
            max_pending=max(100_000, spec.batch_size),
            # not durable: the writer batches on its interval, as before (cheaper under load;
            # a killed process loses the records of its last ~0.2 s)
            group_commit=spec.durable,
        )
    return MemoryLedger()
