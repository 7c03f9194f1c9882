# inferplane gateway image: `inferplane serve`, `inferplane epp`, `inferplane envoy-config`.
# Build: docker build -t inferplane:dev .
# Run:   docker run -p 8080:8080 -v $PWD/fleet.yaml:/etc/inferplane/fleet.yaml inferplane:dev
# Not built in this project's CI (no container runtime there, so the NATIVE step below is
# untested); see deploy/README.md.
# Python 3.12: aiohttp starts each upstream request's writer eagerly there, so a burst of requests
# goes on the wire in order instead of after the whole burst was placed (on 3.11 the gateway's
# dispatch.eager does the same; docs/benchmarks.md).
# NATIVE=1 (the default) also compiles the placement hot path with mypyc into the installed
# package (scripts/compile_native.py; docs/placement.md#the-compiled-build): gcc and mypy in this
# build stage only, nothing of them in the image. The build fails where that cannot be done (no
# package mirror, no compiler, a failed compile: --strict); NATIVE=0 builds a pure-Python image
# instead. `docker run IMAGE version` says which one the image runs, and `serve` logs it at start.
# Until 2026-12-07 a failure here was only printed and the image ran pure Python, which hid that
# the compile never worked from an installed package (mypy ran in site-packages: fixed).
# constraints.txt: the versions `make test` and CI ran (api/server.py builds on aiohttp's
# internals), not whatever is newest within pyproject.toml's ranges on the day of the build;
# mypy (mypyc) pinned the same way. The pins were frozen on CPython 3.11; on 2026-12-07 every
# package the two installs below resolve to (66 and 7) had a cp312, abi3 or pure wheel for
# manylinux x86_64, so nothing builds from source before gcc is there (`pip install --dry-run
# --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 -c constraints.txt`
# on pyproject.toml's dependencies, then on mypy setuptools). setuptools is pinned too (mypyc
# builds with it; Python 3.12 has no distutils of its own).
# types-PyYAML (added 2026-12-07, a pure wheel): mypyc type-checks what the compiled modules
# import with the project's strict mypy settings, and without the stubs `yaml` is untyped there.
FROM python:3.12-slim AS build
ARG NATIVE=1
WORKDIR /src
COPY pyproject.toml README.md constraints.txt ./
COPY src ./src
COPY scripts/compile_native.py ./scripts/
RUN pip install --no-cache-dir --prefix=/install -c constraints.txt .
RUN if [ "$NATIVE" = 1 ]; then \
      { apt-get update -qq && apt-get install -y -qq --no-install-recommends gcc libc6-dev \
        && pip install --no-cache-dir --prefix=/tmp/mypy -c constraints.txt mypy setuptools \
           types-PyYAML; } \
      || { echo "NATIVE: cannot install gcc or mypy here (--build-arg NATIVE=0: pure Python)"; \
           exit 1; }; \
      PYTHONPATH="/tmp/mypy/lib/python3.12/site-packages:/install/lib/python3.12/site-packages" \
        python scripts/compile_native.py --strict \
        --package-dir /install/lib/python3.12/site-packages/inferplane; \
    fi

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/inferplane --create-home inferplane
COPY --from=build /install /usr/local
USER inferplane
WORKDIR /var/lib/inferplane
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
# 8080 gateway.port, 9002 epp.port, 9090 the /metrics listeners (deploy/k8s: gateway.metrics.port,
# epp.metrics_port)
EXPOSE 8080 9002 9090
# gateway.host must be 0.0.0.0 in the fleet file (or --host 0.0.0.0) to be reachable from outside
ENTRYPOINT ["inferplane"]
CMD ["serve", "--config", "/etc/inferplane/fleet.yaml", "--host", "0.0.0.0"]
