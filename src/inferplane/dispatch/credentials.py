"""Upstream credentials: each endpoint's API key, read once at start-up from where the fleet
file points (an environment variable, a file, or inline when explicitly allowed).

A key lives only in the `Credentials` mapping the dispatcher holds: never in the fleet model,
decision records, metrics or log lines. A missing variable or an unreadable or empty file is a
start-up `ConfigError` naming the endpoint and the variable or file.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import orjson

from inferplane.config.schema import EndpointSpec, FleetConfig
from inferplane.errors import ConfigError

Credentials = Mapping[str, str]


def _where(config: FleetConfig) -> dict[str, str]:
    return {
        e.name: f"substrates[{i}].endpoints[{j}]"
        for i, s in enumerate(config.substrates)
        for j, e in enumerate(s.endpoints)
    }


def _key_of(spec: EndpointSpec, environ: Mapping[str, str]) -> tuple[str | None, str | None]:
    """(key, problem) of one endpoint; both None when it has no credentials."""
    if spec.api_key_env is not None:
        value = environ.get(spec.api_key_env, "").strip()
        if not value:
            state = "is empty" if spec.api_key_env in environ else "is not set"
            return None, (
                f"endpoint {spec.name!r}: the environment variable {spec.api_key_env} "
                f"(api_key_env) {state}"
            )
        return value, None
    if spec.api_key_file is not None:
        path = Path(spec.api_key_file).expanduser()
        try:
            value = path.read_text("utf-8").strip()
        except OSError as exc:
            return None, (
                f"endpoint {spec.name!r}: cannot read the key file {spec.api_key_file} "
                f"(api_key_file): {exc.strerror or type(exc).__name__}"
            )
        except UnicodeDecodeError:
            return None, (
                f"endpoint {spec.name!r}: the key file {spec.api_key_file} (api_key_file) is "
                "not UTF-8 text"
            )
        if not value:
            return None, (
                f"endpoint {spec.name!r}: the key file {spec.api_key_file} (api_key_file) is "
                "empty"
            )
        return value, None
    if spec.api_key is not None:
        return spec.api_key, None
    return None, None


def credential_problems(
    config: FleetConfig, environ: Mapping[str, str] | None = None
) -> Iterable[tuple[str, str]]:
    """(path, problem) for every endpoint whose key cannot be read here."""
    env = os.environ if environ is None else environ
    where = _where(config)
    for s in config.substrates:
        for e in s.endpoints:
            _, problem = _key_of(e, env)
            if problem is not None:
                field = "api_key_env" if e.api_key_env is not None else "api_key_file"
                yield f"{where[e.name]}.{field}", problem


def load_credentials(
    config: FleetConfig, file: str = "<config>", environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Every endpoint's key by endpoint name (endpoints without credentials are absent).

    Raises `ConfigError` listing every endpoint whose variable or file is missing or empty.
    """
    problems = list(credential_problems(config, environ))
    if problems:
        raise ConfigError(file, problems)
    env = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for s in config.substrates:
        for e in s.endpoints:
            key, _ = _key_of(e, env)
            if key is not None:
                out[e.name] = key
    return out


def auth_headers(dialect: str, key: str | None) -> dict[str, str]:
    """The headers that carry a key in a dialect: ``Authorization: Bearer`` (OpenAI) or
    ``x-api-key`` plus the pinned ``anthropic-version`` (Anthropic)."""
    if dialect == "anthropic":
        headers = {"anthropic-version": ANTHROPIC_VERSION}
        if key:
            headers["x-api-key"] = key
        return headers
    return {"Authorization": f"Bearer {key}"} if key else {}


ANTHROPIC_VERSION = "2023-06-01"

REDACTED = "[redacted]"
"""What stands in an upstream's error for the gateway's key for it (`redact`)."""

MIN_REDACTED = 8
"""Keys shorter than this are not looked for (`redact`): a placeholder such as ``EMPTY`` (an
engine that wants none) would blank every word it appears in, and protects nothing."""


def redact(data: bytes, key: str | None) -> bytes:
    """``data`` (an upstream's error body or message) with every occurrence of ``key``, as is
    and as JSON escapes it, replaced by `REDACTED`: an upstream that echoes the credentials it
    got (a proxy's debug message, a self-hosted server) must not hand the gateway's key to a
    tenant. ``data`` itself when the key is absent or shorter than `MIN_REDACTED`."""
    if key is None or len(key) < MIN_REDACTED:
        return data
    for form in {key.encode(), orjson.dumps(key)[1:-1]}:
        if form in data:
            data = data.replace(form, REDACTED.encode())
    return data


def redact_cut(text: str, key: str | None) -> str:
    """`redact` for a message that may quote an upstream cut short: wherever a ``…`` marks a
    cut (``auth was sk-ab…``, a quoted excerpt ``'auth was sk-ab…'``, the cut followed by
    anything), the key's first characters (4 or more, as is, JSON-escaped or ``repr``-escaped)
    just before it go too."""
    text = redact(text.encode(), key).decode()
    if key is None or len(key) < MIN_REDACTED or "…" not in text:
        return text
    forms = {key, orjson.dumps(key).decode()[1:-1], repr(key)[1:-1]}
    parts = text.split("…")
    for i, part in enumerate(parts[:-1]):  # each part but the last ends where a cut was
        parts[i] = _cut_prefix(part, forms)
    return "…".join(parts)


def _cut_prefix(head: str, forms: set[str]) -> str:
    """``head`` with the longest prefix (4 characters or more) of one of ``forms`` that it
    ends with replaced by `REDACTED`."""
    n = max((n for form in forms for n in range(4, len(form)) if head.endswith(form[:n])),
            default=0)
    return head[:-n] + REDACTED if n else head
