"""Fixtures of the fidelity tier: one real vLLM (CPU build) and one emulated engine, alike.

Both engines are configured the same way (:data:`BLOCK_SIZE`, :data:`MAX_NUM_SEQS`,
:data:`NUM_GPU_BLOCKS`, :data:`MAX_MODEL_LEN`, :data:`MAX_BATCHED_TOKENS`, prefix caching on,
ZMQ KV events on) and serve the same model name, ``tiny-llama``: the real one a random
2-layer Llama built by ``scripts/fidelity/build_tiny_model.py``, the emulated one the
``tiny-llama`` physics profile on the ``cpu`` hardware profile.

The real engine runs from ``.fidelity-venv`` (``scripts/fidelity/setup.sh``); without it every
fidelity test skips, naming the script. ``FIDELITY_VENV`` points elsewhere. vLLM's log goes to
``out/fidelity/vllm.log``; what the tests find (names only one side exports, key differences)
is printed at the end of the run and written to ``out/fidelity/report.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq

from inferplane.config.loader import parse_config
from inferplane.twin.emulator.server import EmulatorHandle, start_emulator
from tests.builders import model, pool_fleet, to_yaml

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("FIDELITY_VENV", ROOT / ".fidelity-venv"))
VENV_PYTHON = VENV / "bin" / "python"
OUT = ROOT / "out" / "fidelity"
MODEL_DIR = VENV / "tiny-llama"  # built once, kept inside the (git-ignored) venv

MODEL = "tiny-llama"
BLOCK_SIZE = 32
MAX_NUM_SEQS = 4
NUM_GPU_BLOCKS = 64
MAX_MODEL_LEN = 1024
MAX_BATCHED_TOKENS = 2048
TIME_SCALE = 2.0
"""Emulator time scale. The ``cpu`` profile's tiny-llama steps take ~5 ms of engine time,
about what the real engine takes here, so this keeps both engines' requests in flight long
enough to be seen on ``/metrics`` while making the emulated half quick."""
VLLM_START_TIMEOUT_S = float(os.environ.get("FIDELITY_START_TIMEOUT_S", "300"))

REPORT: dict[str, Any] = {}
"""Findings that are information, not failures; printed and written at the end of the run."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class KVSubscriber:
    """A ZMQ SUB socket on an engine's KV-event publisher, read by a background thread.

    Keeps every multipart message as it came (frames untouched), so tests can check the
    framing and decode the payloads themselves. ``bind``: bind the SUB socket and let the
    publisher connect (how vLLM treats a non-wildcard endpoint such as ``tcp://127.0.0.1:P``).
    """

    endpoint: str
    bind: bool = False
    messages: list[list[bytes]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        ready.wait(5)

    def _run(self, ready: threading.Event) -> None:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        if self.bind:
            sock.bind(self.endpoint)
        else:
            sock.connect(self.endpoint)
        ready.set()
        try:
            while not self._stop.is_set():
                if sock.poll(50):
                    frames = sock.recv_multipart()
                    with self._lock:
                        self.messages.append(frames)
        finally:
            sock.close(0)
            ctx.term()

    def mark(self) -> int:
        with self._lock:
            return len(self.messages)

    def since(self, mark: int) -> list[list[bytes]]:
        with self._lock:
            return list(self.messages[mark:])

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


@dataclass
class EngineUnderTest:
    """One engine as the tests see it: its base URL and its KV-event subscriber."""

    name: str
    url: str
    kv: KVSubscriber
    pid: int | None = None  # the process serving ``url`` when a fixture started it

    def metrics(self) -> str:
        r = httpx.get(f"{self.url}/metrics", timeout=10)
        r.raise_for_status()
        return r.text

    def post(self, path: str, body: dict[str, Any] | None = None, timeout: float = 120) -> Any:
        r = httpx.post(f"{self.url}{path}", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json() if r.content else None

    def reset_prefix_cache(self) -> None:
        """Reset the prefix cache, retrying while the engine is still finishing requests."""
        deadline = time.monotonic() + 30
        while True:
            r = httpx.post(f"{self.url}/reset_prefix_cache", timeout=10)
            if r.status_code == 200:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: reset_prefix_cache -> {r.status_code} {r.text}")
            time.sleep(0.2)


# -- the real engine ---------------------------------------------------------------------------


def _vllm_ready_or_skip() -> None:
    if not VENV_PYTHON.exists():
        pytest.skip(
            f"no fidelity venv at {VENV}: run scripts/fidelity/setup.sh (or `make fidelity`)"
        )
    probe = subprocess.run(
        [
            str(VENV_PYTHON),
            "-c",
            # find_spec, not import: `import vllm` alone takes ~30 s here; vLLM's own start
            # (whose log a failure prints) shows anything deeper.
            "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in "
            "('vllm', 'transformers', 'tokenizers', 'torch')))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode != 0:
        tail = (probe.stderr or probe.stdout or "missing packages").strip().splitlines()[-3:]
        pytest.skip(
            f"vllm, transformers, tokenizers or torch missing in {VENV} ({' / '.join(tail)}): "
            "rerun scripts/fidelity/setup.sh"
        )


def _build_model() -> Path:
    subprocess.run(
        [str(VENV_PYTHON), str(ROOT / "scripts/fidelity/build_tiny_model.py"), str(MODEL_DIR)],
        check=True,
        timeout=300,
        cwd=ROOT,
    )
    return MODEL_DIR


def vllm_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        OMP_NUM_THREADS="1",
        VLLM_HOST_IP="127.0.0.1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_ENDPOINT="http://127.0.0.1:9",
        VLLM_SERVER_DEV_MODE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        PATH=f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def vllm_command(model_dir: Path, port: int, kv_port: int) -> list[str]:
    kv_cfg = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://127.0.0.1:{kv_port}",
        "topic": "",
    }
    return [
        str(VENV_PYTHON),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        MODEL,
        "--enforce-eager",
        "--dtype",
        "float32",
        "--block-size",
        str(BLOCK_SIZE),
        "--enable-prefix-caching",
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--num-gpu-blocks-override",
        str(NUM_GPU_BLOCKS),
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-batched-tokens",
        str(MAX_BATCHED_TOKENS),
        "--enable-prompt-tokens-details",
        "--kv-events-config",
        json.dumps(kv_cfg),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@pytest.fixture(scope="session")
def real_engine() -> Iterator[EngineUnderTest]:
    _vllm_ready_or_skip()
    model_dir = _build_model()
    OUT.mkdir(parents=True, exist_ok=True)
    port, kv_port = free_port(), free_port()
    log_path = OUT / "vllm.log"
    cmd = vllm_command(model_dir, port, kv_port)
    (OUT / "vllm.cmd").write_text(" ".join(cmd) + "\n")
    # vLLM binds its PUB socket only for wildcard endpoints (tcp://*:P, the default
    # tcp://*:5557); for tcp://127.0.0.1:P it *connects*. So the subscriber binds on loopback
    # and vLLM connects to it, which keeps everything on 127.0.0.1.
    sub = KVSubscriber(f"tcp://127.0.0.1:{kv_port}", bind=True)
    sub.start()
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=vllm_env(),
            cwd=OUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                pytest.fail(f"vLLM exited with {proc.returncode} while starting:\n{tail}")
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
                pytest.fail(f"vLLM not healthy after {VLLM_START_TIMEOUT_S:.0f} s:\n{tail}")
            time.sleep(0.5)
        REPORT["vllm_start_s"] = round(time.monotonic() - t0, 1)
        version = httpx.get(f"{url}/version", timeout=5).json().get("version")
        REPORT["vllm_version"] = version
        engine = EngineUnderTest("vllm", url, sub, proc.pid)
        _warm_up(engine)
        yield engine
    finally:
        sub.stop()
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)


# -- the emulated engine -----------------------------------------------------------------------


def emulator_config(kv_port: int) -> str:
    return to_yaml(pool_fleet(
        1,
        substrate={"name": "fidelity-cpu", "kind": "cpu", "hardware": "cpu", "region": "local",
                   "cost": {"hourly_usd": 1}},
        endpoint_fields={"name": "emu-0", "emulation": {
            "block_size": BLOCK_SIZE, "max_num_seqs": MAX_NUM_SEQS,
            "num_gpu_blocks": NUM_GPU_BLOCKS, "max_num_batched_tokens": MAX_BATCHED_TOKENS,
            "kv_events_port": kv_port}},
        models=[model(MODEL, None, MAX_MODEL_LEN, precision="fp32")],
    ))


class EmulatorThread:
    """The emulator on its own event loop in a daemon thread (fixtures here are synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.handle: EmulatorHandle | None = None

    def start(self, config_text: str) -> str:
        self.thread.start()
        config = parse_config(config_text)
        fut: Future[EmulatorHandle] = asyncio.run_coroutine_threadsafe(
            start_emulator(config, time_scale=TIME_SCALE, port_override={"emu-0": 0}), self.loop
        )
        self.handle = fut.result(30)
        return self.handle.urls["emu-0"]

    def stop(self) -> None:
        if self.handle is not None:
            asyncio.run_coroutine_threadsafe(self.handle.stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="session")
def emulated_engine(real_engine: EngineUnderTest) -> Iterator[EngineUnderTest]:
    # Depends on the real engine so that the whole tier skips together when vLLM is missing.
    kv_port = free_port()
    emu = EmulatorThread()
    url = emu.start(emulator_config(kv_port))
    sub = KVSubscriber(f"tcp://127.0.0.1:{kv_port}")
    sub.start()
    engine = EngineUnderTest("emulator", url, sub)
    try:
        _warm_up(engine)
        yield engine
    finally:
        sub.stop()
        emu.stop()


@pytest.fixture(scope="session")
def engines(
    real_engine: EngineUnderTest, emulated_engine: EngineUnderTest
) -> tuple[EngineUnderTest, EngineUnderTest]:
    """``(real, emulated)``."""
    return real_engine, emulated_engine


def _warm_up(engine: EngineUnderTest) -> None:
    """One short request (the first one on a fresh vLLM compiles and allocates)."""
    engine.post(
        "/v1/completions",
        {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "ignore_eos": True},
        timeout=300,
    )
    time.sleep(0.3)  # let the SUB sockets finish joining before tests count messages


# -- the report --------------------------------------------------------------------------------


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not REPORT:
        return
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(REPORT, indent=2, sort_keys=True) + "\n")
    tr = terminalreporter
    tr.section("fidelity: emulator vs real vLLM (information)")
    for key in sorted(REPORT):
        value = REPORT[key]
        text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
        tr.write_line(f"{key}: {text}")
    tr.write_line(f"(written to {OUT / 'report.json'})")
