# The two commands a fresh machine needs (see README):  make demo   |   make test
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.clipcid-installed
BUILD_INPUTS := $(shell find csrc -type f) setup.py pyproject.toml CMakeLists.txt scripts/setup.sh

.PHONY: setup demo test lint format bench

setup: $(STAMP)

$(STAMP): $(BUILD_INPUTS)
	bash scripts/setup.sh
	touch $@

demo: setup
	$(PY) -m clipcid_fast demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: setup
	$(PY) benchmarks/bench_mm_ceiling.py
	$(PY) benchmarks/bench_baselines.py
