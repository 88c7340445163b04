# Every target installs what it needs first (scripts/setup.sh is idempotent), then acts.
VENV := .venv
PY := $(VENV)/bin/python

COVERAGE := --cov=media --cov=worker --cov-branch --cov-report=
# The coverage bar (per package: media, worker/sip, worker/agent, worker/session) applies when
# the whole suite ran; a narrowed run (PYTEST_ARGS) only prints the figures.
COVERAGE_BAR := $(if $(PYTEST_ARGS),,--fail-under 90)

.PHONY: setup test lint demo bench fuzz loadtest clean

setup:
	@./scripts/setup.sh

test: setup
	$(PY) -m pytest $(COVERAGE) $(PYTEST_ARGS)
	$(PY) scripts/coverage_report.py $(COVERAGE_BAR)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

# The fuzz suite alone, longer: FUZZ_EXAMPLES mutated inputs per test (make test runs 300).
fuzz: setup
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-20000} $(PY) -m pytest tests/fuzz tests/integration/test_fuzz_wire.py $(PYTEST_ARGS)

bench: setup
	$(PY) scripts/bench_media.py
	$(PY) scripts/bench_bridge.py
	$(PY) scripts/bench_sip.py
	$(PY) scripts/bench_flood.py
	$(PY) scripts/bench_ari.py
	$(PY) scripts/bench_events.py

# The load test (README, "Load test"): 100 calls at 10 per second held 30 s against a worker it
# starts; LOADTEST_ARGS="--calls 20 --rate 5 --hold 20" (or --target HOST:PORT ...) to change.
loadtest: setup
	$(VENV)/bin/aispinner-worker loadtest $(LOADTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info .coverage
