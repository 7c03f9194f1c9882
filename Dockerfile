# inferplane gateway image: `inferplane serve`, `inferplane epp`, `inferplane envoy-config`.
# Build: docker build -t inferplane:dev .
# Run:   docker run -p 8080:8080 -v $PWD/fleet.yaml:/etc/inferplane/fleet.yaml inferplane:dev
# Not built in this project's CI (no container runtime there); see deploy/README.md.
# Python 3.12: aiohttp starts each upstream request's writer eagerly there, so a burst of requests
# goes on the wire in order instead of after the whole burst was placed (docs/benchmarks.md).
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home-dir /var/lib/inferplane --create-home inferplane
COPY --from=build /install /usr/local
USER inferplane
WORKDIR /var/lib/inferplane
ENV HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
EXPOSE 8080 9002
# gateway.host must be 0.0.0.0 in the fleet file (or --host 0.0.0.0) to be reachable from outside
ENTRYPOINT ["inferplane"]
CMD ["serve", "--config", "/etc/inferplane/fleet.yaml", "--host", "0.0.0.0"]
