"""Suite-wide hooks.

``INFERPLANE_REQUIRE_SERVICES=1`` (set by ``.ci/run``): a test that would skip because
PostgreSQL or Redis is absent fails instead, so a CI machine without them cannot pass by
skipping the tests of the shared ledger, the batch lane's claims or the Redis admission store.
Without it (a laptop), those tests skip with the reason.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

#: the reasons the suite's own service checks give when a service is absent
SERVICE_ABSENT = ("no PostgreSQL at", "Redis not reachable at", "redis-server is not installed")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[Any]) -> Generator[Any]:
    outcome = yield
    rep = outcome.get_result()
    if not rep.skipped or os.environ.get("INFERPLANE_REQUIRE_SERVICES") != "1":
        return
    reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
    if any(s in reason for s in SERVICE_ABSENT):
        rep.outcome = "failed"
        rep.longrepr = f"INFERPLANE_REQUIRE_SERVICES=1, and a service this test needs: {reason}"
