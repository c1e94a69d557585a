# The two commands a new user needs (see README.md):
#   make demo   - set up and run the whole loop on embedded brokers
#   make test   - set up and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup system-deps demo test lint check unit bench clean

$(VENV)/.installed: pyproject.toml setup.py
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# Debian packages the tests use: Mosquitto, Slurm, a Docker engine, debootstrap.
system-deps:
	bash scripts/system-deps.sh

demo: setup
	$(VENV)/bin/reflexarc demo --duration 20

test: system-deps setup
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

# What CI checks before the tests: lint, the format (`ruff format` applies it), types (mypy + pydantic plugin, strict) and the import
# contracts (import-linter: tiers import only the kernel, ...), all configured in pyproject.toml.
# mypy and import-linter run over the installed layout (edge/ as reflexarc/edge/ ...).
check: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) scripts/installed_layout.py mypy -p reflexarc --config-file $(CURDIR)/pyproject.toml
	$(PY) scripts/installed_layout.py lint-imports $(CURDIR)/pyproject.toml
	$(PY) scripts/type_ignores.py

# Fast feedback: the unit tests only (no brokers started).
unit: setup
	$(PY) -m pytest -q tests/unit

bench: setup
	$(PY) benchmarks/loop_latency.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
