"""Gateway RSS around a large batch upload (issue 12 item 3), this tree against a baseline tree.

Starts a fake upstream and, for each source tree, a gateway process (file-backed ledger, so the
batch store is a SQLite file), uploads a valid JSONL file of ``--mb`` megabytes ``--uploads``
times to ``POST /v1/files`` and reads the gateway's VmRSS from /proc before, right after and
``--settle`` seconds after. Prints one row per tree.

    python bench/upload_rss.py --baseline /path/to/old/checkout/src --mb 90
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from tests.builders import model, pool_fleet, tenant, to_yaml  # noqa: E402
from tests.support.procs import free_port  # noqa: E402

KEY = "sk-bench-upload"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def jsonl(mb: int) -> bytes:
    line = (b'{"custom_id": "c%08d", "method": "POST", "url": "/v1/chat/completions", "body": '
            b'{"model": "m", "messages": [{"role": "user", "content": "' + b"x" * 400 + b'"}]}}\n')
    n = mb * 1024 * 1024 // len(line % 0)
    return b"".join(line % i for i in range(n))


def run(src: Path, data: bytes, uploads: int, settle: float, up_port: int) -> list[float]:
    tmp = Path(tempfile.mkdtemp(prefix="upload-rss-"))
    port = free_port()
    (tmp / "fleet.yaml").write_text(to_yaml(pool_fleet(
        up_port, substrate={"cost": {"hourly_usd": 1.0}}, models=[model(max_context=4096)],
        endpoint_fields={"name": "up"},
        gateway={"port": port, "ledger_path": str(tmp / "ledger.sqlite")},
        batch={"max_file_bytes": len(data) + 1024, "max_lines": 10000000},
        tenants=[tenant("a", KEY)])))
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
    gw = subprocess.Popen([sys.executable, "-m", "inferplane.cli", "serve", "--config",
                           str(tmp / "fleet.yaml"), "--log-level", "warning"], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(f"{base}/health", timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        time.sleep(1.0)
        out = [rss_mb(gw.pid)]
        for _ in range(uploads):
            r = httpx.post(f"{base}/v1/files", headers={"Authorization": f"Bearer {KEY}"},
                           files={"file": ("in.jsonl", data)}, data={"purpose": "batch"},
                           timeout=600)
            assert r.status_code == 200, r.text[:300]
            out.append(rss_mb(gw.pid))
        time.sleep(settle)
        out.append(rss_mb(gw.pid))
        return out
    finally:
        gw.terminate()
        gw.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", type=Path, help="src/ of the tree to compare with")
    ap.add_argument("--mb", type=int, default=90)
    ap.add_argument("--uploads", type=int, default=2)
    ap.add_argument("--settle", type=float, default=3.0)
    args = ap.parse_args()
    data = jsonl(args.mb)
    up_port = free_port()
    up = subprocess.Popen([sys.executable, "-m", "tests.support.fake_upstream", "--port",
                           str(up_port), "--mode", "ok"], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        trees = [("this tree", ROOT / "src")]
        if args.baseline is not None:
            trees.insert(0, ("baseline", args.baseline))
        print(f"upload: {len(data) / 2**20:.0f} MB JSONL x {args.uploads}")
        print(f"{'tree':<10} {'RSS before':>10} " + " ".join(
            f"{'after ' + str(i + 1):>9}" for i in range(args.uploads)) +
            f" {'settled':>8} {'growth':>7}")
        for name, src in trees:
            rss = run(src, data, args.uploads, args.settle, up_port)
            print(f"{name:<10} {rss[0]:>9.0f}M " + " ".join(f"{v:>8.0f}M" for v in rss[1:-1])
                  + f" {rss[-1]:>7.0f}M {rss[-1] - rss[0]:>+6.0f}M")
    finally:
        up.terminate()
        up.wait(10)


if __name__ == "__main__":
    main()
