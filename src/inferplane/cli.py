"""The `inferplane` command: serve, epp, envoy-config, demo, emulate, simulate, explain, verify,
export, check, schema, hash-key, ledger-keygen, ledger-sign-heads, ledger-prune, version."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

import typer

from inferplane import compiled
from inferplane.errors import ConfigError, first_line
from inferplane.errors import described as _describe

if TYPE_CHECKING:
    from inferplane.config.dsn import Section
    from inferplane.config.schema import FleetConfig
    from inferplane.core.plane import Core
    from inferplane.ledger.chain import Signer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="inferplane: an inference execution plane (OpenAI-compatible placement gateway).",
    pretty_exceptions_enable=False,
)



def _flags_show_no_type() -> None:
    """Typer's help shows a flag's type as if the flag took a value (``--watch-config <bool>``,
    ``--help <bool>``): a flag shows none."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None:  # a Typer without it shows no type
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_show_no_type()

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="fleet YAML file")]
WatchOpt = Annotated[
    bool,
    typer.Option(
        "--watch-config",
        help="also reload the fleet file when it changes (polled every second); SIGHUP always "
        "reloads it (docs/configuration.md#reloading-the-fleet-file)",
    ),
]

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _log_level(value: str) -> str:
    if value.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
    return value.lower()


LogLevelOpt = Annotated[
    str,
    typer.Option(help=f"logging level: {', '.join(LOG_LEVELS)}", callback=_log_level),
]


def fail(message: str, code: int = 2) -> NoReturn:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def write_out(out: Path, text: str) -> None:
    """Write a command's ``-o`` file, or exit with one line naming it (exit 2)."""
    try:
        out.write_text(text)
    except OSError as exc:
        fail(f"{out}: {exc.strerror or exc}")


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
    loop: asyncio.AbstractEventLoop
    try:
        if os.environ.get("INFERPLANE_EVENT_LOOP", "uvloop") != "uvloop":
            raise ImportError
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    return loop


def _run_to_end(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``main()`` on a new event loop (`run_until_signal`) until it returns; close the loop
    whatever happens."""
    loop = run_until_signal()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


async def _wait_for_signal(
    core: Core | None = None, config: Path | None = None, watch: bool = False
) -> signal.Signals:
    """Run until SIGINT / SIGTERM; returns which came first. With a ``core``, SIGHUP reloads
    its fleet file ``config`` (`Core.reload_file`), and so does a change of the file with
    ``watch``; a file that changed while the process was starting is reloaded at once."""
    stop = asyncio.Event()
    came: list[signal.Signals] = []
    loop = asyncio.get_running_loop()

    def stopping(sig: signal.Signals) -> None:
        came.append(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping, sig)
    watcher: asyncio.Task[None] | None = None
    reloads: set[asyncio.Task[object]] = set()
    if core is not None and config is not None:
        from inferplane.core.reload import file_sha256, watch_file

        def hup() -> None:
            task: asyncio.Task[object] = loop.create_task(core.reload_file(config))
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, hup)
        if file_sha256(config) != core.config_sha256:
            hup()
        if watch:
            watcher = loop.create_task(watch_file(core, config))
    try:
        await stop.wait()
    finally:
        for task in [*reloads, *([watcher] if watcher is not None else [])]:
            task.cancel()
    return came[0]


async def _drain_delay(core: Core, delay_s: float) -> None:
    """SIGTERM with ``gateway.drain_delay_s``: ``/ready`` answers 503 (`Core.draining`) while
    the listener stays open and serving ``delay_s``, so a load balancer that goes by health
    checks stops sending before the listener closes; a second SIGTERM or a SIGINT ends the
    wait."""
    core.draining = True
    typer.echo(f"inferplane gateway draining: /ready answers 503; the listener stays open "
               f"{delay_s:g} s (gateway.drain_delay_s)", err=True)
    again = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, again.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(again.wait(), delay_s)



def _say_stopping(what: str, core: Core) -> None:
    """The line a process writes when SIGTERM / SIGINT starts its stop (the line "stopped"
    follows once it is done): how much it is draining. It never raises: a failure to count or
    to write (EPIPE on a closed stderr) must not skip the stop that follows it."""
    try:
        sent, queued = core.requests_in_flight()
        typer.echo(f"inferplane {what} stopping: {sent + queued} requests in flight "
                   f"({sent} sent to endpoints, {queued} queued); draining them", err=True)
    except Exception:
        with contextlib.suppress(Exception):
            logging.getLogger("inferplane.serve").exception(
                "inferplane %s stopping (the in-flight count failed)", what)


@contextlib.contextmanager
def stop_deadline(
    timeout_s: float,
    step: Callable[[], str | None],
    quit_process: Callable[[int], object] = os._exit,
) -> Iterator[None]:
    """A gateway process's shutdown bounded by ``timeout_s`` (``gateway.shutdown_timeout_s``):
    past it, from a thread of its own (so that a blocked event loop cannot keep it back), one
    line on stderr names the step of `Core.stop` under way (``step()``; None: before the
    gateway's own steps, in aiohttp's shutdown of connections, the metrics listener or the batch
    worker) and the
    process exits with status 1 — a stop that never ends otherwise hangs a worker of
    ``serve --workers`` silently, holding what its steps hold."""

    def give_up() -> None:
        where = step() or "closing connections, the metrics listener or the batch worker"
        sys.stderr.write(
            f"inferplane: the gateway did not stop within {timeout_s:g} s "
            f"(gateway.shutdown_timeout_s); stuck in: {where}; exiting with status 1\n"
        )
        sys.stderr.flush()
        quit_process(1)

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _in_file(exc: ConfigError, path: Path) -> ConfigError:
    """The same problems, naming the fleet file (errors raised past loading say '<config>')."""
    return exc if exc.file == str(path) else ConfigError(str(path), exc.problems)


def redact_url(url: str) -> str:
    """``url`` with its password, if any, shown as ``***`` (fit for an error line or a log)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _redis_start_failure(exc: BaseException, cfg: FleetConfig, config: Path) -> str | None:
    """The one line for a start-up failure that came from the shared admission store (an error
    of the redis client, or a timeout with ``admission.store: redis``), or None."""
    if cfg.admission.store != "redis":
        return None
    if isinstance(exc, TimeoutError):  # asyncio's too: the store's deadline, not the client's
        why = f"no answer within admission.redis_timeout_s ({cfg.admission.redis_timeout_s:g} s)"
    elif type(exc).__module__.split(".")[0] == "redis":
        why = _describe(exc)
    else:
        return None
    where = f"admission.redis_url {redact_url(cfg.admission.redis_url)!r} in {config}"
    return f"cannot reach the admission store ({where}): {why}"


def _log_to_stderr(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


_T = TypeVar("_T")


def _build(make: Callable[[], _T], config: Path, what: str) -> _T:
    """``make()``, or exit with a message: a ConfigError names the fleet file, any other
    start-up problem is one line, never a traceback."""
    try:
        return make()
    except ConfigError as exc:
        fail(f"invalid configuration\n{_in_file(exc, config)}")
    except Exception as exc:  # a start-up problem is a message, never a traceback
        fail(f"cannot start the {what} ({config}): {_describe(exc)}", 1)


# API keys whose plaintext the project publishes (README, the comments of examples/ and of the
# embedded fleets): a gateway holding one answers anyone who has read them
PUBLISHED_KEYS = ("sk-quickstart-acme", "sk-quickstart-globex", "sk-h100x8-demo",
                  "sk-hetero-acme", "sk-hetero-bund", "sk-hetero-batchco")


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # another name, or "" (every address)


def refuse_published_keys(cfg: FleetConfig, host: str, option: str, config: Path) -> None:
    """Exit (status 2) rather than listen on an address other than loopback with a tenant whose
    API key is one the project publishes (the quickstart's, the demo fleets'): on 127.0.0.1
    they are a demo, anywhere else an open door."""
    if _is_loopback(host):
        return
    published = {"sha256:" + hashlib.sha256(k.encode()).hexdigest(): k for k in PUBLISHED_KEYS}
    for t in cfg.tenants:
        for h in t.api_keys:
            if h.lower() in published:
                fail(
                    f"refusing to listen on {host!r} ({option}): tenant {t.name!r} in {config} "
                    f"has the published example key {published[h.lower()]!r} (README, "
                    f"examples/), which anyone can use; give the tenants keys of your own "
                    f"(inferplane hash-key), or listen on 127.0.0.1"
                )


@app.command()
def serve(
    config: ConfigOpt,
    host: Annotated[str | None, typer.Option(help="override gateway.host")] = None,
    port: Annotated[int | None, typer.Option(help="override gateway.port", min=0, max=65535)
                    ] = None,
    log_level: LogLevelOpt = "info",
    workers: Annotated[
        int,
        typer.Option(
            help="gateway processes on the port (SO_REUSEPORT); more than 1 needs "
            "admission.store: redis and, with the batch lane on, a batch store in a file or "
            "PostgreSQL (docs/shared-state.md)"
        ),
    ] = 1,
    watch_config: WatchOpt = False,
) -> None:
    """Run the gateway in front of the fleet described by CONFIG (SIGHUP reloads it)."""
    _log_to_stderr(log_level)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until it can reload (`_wait_for_signal`)
    sha = _sha256(config)
    cfg = load_checked(config)
    refuse_published_keys(cfg, host or cfg.gateway.host, "--host" if host else "gateway.host",
                          config)
    if workers < 1:
        fail("--workers must be at least 1")
    if workers > 1:
        if cfg.admission.store != "redis":
            fail(
                f"--workers {workers} needs admission.store: redis in {config}: the workers "
                f"share budgets, rate limits and per-endpoint in-flight slots through Redis as "
                f"replicas do; the {cfg.admission.store!r} store belongs to one process"
            )
        if (port if port is not None else cfg.gateway.port) == 0:
            fail("--workers needs a fixed port (port 0 would give each worker its own)")
        if _batches_in_memory(cfg):
            fail(
                f"--workers {workers} with the batch lane in memory in {config}: each worker "
                f"would keep its own files and batches and only worker 0 runs them; set "
                f"batch.path or gateway.ledger_path (a SQLite file the workers share), "
                f"batch.postgres_dsn or batch.postgres_dsn_env, or batch.enabled: false"
            )
        from inferplane.api.workers import supervise

        _warn_at_start(cfg, workers)
        applied = _Applied(cfg, sha, config)

        def run_worker(index: int) -> int:
            try:  # from the configuration the other workers run (a restart after reloads)
                _serve_one(
                    applied.cfg, applied.sha, config, host, port, reuse_port=True,
                    watch=watch_config,
                )
            except typer.Exit as exc:
                return exc.exit_code
            return 0

        typer.echo(f"inferplane: starting {workers} gateway workers", err=True)
        raise typer.Exit(
            supervise(workers, run_worker, applied.check, 1.0 if watch_config else None)
        )
    _warn_at_start(cfg, workers)
    _serve_one(cfg, sha, config, host, port, reuse_port=False, watch=watch_config)


def _batches_in_memory(cfg: FleetConfig) -> bool:
    """Whether the batch lane is on and its store in memory (`batch.routes.in_memory`)."""
    from inferplane.batch.routes import in_memory

    return cfg.batch.enabled and in_memory(cfg)


def _in_memory(cfg: FleetConfig, workers: int) -> list[str]:
    """What `serve` would hold only in memory (lost when it stops), each with the keys that
    keep it: the local admission store without a file (`admission.controller.local_store_path`)
    or Redis's outage journal (`journal_path`), the batch store (`batch.routes.in_memory`) and
    the ledger (`ledger.build.in_memory`)."""
    from inferplane.admission.controller import journal_path, local_store_path
    from inferplane.ledger.build import in_memory as ledger_in_memory

    held = []
    a = cfg.admission
    if a.enabled and a.store == "local" and local_store_path(cfg) is None:
        held.append("budgets, leases and usage (set admission.path or gateway.ledger_path)")
    if a.enabled and a.store == "redis" and journal_path(cfg) is None:
        held.append(
            "the Redis outage journal, settles waiting for Redis to come back (set "
            "admission.journal_path or gateway.ledger_path)"
        )
    if _batches_in_memory(cfg):
        held.append(
            "batch files and batches (set batch.path, gateway.ledger_path or batch.postgres_dsn)"
        )
    if ledger_in_memory(cfg):
        apart = (
            f", each of the {workers} workers its own: the decision API and the console see "
            f"only the worker that served the request"
            if workers > 1 else ""
        )
        held.append(
            f"decision records{apart} (set gateway.ledger_path or ledger.postgres_dsn)"
        )
    return held


def _warn_at_start(cfg: FleetConfig, workers: int) -> None:
    """The start-up warnings, once (in the parent under ``--workers``): what is held only in
    memory, and engine URLs ending in ``/v1``."""
    _warn_in_memory(cfg, workers)
    for line in _v1_urls(cfg):
        logging.getLogger("inferplane.serve").warning("%s", line)


def _v1_urls(cfg: FleetConfig) -> list[str]:
    """An engine endpoint's URL ending in ``/v1`` (the OpenAI ``base_url`` habit): its API
    works (`Endpoint.api_url` adds no second ``/v1``), but the ``health`` probe and the
    ``/metrics`` scrape append to the URL as is (`fleet.scraper.HttpMetricsSource`), where an
    engine serves neither: the failed probe (404, or 401 from a key check on ``/v1/*``) keeps
    it down. Endpoints not probed with ``health`` nor scraped (a ``provider-api``'s defaults)
    are not named."""
    from inferplane.fleet.model import Fleet

    lines = []
    for ep in Fleet.from_config(cfg).endpoints:
        if not ep.spec.base_path.endswith("/v1"):
            continue
        what = [f"probed at {ep.url}/health"] if ep.health_check == "health" else []
        if ep.scrape_metrics:
            what.append(f"scraped at {ep.url}/metrics")
        if what:
            lines.append(
                f"endpoint {ep.name!r} is {' and '.join(what)}, which an engine does not "
                f"serve (down, no load signals): give its url without the trailing /v1 (the "
                f"API paths get their /v1 anyway; docs/providers.md)"
            )
    return lines


def _warn_in_memory(cfg: FleetConfig, workers: int) -> None:
    """One warning at start-up naming what is held only in memory (`_in_memory`)."""
    held = _in_memory(cfg, workers)
    if held:
        logging.getLogger("inferplane.serve").warning(
            "held in memory and lost when the gateway stops: %s", "; ".join(held)
        )


class _Applied:
    """The fleet configuration the workers of ``serve --workers`` run, kept by their parent:
    `check` validates the file as a worker's reload does (`Core.reload`: parsed, no section
    needing a restart changed, fleet, placement policies, classifier and upstream credentials
    built) and keeps it when it passes, so that a worker restarted later starts from what the
    others applied rather than from the start-up file (or a file they all refused)."""

    def __init__(self, cfg: FleetConfig, sha: str | None, path: Path) -> None:
        self.cfg, self.sha, self.path = cfg, sha, path
        self._checked = sha

    def check(self) -> None:
        from inferplane.config.loader import parse_config, read_text
        from inferplane.core.reload import restart_needed
        from inferplane.dispatch.credentials import load_credentials
        from inferplane.fleet.model import Fleet
        from inferplane.placement.build import build_policies
        from inferplane.placement.classify import Classifier

        try:
            text = read_text(self.path)
        except (OSError, ConfigError):
            return
        sha = hashlib.sha256(text.encode()).hexdigest()
        if sha == self._checked:
            return
        self._checked = sha
        file = str(self.path)
        try:
            cfg = parse_config(text, file, base_dir=self.path.parent)
            if restart_needed(self.cfg, cfg):
                return
            Fleet.from_config(cfg)
            build_policies(cfg, file)
            Classifier(cfg)
            load_credentials(cfg, file)
        except Exception:  # refused: the workers log why
            return
        self.cfg, self.sha = cfg, sha


def _sha256(config: Path) -> str | None:
    from inferplane.core.reload import file_sha256

    return file_sha256(config)


def _serve_one(
    cfg: FleetConfig,
    sha: str | None,
    config: Path,
    host: str | None,
    port: int | None,
    *,
    reuse_port: bool,
    watch: bool,
) -> None:
    """One gateway process: build, listen, serve until SIGTERM / SIGINT."""
    from inferplane.api.app import ListenError
    from inferplane.api.app import serve as serve_app
    from inferplane.api.pipeline import Gateway
    from inferplane.core.reload import freeze_heap

    gateway = _build(lambda: Gateway(cfg, str(config)), config, "gateway")
    gateway.set_config_sha256(sha)
    h = host or cfg.gateway.host
    p = port if port is not None else cfg.gateway.port

    async def main() -> None:
        try:
            runner = await serve_app(gateway, h, p, reuse_port=reuse_port)
        except ConfigError as exc:
            fail(f"invalid configuration\n{_in_file(exc, config)}")
        except ListenError as exc:
            fail(f"cannot listen on {h}:{p}: {exc}")
        except Exception as exc:  # e.g. Redis unreachable, ledger file unwritable
            if (line := _redis_start_failure(exc, cfg, config)) is not None:
                fail(line)
            fail(f"cannot start the gateway ({config}): {_describe(exc)}", 1)
        freeze_heap(cfg.gateway.gc_freeze)
        typer.echo(
            f"inferplane gateway listening on http://{h}:{p} "
            f"({len(gateway.fleet.endpoints)} endpoints; placement {compiled.status().describe()})",
            err=True,
        )
        try:
            came = await _wait_for_signal(gateway, config, watch)
            if came == signal.SIGTERM and cfg.gateway.drain_delay_s > 0:
                await _drain_delay(gateway, cfg.gateway.drain_delay_s)
        finally:
            _say_stopping("gateway", gateway)
            with stop_deadline(cfg.gateway.shutdown_timeout_s, lambda: gateway.stopping):
                await runner.cleanup()
            typer.echo("inferplane gateway stopped", err=True)

    _run_to_end(main)


@app.command()
def epp(
    config: ConfigOpt,
    host: Annotated[str | None, typer.Option(help="override epp.host")] = None,
    port: Annotated[int | None, typer.Option(help="override epp.port", min=0, max=65535)
                    ] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="override epp.metrics_port: serve /metrics (no key) on this port of "
        "epp.metrics_host", min=0, max=65535)] = None,
    log_level: LogLevelOpt = "info",
    watch_config: WatchOpt = False,
) -> None:
    """Run the endpoint picker (Envoy ext_proc gRPC) for the fleet described by CONFIG (SIGHUP
    reloads it), and its Prometheus /metrics listener where epp.metrics_port (or
    --metrics-port) is set."""
    _log_to_stderr(log_level)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the picker can reload
    sha = _sha256(config)
    cfg = load_checked(config)
    refuse_published_keys(cfg, host or cfg.epp.host, "--host" if host else "epp.host", config)
    from inferplane.core.reload import freeze_heap
    from inferplane.epp.server import Picker
    from inferplane.epp.server import serve as serve_epp

    picker = _build(lambda: Picker(cfg, str(config)), config, "picker")
    picker.set_config_sha256(sha)
    h = host or cfg.epp.host
    p = port if port is not None else cfg.epp.port
    mp = metrics_port if metrics_port is not None else cfg.epp.metrics_port

    async def main() -> None:
        try:
            server, bound = await serve_epp(picker, h, p, metrics_port=mp)
        except Exception as exc:
            # the store's timeout first: on Python 3.11 a TimeoutError is an OSError too
            if (line := _redis_start_failure(exc, cfg, config)) is not None:
                fail(line)
            if isinstance(exc, OSError):  # the listener's port
                fail(str(exc))
            fail(f"cannot start the picker ({config}): {_describe(exc)}", 1)
        freeze_heap(cfg.gateway.gc_freeze)
        typer.echo(
            f"inferplane endpoint picker (ext_proc gRPC) listening on {h}:{bound} "
            f"({len(picker.fleet.endpoints)} endpoints; placement {compiled.status().describe()})"
            + ("" if picker.metrics_runner is None else
               f"; /metrics on {cfg.epp.metrics_host}:{picker.metrics_runner.addresses[0][1]}"),
            err=True,
        )
        try:
            await _wait_for_signal(picker, config, watch_config)
        finally:
            _say_stopping("endpoint picker", picker)
            # up to 1 s while a pick is being decided or a flight is in the air, then the rest
            # is accounted and the streams still open (Envoy's access log, observers) end at once
            await server.stop(await picker.stop_grace(1.0))
            await picker.stop()
            typer.echo("inferplane endpoint picker stopped", err=True)

    _run_to_end(main)


@app.command("envoy-config")
def envoy_config(
    config: ConfigOpt,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write to a file")] = None,
    epp_port: Annotated[
        # the port Envoy connects to: 0 (any free port) belongs to a listener, not an address
        int | None, typer.Option(help="override epp.port", min=1, max=65535)
    ] = None,
    envoy_port: Annotated[
        int | None, typer.Option(help="override epp.envoy_port", min=0, max=65535)
    ] = None,
    admin_port: Annotated[
        int | None, typer.Option(help="override epp.envoy_admin_port", min=0, max=65535)
    ] = None,
) -> None:
    """Write an Envoy bootstrap (listener, ext_proc filters, clusters) for `inferplane epp`."""
    cfg = load_checked(config)
    from inferplane.epp.envoy_config import render

    text = render(cfg, epp_port=epp_port, envoy_port=envoy_port, admin_port=admin_port)
    if out is None:
        sys.stdout.write(text)
    else:
        write_out(out, text)


@app.command()
def version() -> None:
    """The version, the interpreter, and whether placement runs compiled or as pure Python."""
    import platform

    from inferplane import __version__

    status = compiled.status()
    typer.echo(f"inferplane {__version__} (Python {platform.python_version()})")
    typer.echo(f"placement: {status.describe()}")
    for name in status.modules:
        typer.echo(f"  {name}")


def startup_problems(cfg: FleetConfig, file: str) -> list[tuple[str, str]]:
    """What `serve` refuses to start on in this environment, though the file is valid, each as
    (field, problem), found by the checks `serve` runs at start (without opening a file or a
    connection): endpoint keys (`dispatch.credentials`), the ledger's signing key, DSN
    variable and file (`ledger.build.ledger_problems`), the batch store's DSN variable and file
    (`batch.routes.store_problems`), the admission store's file or Redis outage journal's
    (`admission.controller.store_problems`). A batch or admission file derived from
    ``gateway.ledger_path`` that fails where the ledger's own file does is one problem, the
    ledger's."""
    from inferplane.admission.controller import store_problems as admission_problems
    from inferplane.batch.routes import store_problems
    from inferplane.dispatch.credentials import credential_problems
    from inferplane.ledger.build import ledger_problems

    ledger = ledger_problems(cfg, file)
    named = {f for f, _ in ledger}
    stores = [*admission_problems(cfg), *store_problems(cfg, file)]
    derived = [(f, p) for f, p in stores if f not in named]
    return [*credential_problems(cfg), *ledger, *derived]


@app.command()
def check(
    config: ConfigOpt,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="also fail (exit 2) on what `serve` would refuse here (an unset variable, a "
            "missing key file or directory), not just note it",
        ),
    ] = False,
    connect: Annotated[
        bool,
        typer.Option(
            "--connect",
            help="also connect to the Redis and PostgreSQL the file names (2 s each) and fail "
            "(exit 2) on one that does not answer",
        ),
    ] = False,
) -> None:
    """Validate a fleet file (schema, references, plugins and profiles) and exit."""
    cfg = load_checked(config)
    here = startup_problems(cfg, str(config))
    if strict and here:
        lines = "\n".join(f"{config}: {path}: {problem}" for path, problem in here)
        fail(f"`serve` would refuse to start with this file in this environment\n{lines}")
    if connect:
        unreachable = _connect_problems(cfg, str(config))
        if unreachable:
            lines = "\n".join(f"{config}: {path}: {problem}" for path, problem in unreachable)
            fail(f"cannot reach what this file names from here\n{lines}")
    n = sum(len(s.endpoints) for s in cfg.substrates)
    typer.echo(
        f"{config}: ok ({len(cfg.substrates)} substrates, {n} endpoints, "
        f"{len(cfg.tenants)} tenants, {len(cfg.profiles)} profiles)"
    )
    from inferplane.fleet.model import Fleet

    for model, apis in sorted(Fleet.from_config(cfg).apis.items()):
        if apis == {"chat"}:
            typer.echo(
                f"note: model {model!r} is served only through the anthropic dialect: "
                "/v1/completions and /v1/embeddings will answer 400 for it"
            )
    for line in _v1_urls(cfg):
        typer.echo(f"note: {line}")
    from inferplane.ledger.build import ignored_settings

    for path, why in ignored_settings(cfg):
        typer.echo(f"note: {config}: {path}: {why}")
    for path, problem in here:  # serve would stop on these
        typer.echo(f"note: {config}: {path}: {problem} in this environment; `serve` refuses "
                   "to start on it (check --strict fails on it)")
    from inferplane.placement.build import moved_filters, unlisted_required

    for name, missing in unlisted_required(cfg).items():
        typer.echo(
            f"note: profile {name!r} lists no {', '.join(missing)} filter: placement runs "
            "them anyway (hard constraints, docs/placement.md)"
        )
    for name, (moved, before) in moved_filters(cfg, str(config)).items():
        typer.echo(
            f"note: profile {name!r}: {', '.join(moved)} run before {before!r} (required "
            "filters and health run before set-level ones, docs/placement.md)"
        )


def _connect_problems(cfg: FleetConfig, file: str, timeout_s: float = 2.0
                      ) -> list[tuple[str, str]]:
    """`check --connect`: ping the Redis (``admission.store: redis``) and connect to each
    PostgreSQL (ledger, batch store) the file names, each within ``timeout_s``; what did not
    answer, as (field, problem). A password in a URL is never shown; a DSN is not quoted."""
    problems: list[tuple[str, str]] = []
    if cfg.admission.store == "redis":
        import redis

        url = cfg.admission.redis_url
        try:
            client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s,
                                          socket_timeout=timeout_s)
            try:
                client.ping()
            finally:
                client.close()
        except (redis.RedisError, OSError, ValueError) as exc:
            problems.append(("admission.redis_url", f"{redact_url(url)}: {_describe(exc)}"))
    from inferplane.config.dsn import postgres_dsn

    sections: list[Section] = ["ledger", "batch"] if cfg.batch.enabled else ["ledger"]
    for section in sections:
        spec = cfg.ledger if section == "ledger" else cfg.batch
        # the file's own field: the DSN itself, or the variable that holds it
        field = f"{section}.postgres_dsn" + ("_env" if spec.postgres_dsn_env else "")
        try:
            dsn = postgres_dsn(cfg, section, file)
        except ConfigError:  # an unset variable: startup_problems notes it
            continue
        if not dsn:
            continue
        import psycopg

        try:
            psycopg.connect(dsn, connect_timeout=max(1, round(timeout_s))).close()
        except (psycopg.Error, OSError) as exc:
            problems.append((field, f"cannot connect: {first_line(exc)}"))
    return problems


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
        write_out(out, text)


@app.command()
def openapi(
    config: Annotated[Path | None, typer.Option(
        "--config", "-c", help="fleet YAML file (default: the package's embedded h100x8 fleet)"
    )] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="write to a file")] = None,
) -> None:
    """Print the OpenAPI description of the gateway CONFIG describes (also GET /openapi.json)."""
    if config is not None:
        cfg, label = load_checked(config), str(config)
    else:
        from inferplane.config.loader import parse_config
        from inferplane.demo import embedded_fleet

        text, label = embedded_fleet("h100x8")
        cfg = parse_config(text, label)
    from inferplane.api.app import build_app, route_table
    from inferplane.api.openapi import build_spec
    from inferplane.api.pipeline import Gateway

    text = json.dumps(build_spec(route_table(build_app(Gateway(cfg, label)))), indent=2)
    if out is None:
        sys.stdout.write(text + "\n")
    else:
        write_out(out, text + "\n")


@app.command("hash-key")
def hash_key_cmd(key: str) -> None:
    """Print the stored form (sha256:…) of an API key, for a tenant's api_keys."""
    from inferplane.api.pipeline import hash_key

    typer.echo(hash_key(key))


@app.command()
def explain(
    decision_id: Annotated[str, typer.Argument(help="the decision id (x-inferplane-decision-id)")],
    ledger: Annotated[
        Path | None, typer.Option("--ledger", "-l", help="SQLite ledger file")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="fleet YAML file; reads its configured ledger "
                     "(gateway.ledger_path, or ledger.postgres_dsn)"),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON record")] = False,
) -> None:
    """Explain one placement decision from the ledger: the request, the pick, predicted
    vs measured, spillover, retries, every candidate and why it lost, plugin timings."""
    import orjson

    from inferplane.ledger.tools import SourceError, read_one

    source = _ledger_source(ledger, config)
    try:
        rec = read_one(source, decision_id)
    except SourceError as exc:
        fail(str(exc))
    if rec is None:
        typer.echo(f"no decision {decision_id!r} in {source.name}", err=True)
        raise typer.Exit(1)
    if as_json:
        sys.stdout.write(orjson.dumps(rec, option=orjson.OPT_INDENT_2).decode() + "\n")
        return
    from inferplane.ledger.explain import print_decision

    print_decision(rec)


def _ledger_source(ledger: Path | None, config: Path | None):  # type: ignore[no-untyped-def]
    """The ledger named by --ledger FILE or by the fleet file's configuration."""
    from inferplane.ledger.tools import Source, SourceError, source_from_config

    if (ledger is None) == (config is None):
        fail("give the ledger file with --ledger PATH or a fleet file with --config (one of them)")
    if ledger is not None:
        return Source(sqlite_path=str(ledger))
    assert config is not None
    try:
        return source_from_config(load_checked(config), str(config))
    except (SourceError, ConfigError) as exc:
        fail(str(exc))


LedgerOpt = Annotated[Path | None, typer.Option("--ledger", "-l", help="SQLite ledger file")]
LedgerConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="fleet YAML file: its configured ledger (SQLite or "
                 "PostgreSQL) and signing key"),
]
SigningKeyOpt = Annotated[
    Path | None,
    typer.Option("--key", help="the Ed25519 signing key (private, PEM) with --ledger; "
                 "default with --config: its ledger.signing_key_file / signing_key_env"),
]
ShardOpt = Annotated[
    list[str] | None, typer.Option("--shard", help="only this shard (repeatable)")
]
PreviousKeyOpt = Annotated[
    list[Path] | None,
    typer.Option("--previous-key", help="after a signing-key change: the public key (PEM) of "
                 "an earlier signing key, whose checkpoints from before the change verify too "
                 "(repeatable); ledger-sign-heads with it is the change itself: it signs every "
                 "head and re-signs each latest prune anchor with the new key"),
]


@app.command()
def verify(
    ledger: LedgerOpt = None,
    config: LedgerConfigOpt = None,
    public_key: Annotated[
        list[Path] | None,
        typer.Option("--public-key", "-k", help="Ed25519 public key (PEM) the checkpoints must "
                     "be signed with; repeat it for a keyring after a key change: the current "
                     "key first, then earlier ones (trusted only for what they signed before "
                     "the change); default: the configured signing key's"),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option("--checkpoint-every", min=1, help="the writers' ledger.checkpoint_every: "
                     "with a key, a shard with this many records or more after its last signed "
                     "checkpoint fails; default: the fleet file's, else 1000"),
    ] = None,
    export_file: Annotated[
        Path | None,
        typer.Option("--export", "-e", help="verify an NDJSON file of `inferplane export` "
                     "instead of a ledger: receipts, chain links, and the prune anchors it "
                     "carries (signatures checked with --public-key)"),
    ] = None,
    filtered: Annotated[
        bool, typer.Option("--filtered", help="with --export: it was made with --since, "
                           "--until or --tenant, so records missing between its records are "
                           "expected")
    ] = False,
) -> None:
    """Check the ledger's hash chains and signed checkpoints. Exit 0 when intact; 1 naming the
    first bad record when any record was edited, deleted, inserted or reordered, or when a
    shard has checkpoint_every or more records after its last signed checkpoint; 2 when the
    ledger cannot be read. With --export FILE: an NDJSON export instead, from the file alone
    (its receipts, links and prune anchors; docs/evidence.md, Exporting)."""
    from inferplane.ledger.tools import SourceError, describe, read_public_key
    from inferplane.ledger.tools import verify as run_verify

    if export_file is not None:
        if ledger is not None or config is not None:
            fail("give --export FILE, or the ledger (--ledger or --config), not both")
        try:
            keys = [read_public_key(p) for p in public_key or ()]
        except SourceError as exc:
            fail(str(exc))
        if checkpoint_every is not None:
            fail("--checkpoint-every goes with a ledger, not --export (an export holds no "
                 "checkpoints)")
        _verify_export(export_file, keys, filtered)
    if filtered:
        fail("--filtered goes with --export FILE")
    source = _ledger_source(ledger, config)
    try:
        keys = [read_public_key(p) for p in public_key or ()]
        rep = run_verify(source, keys or None, checkpoint_every)
    except SourceError as exc:
        fail(str(exc))
    for line in describe(rep, source):
        typer.echo(line, err=not rep.ok)
    raise typer.Exit(0 if rep.ok else 1)


def _verify_export(path: Path, keys: list[Any], filtered: bool) -> None:
    """``verify --export FILE``: exit 0 when intact, 1 naming the first bad line, 2 when the
    file cannot be read."""
    from inferplane.ledger.verify import NotAnExport, describe_anchor, verify_export

    try:
        with path.open("rb") as fh:
            rep = verify_export(fh, keys or None, filtered=filtered)
    except OSError as exc:
        fail(f"{path}: {exc.strerror or exc}")
    except NotAnExport as exc:
        fail(f"{path}: {exc}")
    if not rep.ok:
        typer.echo(f"TAMPERED: {path}: {rep.problem}", err=True)
        raise typer.Exit(1)

    def span(s: str, last: int) -> str:
        first = rep.first.get(s, 1)
        kept = f"#{first}..#{last}" if last >= first else "no records"
        return f"{s} ({kept}; #1..#{first - 1} pruned)" if s in rep.pruned else f"{s} ({kept})"

    typer.echo(f"ok: {path}: {rep.records} records intact in {len(rep.shards)} chain(s)"
               + (" (filtered: gaps not checked)" if filtered else "") + ": "
               + (", ".join(span(s, n) for s, n in sorted(rep.shards.items())) or "none"))
    if rep.anchors:
        typer.echo(f"prune anchors: {rep.anchors_checked} of {rep.anchors} signatures verified; "
                   + "; ".join(f"{s} starts at #{a.first_seq} ({describe_anchor(a)}; key "
                               f"{a.key_id})" for s, a in sorted(rep.pruned.items())))
    typer.echo("not checkable from an export: records cut off a shard's end before it was "
               "made (it holds no checkpoints): compare receipts, or verify the ledger")
    for w in rep.warnings:
        typer.echo(f"warning: {w}")
    raise typer.Exit(0)


@app.command()
def export(
    ledger: LedgerOpt = None,
    config: LedgerConfigOpt = None,
    since: Annotated[str | None, typer.Option(help="from (unix seconds or ISO 8601)")] = None,
    until: Annotated[str | None, typer.Option(help="before (unix seconds or ISO 8601)")] = None,
    tenant: Annotated[str | None, typer.Option(help="one tenant's records only")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="ndjson, csv or parquet")] = "ndjson",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="file to write (default: stdout)")
    ] = None,
) -> None:
    """Export decision records with their receipts and chain fields (docs/evidence.md)."""
    from inferplane.ledger.query import WRITERS, BadQuery, Query, parse_time
    from inferplane.ledger.tools import SourceError
    from inferplane.ledger.tools import export as run_export

    if fmt not in WRITERS:
        fail(f"--format must be one of {', '.join(WRITERS)}; got {fmt!r}")
    if fmt == "parquet" and output is None:
        fail("--format parquet needs --output FILE")
    source = _ledger_source(ledger, config)
    try:
        q = Query(
            tenant=tenant,
            since=parse_time(since, "--since") if since else None,
            until=parse_time(until, "--until") if until else None,
        )
    except BadQuery as exc:
        fail(str(exc))
    try:
        if output is None:
            n = run_export(source, q, fmt, sys.stdout.buffer)
        else:
            with output.open("wb") as fh:
                n = run_export(source, q, fmt, fh)
    except SourceError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{output}: {exc.strerror or exc}")
    typer.echo(f"exported {n} records (their columns as stored: `inferplane verify` checks "
               "each against its hashed record)", err=True)
    _state_anchors(source)


def _state_anchors(source: Any) -> None:
    """After an export: where each pruned shard's chain starts, and the anchor that says so."""
    from inferplane.ledger.chain import latest_anchors
    from inferplane.ledger.tools import SourceError, read_anchors
    from inferplane.ledger.verify import describe_anchor

    try:
        anchors = latest_anchors(read_anchors(source))
    except SourceError as exc:
        fail(str(exc))
    for s, a in sorted(anchors.items()):
        typer.echo(f"shard {s} was pruned: its chain starts at #{a.first_seq}, after the prune "
                   f"anchor ({describe_anchor(a)}; key {a.key_id}) with prev_hash "
                   f"{a.prev_hash} and signature {a.signature}; records #1..#{a.first_seq - 1} "
                   "are not in the ledger", err=True)


@app.command("ledger-sign-heads")
def ledger_sign_heads(
    ledger: LedgerOpt = None,
    config: LedgerConfigOpt = None,
    key: SigningKeyOpt = None,
    shard: ShardOpt = None,
    previous_key: PreviousKeyOpt = None,
) -> None:
    """Sign each shard's current head with the checkpoint key (the key holder's attestation),
    after verifying the whole ledger: for shards written without the key (before signing was
    turned on, or archived), which verify with a key otherwise fails for good. Exit 0 when
    signed (or nothing to sign), 1 when the ledger does not verify (nothing signed), 2 when it
    cannot be read or written."""
    from inferplane.ledger.tools import SourceError, describe, read_public_key, sign_heads

    source = _ledger_source(ledger, config)
    signer = _signing_key(key, config)
    try:
        previous = [read_public_key(p) for p in previous_key or ()]
        rep, signed = sign_heads(source, signer, shard or (), previous)
    except SourceError as exc:
        fail(str(exc))
    if not rep.ok:
        for line in describe(rep, source):
            typer.echo(line, err=True)
        typer.echo("nothing signed: the ledger does not verify", err=True)
        raise typer.Exit(1)
    for cp in signed:
        typer.echo(f"signed {cp.shard} at #{cp.seq} (key {cp.key_id})")
    if rep.resigned_anchors:
        typer.echo(f"re-signed {rep.resigned_anchors} latest prune anchor(s) with key "
                   f"{signer.key_id}: " + ", ".join(
                       f"{s} at #{a.first_seq}" for s, a in sorted(rep.pruned.items())
                       if a.key_id != signer.key_id))
    if not signed and not rep.resigned_anchors:
        typer.echo(f"nothing to sign: every shard's head in {source.name} is already signed")


def _signing_key(key: Path | None, config: Path | None) -> Signer:
    """The signer of --key FILE, or of the fleet file's ledger; exit 2 naming what is missing."""
    from inferplane.ledger.chain import KeyError_, Signer, load_private

    signer: Signer | None = None
    try:
        if key is not None:
            signer = Signer(load_private(key.read_bytes(), str(key)))
        elif config is not None:
            from inferplane.ledger.build import configured_signer

            signer = configured_signer(load_checked(config), str(config))
    except OSError as exc:
        fail(f"{key}: {exc.strerror or exc}")
    except (KeyError_, ConfigError) as exc:
        fail(str(exc))
    if signer is None:
        fail("no signing key: give --key FILE, or a fleet file whose ledger has "
             "signing_key_file or signing_key_env")
    return signer


@app.command("ledger-prune")
def ledger_prune(
    before: Annotated[str, typer.Option(
        "--before", help="delete records made before this time (unix seconds or ISO 8601, "
        "UTC without an offset), in whole checkpoint intervals")],
    ledger: LedgerOpt = None,
    config: LedgerConfigOpt = None,
    key: SigningKeyOpt = None,
    shard: ShardOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what would be deleted; change nothing")
    ] = False,
    max_records: Annotated[
        int | None,
        typer.Option("--max-records", min=1, help="delete in steps of at most N records (or "
                     "one checkpoint interval, where longer), each its own transaction and "
                     "anchor: bounds how long a SQLite prune holds the write lock"),
    ] = None,
    checkpoint_every: Annotated[
        int | None,
        typer.Option("--checkpoint-every", min=1, help="the writers' ledger.checkpoint_every "
                     "for the verify that comes first (as `inferplane verify`)"),
    ] = None,
    previous_key: PreviousKeyOpt = None,
) -> None:
    """Delete the records made before --before, in whole checkpoint intervals, and sign a prune
    anchor per shard that verify accepts as the chain's start (docs/evidence.md, Retention).
    The ledger is verified with the key first; nothing is pruned unless it is intact. Exit 0
    when pruned (or already pruned up to that time), 1 when the ledger does not verify (as
    verify and ledger-sign-heads), 2 when there is no key, nothing in it is before that time,
    or it cannot be read or written."""
    from inferplane.ledger.prune import prune
    from inferplane.ledger.query import BadQuery, parse_time
    from inferplane.ledger.tools import SourceError, describe, read_public_key

    try:
        cutoff = parse_time(before, "--before")
    except BadQuery as exc:
        fail(str(exc))
    if cutoff > time.time():
        fail(f"--before {before} is in the future: that would prune records still being "
             "written")
    source = _ledger_source(ledger, config)
    signer = _signing_key(key, config)
    try:
        previous = [read_public_key(p) for p in previous_key or ()]
        out = prune(source, signer, cutoff, shard or (), dry_run=dry_run,
                    checkpoint_every=checkpoint_every, max_records=max_records,
                    previous=previous)
    except SourceError as exc:
        fail(str(exc))
    if not out.report.ok:
        for line in describe(out.report, source):
            typer.echo(line, err=True)
        typer.echo("nothing pruned: the ledger does not verify (a ledger is pruned only when "
                   "intact)", err=True)
        raise typer.Exit(1)  # as verify and ledger-sign-heads
    if out.nothing_before:
        fail(f"nothing in {source.name} was made before {before}: nothing to prune")
    verb = "would prune" if dry_run else "pruned"
    by_shard: dict[str, list[Any]] = {}
    for p in out.plans:
        by_shard.setdefault(p.shard, []).append(p)
    for s, steps in by_shard.items():
        first, last = steps[0], steps[-1]
        kept = (f"#{last.cut + 1}..#{last.last}" if last.last > last.cut else "none yet")
        left = (f"; {last.left_before} later records made before the cut-off stay until a "
                "checkpoint follows them" if last.left_before else "")

        def anchor(p: Any) -> str:
            return (f"anchor at #{p.cut + 1}" if dry_run
                    else f"anchor at #{p.cut + 1} signed (key {signer.key_id})")

        span = f"records #{first.first}..#{last.cut} ({last.cut - first.first + 1})"
        if len(steps) == 1:
            typer.echo(f"{verb} shard {s}: {span}, {anchor(last)}; kept {kept}{left}")
            continue
        # with --max-records: one transaction and anchor a step; the shard's total first,
        # so that no step reads as the whole prune
        typer.echo(f"{verb} shard {s} in {len(steps)} steps (--max-records {max_records}: a "
                   f"transaction and an anchor each): {span}; kept {kept}{left}")
        for i, p in enumerate(steps, 1):
            typer.echo(f"  step {i} of {len(steps)}: records #{p.first}..#{p.cut} ({p.count}), "
                       f"{anchor(p)}")
    for s, why in sorted(out.idle.items()):
        typer.echo(f"shard {s}: nothing to prune: {why}")


@app.command("ledger-keygen")
def ledger_keygen(
    out: Annotated[Path, typer.Option("--out", "-o", help="private key file to create (0600)")],
) -> None:
    """Create an Ed25519 checkpoint signing key; print its public key (give it to verifiers)."""
    from inferplane.ledger.chain import generate_private_pem, load_private, public_pem

    if out.exists():
        fail(f"{out} exists; not overwriting a key")
    pem = generate_private_pem()
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        fail(f"{out}: {exc.strerror or exc}")
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    typer.echo(public_pem(load_private(pem, str(out)).public_key()).decode(), nl=False)


@app.command()
def emulate(
    config: ConfigOpt,
    time_scale: Annotated[
        float, typer.Option(help="engine seconds per real second (>1 runs faster)")
    ] = 1.0,
    only: Annotated[
        list[str] | None, typer.Option(help="emulate only this endpoint (repeatable)")
    ] = None,
    log_level: LogLevelOpt = "warning",
) -> None:
    """Serve every endpoint of CONFIG as an emulated vLLM engine, in one process."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    if not time_scale > 0:
        fail("--time-scale must be > 0")
    cfg = load_checked(config)
    names = {e.name for s in cfg.substrates for e in s.endpoints}
    unknown = sorted(set(only or ()) - names)
    if unknown:
        fail(f"unknown endpoint(s) {unknown}; known: {sorted(names)}")
    from inferplane.twin.emulator.server import EmulatorError, serve_emulator

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve_emulator(cfg, time_scale=time_scale, only=only, stop=stop)
        except EmulatorError as exc:  # a start-up refusal (a port in use, a missing key)
            fail(str(exc))

    _run_to_end(main)


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="seconds of traffic")] = 30.0,
    rate: Annotated[float, typer.Option(help="mean requests per second (open loop)")] = 6.0,
    seed: Annotated[int, typer.Option(help="workload seed")] = 1,
    time_scale: Annotated[float, typer.Option(help="emulated engine speed-up")] = 1.0,
    fleet: Annotated[
        Path | None, typer.Option(help="fleet file (default: the embedded hetero fleet)")
    ] = None,
) -> None:
    """Run the emulated hetero fleet, the gateway and a mixed workload; print a report."""
    logging.basicConfig(level="WARNING")
    from inferplane.demo import embedded_fleet, run_demo

    if fleet is not None:
        try:
            text, label = fleet.read_text("utf-8"), str(fleet)
        except OSError as exc:
            fail(f"cannot read {fleet}: {exc.strerror or exc}")
    else:
        text, label = embedded_fleet("hetero")
    loop = run_until_signal()
    task = loop.create_task(run_demo(duration, rate, seed, time_scale, text, label))
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        code = loop.run_until_complete(task)
    except asyncio.CancelledError:
        typer.echo("interrupted; everything stopped", err=True)
        code = 130
    except ConfigError as exc:
        fail(f"invalid configuration\n{exc}")
    except RuntimeError as exc:
        fail(str(exc), 1)
    finally:
        loop.close()
    raise typer.Exit(code)


@app.command()
def simulate(
    fleet: Annotated[Path, typer.Option("--fleet", help="fleet YAML file")],
    trace: Annotated[Path, typer.Option("--trace", help="trace file (Mooncake JSONL, Azure CSV)")],
    profile: Annotated[str, typer.Option("--profile", help="placement profile to replay with")],
    out: Annotated[
        Path | None, typer.Option("--json", help="also write the JSON report here")
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", help="mooncake | azure (default: by extension)")
    ] = None,
    rate_scale: Annotated[float, typer.Option(help="replay N times faster")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed of the mix and the pickers")] = 0,
    mix: Annotated[Path | None, typer.Option(help="YAML with a `mix:` list")] = None,
    duration: Annotated[
        float | None, typer.Option(help="replay the first S seconds of trace time")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="replay at most N requests")] = None,
    admission: Annotated[
        bool | None,
        typer.Option(
            "--admission/--no-admission",
            help="run the admission stage and batch lane (default: the fleet's admission.enabled)",
        ),
    ] = None,
    faults: Annotated[
        Path | None, typer.Option(help="YAML/JSON schedule of endpoint down/up/hung/429 events")
    ] = None,
) -> None:
    """Replay a trace through the gateway's pipeline against emulated engines (virtual clock)."""
    from inferplane.twin.simulator.report import print_report, write_json_atomic
    from inferplane.twin.simulator.simulator import SimulationError, run_simulation
    from inferplane.twin.traces.loader import TraceError

    try:
        report = run_simulation(
            fleet, trace, profile, format=format, rate_scale=rate_scale, seed=seed, mix=mix,
            duration_s=duration, limit=limit, admission=admission, faults=faults,
        )
    except ConfigError as exc:
        fail(f"invalid configuration\n{exc}")
    except (TraceError, SimulationError) as exc:
        fail(str(exc))
    if report["faults_applied"] < report["faults"]:
        typer.echo(f"warning: {report['faults'] - report['faults_applied']} of "
                   f"{report['faults']} faults were scheduled after the replayed slice ended "
                   "and were not applied (their `at` is in virtual seconds after the first "
                   "arrival)", err=True)
    if out is not None:
        try:
            write_json_atomic(out, report)
        except OSError as exc:
            fail(f"cannot write {out}: {exc.strerror or exc}")
    print_report(report)


def _int_list(text: str, what: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        fail(f"{what}: expected comma-separated integers, got {text!r}")
    if not out or min(out) <= 0:
        fail(f"{what}: expected positive integers, got {text!r}")
    return out


@app.command()
def calibrate(
    endpoint: Annotated[str, typer.Option("--endpoint", help="engine base URL (OpenAI API)")],
    model: Annotated[str, typer.Option("--model", help="model name the engine serves")],
    out: Annotated[Path, typer.Option("--out", "-o", help="profile file to write (YAML)")],
    model_profile: Annotated[
        str | None, typer.Option(help="physics model profile (default: --model)")
    ] = None,
    base: Annotated[str, typer.Option(help="table hardware profile to start from")] = "cpu",
    name: Annotated[
        str | None, typer.Option(help="name of the calibrated profile (default: BASE-calibrated)")
    ] = None,
    tp: Annotated[int, typer.Option(help="tensor-parallel degree of the engine")] = 1,
    precision: Annotated[str, typer.Option(help="weight precision the engine runs")] = "bf16",
    prompt_tokens: Annotated[
        str, typer.Option(help="prefill sweep: prompt lengths in tokens")
    ] = "16,64,128,256,512,768",
    batches: Annotated[str, typer.Option(help="decode sweep: concurrent streams")] = "1,2,4",
    bursts: Annotated[
        str, typer.Option(help="front-end sweep: one-token requests sent at once")
    ] = "4",
    decode_tokens: Annotated[int, typer.Option(help="tokens per decode stream")] = 64,
    repeats: Annotated[int, typer.Option(
        help="probe rounds: tries per point, the median kept (the prefill points: "
        "--prefill-visits tries a round)")] = 5,
    prefill_visits: Annotated[int, typer.Option(
        min=1, help="prefill sweeps a round, evenly spaced through it: each prefill and cached "
        "point of --repeats x this many tries")] = 3,
    sweep_stream_tokens: Annotated[int, typer.Option(
        min=1, help="opt-in: >1 sends every cold prefill try right after a stream of this many "
        "tokens, as a closed-loop workload's requests (docs/physics.md); 1: after a one-token "
        "request")] = 1,
    after_stream_tokens: Annotated[int, typer.Option(
        min=0, help="each prefill point again right after an untimed stream of this many "
        "tokens, fitted into the profile's after_stream_s and after_stream_factor (what a "
        "prefill costs more after the engine decoded; docs/physics.md); 0 skips the tries and "
        "writes neither (a file readers older than the fields load)")] = 32,
    api_key_env: Annotated[
        str | None, typer.Option(help="environment variable holding the engine's API key")
    ] = None,
    speed_spread: Annotated[
        bool, typer.Option(help="keep the engine's speed spread the probe sampled in the profile "
                           "(the emulator plays it back; docs/physics.md)")
    ] = True,
    idle_wake: Annotated[
        bool, typer.Option(help="measure the engine's wake-from-idle cost (a few idle tries a "
                           "round) into the profile's idle_wake_s; --no-idle-wake skips the "
                           "tries and writes no idle_wake_s (a file readers older than the "
                           "field load; docs/physics.md)")
    ] = True,
) -> None:
    """Probe a live engine and fit a hardware profile to it (see docs/physics.md)."""
    from urllib.parse import urlsplit

    from inferplane.physics.errors import UnknownProfileError
    from inferplane.physics.probe import IDLE_TRIES, ProbeError, calibrate_endpoint

    if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).netloc:
        fail(f"--endpoint: expected the engine's http:// or https:// base URL, got {endpoint!r}")
    if after_stream_tokens == 1:
        fail("--after-stream-tokens: 0 (no after-stream tries) or 2 or more: a one-token "
             "request streams nothing")
    key = None
    if api_key_env is not None:
        key = os.environ.get(api_key_env)
        if not key:
            fail(f"--api-key-env: the environment variable {api_key_env} is not set")
    try:
        text, summary = asyncio.run(
            calibrate_endpoint(
                endpoint, model, model_profile=model_profile or model, base=base,
                name=name or f"{base}-calibrated", tp=tp, precision=precision,
                prompt_tokens=_int_list(prompt_tokens, "--prompt-tokens"),
                batches=_int_list(batches, "--batches"),
                bursts=_int_list(bursts, "--bursts"), decode_tokens=decode_tokens,
                repeats=repeats, api_key=key, keep_speed_spread=speed_spread,
                prefill_visits=prefill_visits, idle_tries=IDLE_TRIES if idle_wake else 0,
                sweep_stream_tokens=sweep_stream_tokens,
                after_stream_tokens=after_stream_tokens,
            )
        )
    except UnknownProfileError as exc:
        hint = ""
        if exc.kind == "model" and model_profile is None:
            hint = ("; --model is the name the engine serves, and the profile defaults to it: "
                    "give --model-profile with the known model this engine runs")
        elif exc.kind == "hardware":
            hint = "; --base names the table hardware profile to start from"
        fail(f"{exc}{hint}")
    except (ProbeError, ValueError, LookupError) as exc:
        fail(str(exc))
    except OSError as exc:  # aiohttp's connection errors are OSErrors
        fail(f"cannot reach {endpoint}: {exc}")
    try:
        out.write_text(text)
    except OSError as exc:
        fail(f"cannot write {out}: {exc.strerror or exc}")
    typer.echo(summary)
    typer.echo(f"wrote {out}")


@app.command()
def economics(
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="fleet YAML file: pools, prices, bands "
                                  "and its configured ledger")
    ] = None,
    ledger: LedgerOpt = None,
    since: Annotated[str | None, typer.Option(help="from (unix seconds or ISO 8601; default: "
                                              "economics.window_days ago)")] = None,
    until: Annotated[str | None, typer.Option(help="before (default: now)")] = None,
    as_json: Annotated[Path | None, typer.Option("--json", help="write the report as JSON")] = None,
    prometheus: Annotated[
        bool, typer.Option("--prometheus", help="print the gauges in Prometheus text format")
    ] = False,
    report: Annotated[
        Path | None, typer.Option(help="what-if: an `inferplane simulate` report (before)")
    ] = None,
    against: Annotated[
        Path | None, typer.Option(help="what-if: the report of the changed fleet (after)")
    ] = None,
) -> None:
    """Placement economics from the ledger, or a what-if between two simulations
    (docs/economics.md)."""
    if report is not None or against is not None:
        from inferplane.economics.whatif import compare

        if report is None or against is None:
            fail("a what-if needs both --report BEFORE.json and --against AFTER.json")
        docs = []
        for path in (report, against):
            try:
                docs.append(json.loads(path.read_text("utf-8")))
            except (OSError, ValueError) as exc:
                fail(f"{path}: {getattr(exc, 'strerror', None) or exc}")
            if not isinstance(docs[-1], dict) or "requests" not in docs[-1]:
                fail(f"{path}: not an `inferplane simulate` report")
        typer.echo("\n".join(compare(docs[0], docs[1])))
        return
    from prometheus_client import CollectorRegistry, generate_latest

    from inferplane.economics.render import EconomicsCollector, from_ledger, lines
    from inferplane.ledger.query import BadQuery, parse_time
    from inferplane.ledger.tools import Source, SourceError, source_from_config

    if config is None:
        fail("give the fleet file with --config (its pools, prices and ledger)")
    fleet_config = load_checked(config)
    try:
        source = (Source(sqlite_path=str(ledger)) if ledger is not None
                  else source_from_config(fleet_config, str(config)))
        start = parse_time(since, "--since") if since else None
        end = parse_time(until, "--until") if until else None
        rep = from_ledger(fleet_config, source, since=start, until=end)
    except (SourceError, BadQuery, ValueError) as exc:
        fail(str(exc))
    if as_json is not None:
        write_out(as_json, json.dumps(rep.to_json(), indent=2) + "\n")
    if prometheus:
        registry = CollectorRegistry()
        collector = EconomicsCollector()
        collector.report = rep
        registry.register(collector)
        typer.echo(generate_latest(registry).decode(), nl=False)
        return
    typer.echo("\n".join(lines(rep)))


def main() -> None:
    # The gateway encodes one prompt at a time on its event loop: the tokenizers library's
    # thread pool would only add a hop (`tokenization.encode`). Set before any thread starts;
    # an environment that has the variable keeps its own setting.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
