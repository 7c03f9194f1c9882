"""The `inferplane` command: serve, demo, emulate, simulate, explain, check, schema, hash-key."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from inferplane.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="inferplane: an inference execution plane (OpenAI-compatible placement gateway).",
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="fleet YAML file")]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def load_checked(path: Path):  # type: ignore[no-untyped-def]
    """Load a fleet file and build its policies, or exit with the file's problems."""
    from inferplane.config.loader import load_config
    from inferplane.placement.build import check_policies

    try:
        config = load_config(path)
        check_policies(config, str(path))
    except ConfigError as exc:
        fail(f"invalid configuration\n{exc}")
    return config


def run_until_signal(main: asyncio.Future[None] | None = None) -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


async def _wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@app.command()
def serve(
    config: ConfigOpt = Path("examples/quickstart.yaml"),
    host: Annotated[str | None, typer.Option(help="override gateway.host")] = None,
    port: Annotated[int | None, typer.Option(help="override gateway.port")] = None,
    log_level: Annotated[str, typer.Option(help="logging level")] = "info",
) -> None:
    """Run the gateway in front of the fleet described by CONFIG."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    cfg = load_checked(config)
    from inferplane.api.app import serve as serve_app
    from inferplane.api.pipeline import Gateway

    gateway = Gateway(cfg, str(config))
    h = host or cfg.gateway.host
    p = port if port is not None else cfg.gateway.port

    async def main() -> None:
        try:
            runner = await serve_app(gateway, h, p)
        except OSError as exc:
            fail(f"cannot listen on {h}:{p}: {exc.strerror or exc}")
        typer.echo(
            f"inferplane gateway listening on http://{h}:{p} "
            f"({len(gateway.fleet.endpoints)} endpoints)",
            err=True,
        )
        try:
            await _wait_for_signal()
        finally:
            await runner.cleanup()

    loop = run_until_signal()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


@app.command()
def check(config: ConfigOpt) -> None:
    """Validate a fleet file (schema, references, plugins and profiles) and exit."""
    cfg = load_checked(config)
    n = sum(len(s.endpoints) for s in cfg.substrates)
    typer.echo(
        f"{config}: ok ({len(cfg.substrates)} substrates, {n} endpoints, "
        f"{len(cfg.tenants)} tenants, {len(cfg.profiles)} profiles)"
    )


@app.command()
def schema(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write to a file")] = None,
) -> None:
    """Print the JSON Schema of the fleet file."""
    from inferplane.config.schema import FleetConfig

    text = json.dumps(FleetConfig.model_json_schema(by_alias=True), indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)


@app.command("hash-key")
def hash_key_cmd(key: str) -> None:
    """Print the stored form (sha256:…) of an API key, for a tenant's api_keys."""
    from inferplane.api.pipeline import hash_key

    typer.echo(hash_key(key))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
