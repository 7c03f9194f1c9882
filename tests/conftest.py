"""Suite-wide hooks.

``INFERPLANE_REQUIRE_SERVICES=1`` (set by ``.ci/run``): a test that would skip because
PostgreSQL or Redis is absent fails instead, so a CI machine without them cannot pass by
skipping the tests of the shared ledger, the batch lane's claims or the Redis admission store.
Without it (a laptop), those tests skip with the reason.

``INFERPLANE_REQUIRE_NATIVE=1`` (set by ``.ci/run`` too): likewise for the tests that need a current
compiled build (``tests/test_compiled.py``), so a compile that breaks in CI cannot pass by
skipping the test that holds compiled and pure Python to the same decisions.
"""

from __future__ import annotations

import os
from collections.abc import Generator, Mapping
from typing import Any

import pytest

#: the reasons the suite's own service checks give when a service is absent
SERVICE_ABSENT = ("no PostgreSQL at", "Redis not reachable at", "redis-server is not installed")
#: the start of tests/test_compiled.py's skip reason where no current compiled build exists
NATIVE_ABSENT = "no current compiled build here"


def required_but_skipped(reason: str, env: Mapping[str, str]) -> str | None:
    """Why a skip with ``reason`` is a failure under ``env`` (module docstring), or None."""
    if env.get("INFERPLANE_REQUIRE_SERVICES") == "1" and any(s in reason for s in SERVICE_ABSENT):
        return f"INFERPLANE_REQUIRE_SERVICES=1, and a service this test needs: {reason}"
    if env.get("INFERPLANE_REQUIRE_NATIVE") == "1" and NATIVE_ABSENT in reason:
        return f"INFERPLANE_REQUIRE_NATIVE=1, and {reason}"
    return None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[Any]:
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped:
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    why = required_but_skipped(reason, os.environ)
    if why is not None:
        rep.outcome = "failed"
        rep.longrepr = why
