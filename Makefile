# Every target installs what it needs first (scripts/setup.sh is idempotent), then acts.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint demo bench clean

setup:
	@./scripts/setup.sh

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: setup
	$(PY) scripts/demo.py $(DEMO_ARGS)

bench: setup
	$(PY) scripts/bench_media.py
	$(PY) scripts/bench_bridge.py
	$(PY) scripts/bench_sip.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
