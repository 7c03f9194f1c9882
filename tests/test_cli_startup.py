"""What `serve` refuses at start, `inferplane check` reports (audit26 S8, S9), and the CLI's
own refusals are one line, never a traceback, with exit status 2 (S10, S11, N1, N7, N8):
out-of-range ports, an unwritable ``-o``, an unknown ``--log-level``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from inferplane.cli import app
from tests.builders import pool_fleet, to_yaml
from tests.support.procs import free_port


@pytest.fixture(autouse=True)
def _never_serve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every `serve`, `epp` and `emulate` here must be refused before it serves: one that
    starts (a refusal under test that regressed) fails at once instead of waiting for a signal
    that never comes."""
    import inferplane.twin.emulator.server as emulator

    async def started(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("it started serving: the refusal under test did not happen")

    monkeypatch.setattr("inferplane.cli._wait_for_signal", started)
    monkeypatch.setattr(emulator, "serve_emulator", started)


def _fleet(tmp_path: Path, **sections: Any) -> Path:
    gateway = {"port": free_port(), **sections.pop("gateway", {})}
    path = tmp_path / "fleet.yaml"
    path.write_text(to_yaml(pool_fleet(9001, gateway=gateway, key="sk-cli", **sections)))
    return path


def _run(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.exception)
    return result


# -- check runs serve's start-up checks (S8, S9) -----------------------------------------------

NOT_A_KEY = "not a key\n"


def _case(tmp_path: Path, name: str) -> tuple[dict[str, Any], str, str]:
    """(fleet sections, the field named, words of the problem) of one thing serve refuses."""
    missing = tmp_path / "no-such-dir"
    if name == "ledger_path":
        return ({"gateway": {"ledger_path": str(missing / "l.sqlite")}}, "gateway.ledger_path",
                f"the directory '{missing}' does not exist")
    if name == "signing_key_file":
        return ({"ledger": {"signing_key_file": str(missing / "k.pem")}},
                "ledger.signing_key_file", "No such file or directory")
    if name == "signing_key_not_a_key":
        key = tmp_path / "k.pem"
        key.write_text(NOT_A_KEY)
        return ({"ledger": {"signing_key_file": str(key)}}, "ledger.signing_key_file",
                "not an Ed25519 private key")
    if name == "signing_key_env":
        return ({"ledger": {"signing_key_env": "HARDEN26B_UNSET_KEY"}},
                "ledger.signing_key_env", "$HARDEN26B_UNSET_KEY is not set")
    if name == "postgres_dsn_env":
        return ({"ledger": {"postgres_dsn_env": "HARDEN26B_UNSET_DSN"}},
                "ledger.postgres_dsn_env", "$HARDEN26B_UNSET_DSN is not set")
    if name == "batch_path":
        return ({"batch": {"path": str(missing / "b.sqlite")}}, "batch.path",
                f"{missing / 'b.sqlite'}: the directory '{missing}' does not exist")
    if name == "admission_path":  # harden27: a typo must not start an empty budget store
        return ({"admission": {"path": str(missing / "a.sqlite")}}, "admission.path",
                f"{missing / 'a.sqlite'}: the directory '{missing}' does not exist")
    if name == "journal_path":
        return ({"admission": {"store": "redis", "journal_path": str(missing / "j.sqlite")}},
                "admission.journal_path",
                f"{missing / 'j.sqlite'}: the directory '{missing}' does not exist")
    assert name == "batch_dsn_env"
    return ({"batch": {"postgres_dsn_env": "HARDEN26B_UNSET_DSN"}}, "batch.postgres_dsn_env",
            "$HARDEN26B_UNSET_DSN is not set")


CASES = ["ledger_path", "signing_key_file", "signing_key_not_a_key", "signing_key_env",
         "postgres_dsn_env", "batch_path", "batch_dsn_env", "admission_path", "journal_path"]


@pytest.mark.parametrize("name", CASES)
def test_check_names_what_serve_refuses_and_strict_fails_on_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delenv("HARDEN26B_UNSET_KEY", raising=False)
    monkeypatch.delenv("HARDEN26B_UNSET_DSN", raising=False)
    sections, field, words = _case(tmp_path, name)
    path = _fleet(tmp_path, **sections)
    serve = _run("serve", "-c", str(path), "--log-level", "error")
    assert serve.exit_code == 2, serve.output
    assert f"{path}: {field}: " in serve.output and words in serve.output, serve.output
    assert not (tmp_path / "no-such-dir").exists()  # nothing created where the typo points

    check = _run("check", "-c", str(path))
    assert check.exit_code == 0, check.output  # the file is valid; this environment is not
    notes = [ln for ln in check.output.splitlines() if ln.startswith("note: ")]
    assert len(notes) == 1, notes  # one cause, one note (the batch file derives from the ledger's)
    line = notes[0]
    assert line.startswith(f"note: {path}: {field}"), line
    assert words in line and "`serve` refuses to start on it" in line, line

    strict = _run("check", "--strict", "-c", str(path))
    assert strict.exit_code == 2, strict.output
    assert f"{path}: {field}: " in strict.output and words in strict.output
    assert ": ok (" not in strict.output


def test_check_creates_nothing(tmp_path: Path) -> None:
    path = _fleet(tmp_path, gateway={"ledger_path": str(tmp_path / "l.sqlite")})
    before = sorted(tmp_path.iterdir())
    check = _run("check", "--strict", "-c", str(path))
    assert check.exit_code == 0, check.output
    assert "note:" not in check.output
    assert sorted(tmp_path.iterdir()) == before


@pytest.mark.parametrize("ledger", ["sqlite", "memory"])
def test_check_notes_a_spool_path_the_ledger_ignores(tmp_path: Path, ledger: str) -> None:
    """``ledger.spool_path`` is used only by a PostgreSQL ledger: with a SQLite (or in-memory)
    ledger `check` says it is ignored (it said nothing before edge28); `--strict` still
    passes (nothing is refused)."""
    gateway = {"ledger_path": str(tmp_path / "l.sqlite")} if ledger == "sqlite" else {}
    path = _fleet(tmp_path, gateway=gateway,
                  ledger={"spool_path": str(tmp_path / "spool.sqlite")})
    check = _run("check", "--strict", "-c", str(path))
    assert check.exit_code == 0, check.output
    notes = [ln for ln in check.output.splitlines() if ln.startswith("note: ")]
    kind = "SQLite (gateway.ledger_path)" if ledger == "sqlite" else "in memory"
    assert len(notes) == 1 and notes[0].startswith(
        f"note: {path}: ledger.spool_path: ignored: the ledger is {kind}"), notes
    assert "only a PostgreSQL ledger" in notes[0]


def test_a_batch_path_that_is_not_a_database_is_named_with_exit_2(tmp_path: Path) -> None:
    junk = tmp_path / "b.sqlite"
    junk.write_bytes(b"this is not an SQLite file, just some bytes long enough" * 40)
    path = _fleet(tmp_path, batch={"path": str(junk)})
    serve = _run("serve", "-c", str(path), "--log-level", "error")
    assert serve.exit_code == 2, serve.output
    assert f"{path}: batch.path: {junk}: cannot use as a batch store" in serve.output


# -- ports (S10) -------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["serve", "--port", "70000"], ["epp", "--port", "70000"],
    ["envoy-config", "--envoy-port", "70000"], ["envoy-config", "--epp-port", "99999"],
    ["envoy-config", "--admin-port", "65536"], ["envoy-config", "--epp-port", "0"],
], ids=["serve", "epp", "envoy-port", "epp-port", "admin-port", "epp-port-0"])
def test_an_out_of_range_port_option_is_refused(tmp_path: Path, args: list[str]) -> None:
    path = _fleet(tmp_path)
    result = _run(*args, "-c", str(path), *(["-o", str(tmp_path / "e.yaml")]
                                            if args[0] == "envoy-config" else []))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{args[1]}'" in result.output
    assert not (tmp_path / "e.yaml").exists()


@pytest.mark.parametrize(("sections", "field"), [
    ({"endpoint_fields": {"url": "http://127.0.0.1:99999"}}, "substrates[0].endpoints[0].url"),
    ({"endpoint_fields": {"url": "http://127.0.0.1:0/v1"}}, "substrates[0].endpoints[0].url"),
    ({"admission": {"store": "redis", "redis_url": "redis://:pw@127.0.0.1:70000/0"}},
     "admission.redis_url"),
    ({"telemetry": {"endpoint": "http://127.0.0.1:65536"}}, "telemetry.endpoint"),
], ids=["endpoint", "endpoint-0", "redis", "otlp"])
def test_a_url_with_an_out_of_range_port_is_a_config_error(
    tmp_path: Path, sections: dict[str, Any], field: str
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(to_yaml(pool_fleet(None if "endpoint_fields" in sections else 9001,
                                       **sections)))
    result = _run("check", "-c", str(path))
    assert result.exit_code == 2, result.output
    assert f"{path}: {field}: Value error, the port must be a number from 1 to 65535" in (
        result.output)
    assert ":pw@" not in result.output  # a URL's password is never quoted


# -- -o, --log-level, help (S11, N1, N8) -----------------------------------------------------


@pytest.mark.parametrize("command", [["envoy-config"], ["schema"], ["openapi"]])
def test_an_unwritable_output_is_one_line_with_exit_2(
    tmp_path: Path, command: list[str]
) -> None:
    out = tmp_path / "missing" / "x.out"
    args = [*command, "-o", str(out)]
    if command[0] != "schema":
        args += ["-c", str(_fleet(tmp_path))]
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == f"error: {out}: No such file or directory"


@pytest.mark.parametrize("command", ["serve", "epp", "emulate"])
def test_an_unknown_log_level_is_a_usage_error(tmp_path: Path, command: str) -> None:
    result = _run(command, "-c", str(_fleet(tmp_path)), "--log-level", "loud")
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--log-level'" in result.output


def test_a_known_log_level_in_any_case_is_taken() -> None:
    from inferplane.cli import _log_level

    assert _log_level("DEBUG") == "debug"


@pytest.mark.parametrize("command", ["serve", "check"])
def test_flags_show_no_value_in_help(command: str) -> None:
    result = _run(command, "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    assert "--help" in result.output


# -- no silent example fleet, no published keys beyond loopback (audit29 #6) ------------------


@pytest.mark.parametrize("command", ["serve", "epp"])
def test_serving_needs_a_config(command: str) -> None:
    result = _run(command, "--port", str(free_port()))
    assert result.exit_code == 2 and "Missing option '--config'" in result.output


@pytest.mark.parametrize(("command", "host"), [
    ("serve", "0.0.0.0"), ("serve", "::"), ("serve", "10.1.2.3"), ("serve", "gw.example"),
    ("epp", "0.0.0.0"),
])
def test_published_example_keys_are_refused_beyond_loopback(
    tmp_path: Path, command: str, host: str
) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(to_yaml(pool_fleet(9001, gateway={"port": free_port()},
                                       key="sk-quickstart-acme")))
    result = _run(command, "-c", str(path), "--host", host, "--port", str(free_port()))
    assert result.exit_code == 2, result.output
    assert f"refusing to listen on {host!r}" in result.output
    assert "'sk-quickstart-acme'" in result.output and "hash-key" in result.output


def test_the_quickstart_keys_are_published_ones() -> None:
    """README's quickstart is served on loopback only; its keys are in the refused set."""
    from inferplane.cli import PUBLISHED_KEYS, _is_loopback
    from inferplane.config.loader import load_config
    from inferplane.core.plane import hash_key

    root = Path(__file__).resolve().parent.parent
    cfg = load_config(root / "examples" / "quickstart.yaml")
    assert cfg.gateway.host == "127.0.0.1"
    published = {hash_key(k) for k in PUBLISHED_KEYS}
    assert {h for t in cfg.tenants for h in t.api_keys} <= published
    assert all(_is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2"))
    assert not any(_is_loopback(h) for h in ("0.0.0.0", "::", "", "10.0.0.1", "gw.example"))


def test_every_shipped_key_whose_plaintext_the_repo_prints_is_refused() -> None:
    """Any tenant hash in a shipped fleet (examples/, the package's fleets, deploy/) whose
    ``sk-`` plaintext appears anywhere in the repo is in `PUBLISHED_KEYS`, so a new demo fleet
    cannot drift from the list (review29-fix29a nit 9)."""
    import hashlib
    import re

    from inferplane.cli import PUBLISHED_KEYS

    root = Path(__file__).resolve().parent.parent
    texts = {".md", ".py", ".yaml", ".yml", ".json", ".txt", ".sh", ".toml", ".html"}
    plain: set[str] = set()
    for top in ("README.md", "docs", "examples", "src", "deploy", "bench", "tests", "scripts"):
        path = root / top
        files = [path] if path.is_file() else [
            f for f in path.rglob("*") if f.is_file() and f.suffix in texts]
        for f in files:
            plain.update(re.findall(r"sk-[A-Za-z0-9_-]+", f.read_text(errors="ignore")))
    by_hash = {"sha256:" + hashlib.sha256(k.encode()).hexdigest(): k for k in plain}
    fleets = [*(root / "examples").rglob("*.yaml"), *(root / "deploy").rglob("*.yaml"),
              *(root / "src" / "inferplane" / "data" / "fleets").glob("*.yaml")]
    shipped = {by_hash[h] for f in fleets
               for h in re.findall(r"sha256:[0-9a-f]{64}", f.read_text()) if h in by_hash}
    assert len(shipped) >= 6 and shipped <= set(PUBLISHED_KEYS)


def test_openapi_without_a_config_describes_the_embedded_fleet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # outside a checkout: no examples/quickstart.yaml to fall back on
    result = _run("openapi", "-o", str(tmp_path / "o.json"))
    assert result.exit_code == 0, result.output
    assert '"/v1/chat/completions"' in (tmp_path / "o.json").read_text()


def test_emulate_refusing_to_start_exits_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A port in use (or a missing key) is a start-up refusal: status 2, as for serve (audit29
    nit 10; it was 1)."""
    import inferplane.twin.emulator.server as emulator

    async def taken(*args: Any, **kwargs: Any) -> None:
        raise emulator.EmulatorError("endpoint 'e-0': cannot listen on 127.0.0.1:1: in use")

    monkeypatch.setattr(emulator, "serve_emulator", taken)
    result = _run("emulate", "-c", str(_fleet(tmp_path)))
    assert result.exit_code == 2, result.output
    assert "cannot listen on 127.0.0.1:1" in result.output
