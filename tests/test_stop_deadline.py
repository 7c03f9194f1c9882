"""A gateway process's shutdown is bounded (`gateway.shutdown_timeout_s`, `cli.stop_deadline`):
past the deadline it names the step of `Core.stop` under way and exits with status 1, instead of
hanging — as a worker of `serve --workers 2` was once seen to do for 40 minutes after SIGTERM."""

from __future__ import annotations

import asyncio
import threading

import pytest

from inferplane.cli import stop_deadline
from inferplane.config.schema import GatewaySpec
from tests.builders import MINIMAL_YAML


def test_a_stop_past_its_deadline_names_the_step_and_exits_1(
    capsys: pytest.CaptureFixture[str],
) -> None:
    codes: list[int] = []
    gave_up = threading.Event()

    def quit_process(code: int) -> None:  # stands in for os._exit
        codes.append(code)
        gave_up.set()

    with stop_deadline(0.05, lambda: "requests in flight", quit_process=quit_process):
        assert gave_up.wait(10)  # a stop stuck for longer than the deadline
    assert codes == [1]
    err = capsys.readouterr().err
    assert "did not stop within 0.05 s (gateway.shutdown_timeout_s)" in err
    assert "stuck in: requests in flight" in err


def test_before_the_gateways_own_steps_the_line_says_so(
    capsys: pytest.CaptureFixture[str],
) -> None:
    gave_up = threading.Event()
    with stop_deadline(0.05, lambda: None, quit_process=lambda _c: gave_up.set()):
        assert gave_up.wait(10)
    assert "stuck in: closing connections, the metrics listener or the batch worker" in (
        capsys.readouterr().err)


def test_a_stop_within_its_deadline_does_not_exit() -> None:
    codes: list[int] = []
    with stop_deadline(0.2, lambda: None, quit_process=codes.append):
        pass
    threading.Event().wait(0.4)  # past the deadline: the timer was cancelled
    assert codes == []


def test_the_deadline_is_a_gateway_setting() -> None:
    assert GatewaySpec().shutdown_timeout_s == 120.0
    with pytest.raises(ValueError):  # not within aiohttp's 60 s grace for requests in flight
        GatewaySpec(shutdown_timeout_s=60)
    assert GatewaySpec(shutdown_timeout_s=90).shutdown_timeout_s == 90


async def test_core_stop_says_which_step_is_under_way() -> None:
    from inferplane.api.pipeline import Gateway
    from tests.builders import config

    gw = Gateway(config(MINIMAL_YAML))
    assert gw.stopping is None
    seen: list[str | None] = []
    entered = asyncio.Event()
    release = asyncio.Event()

    async def ledger_close() -> None:
        seen.append(gw.stopping)
        entered.set()
        await release.wait()  # a ledger that does not close

    gw.ledger.close = ledger_close  # type: ignore[method-assign]
    stop = asyncio.create_task(gw.stop())
    await asyncio.wait_for(entered.wait(), 10)
    assert gw.stopping == "ledger"  # what the deadline's line would name
    release.set()
    await stop
    assert seen == ["ledger"] and gw.stopping == "stopped"
