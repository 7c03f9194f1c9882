"""Issue 12 item 11: a request whose client leaves while it waits in the admission queue (its
endpoint saturated) still gets a record: status 499, the reason, no pick."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.builders import model, pool_fleet, to_yaml
from tests.support.procs import Proc, free_port

KEY = "sk-queued"


def test_a_request_abandoned_in_the_queue_has_a_499_record(tmp_path: Path) -> None:
    up_port, gw_port = free_port(), free_port()
    up = Proc(["-m", "tests.support.fake_upstream", "--port", str(up_port), "--mode",
               "slowjson"], tmp_path / "up.log")
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(to_yaml(pool_fleet(
        up_port,
        gateway={"port": gw_port, "scrape_interval_s": 0.05, "ledger_path": str(tmp_path / "l.db")},
        admission={"store": "memory"},
        substrate={"cost": {"hourly_usd": 3.0}},
        endpoint_fields={"name": "up", "engine": "vllm", "max_concurrency": 1},
        models=[model(max_context=4096)],
        key=KEY,
    )))
    gw = Proc(["-m", "inferplane.cli", "serve", "--config", str(cfg)], tmp_path / "gw.log")
    base = f"http://127.0.0.1:{gw_port}"
    h = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
    try:
        up.wait_http(f"http://127.0.0.1:{up_port}/health")
        gw.wait_http(f"{base}/ready")
        since = time.time()
        # the first request holds the only slot for ~1 s; the second waits in the queue and
        # its client gives up after 0.3 s
        first = threading.Thread(target=lambda: httpx.post(
            f"{base}/v1/chat/completions", json=body, headers=h, timeout=10))
        first.start()
        time.sleep(0.2)
        other = {**body, "messages": [{"role": "user", "content": "another question"}]}
        with pytest.raises(httpx.ReadTimeout):  # (a different body: not taken for a retry)
            httpx.post(f"{base}/v1/chat/completions", json=other, headers=h, timeout=0.3)
        first.join(10)
        recs: list[dict[str, object]] = []
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            page = httpx.get(f"{base}/v1/decisions", params={"since": since}, headers=h).json()
            recs = [it["record"] for it in page["data"]]
            if len(recs) >= 2:
                break
            time.sleep(0.1)
    finally:
        gw.stop()
        up.stop()
    outcomes = sorted((r["outcome"]["status"], r["outcome"]["error"], r["picked"])  # type: ignore[index]
                      for r in recs)
    assert outcomes == [(200, None, outcomes[0][2]),
                        (499, "client disconnected while queued for admission", None)], outcomes
