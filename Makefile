# Two commands do all the set-up on a fresh clone (Python 3.11+ and make are all it needs):
#   make demo   build the demo collection and run every pipeline step on it
#   make test   check the code (make lint), then run the test suite
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install demo lint test test-busy faults clean-data

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "cbir needs Python 3.11 or newer")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The repository is itself a cbir workspace (params.yaml, dvc.yaml), on the demo collection:
# `cbir demo-data` writes the scans (outside data/, like an archive's), `dvc repro` does the rest.
demo: install
	$(BIN)/cbir demo-data demo
	dvc repro
	@echo
	@cat data/reports/metrics.md
	@echo
	@echo "Results of the demo run:"
	@echo "  demo collection  demo/scans, ground truth demo/ground_truth.csv"
	@echo "  manifest         data/manifest/files.parquet"
	@echo "  embeddings       data/embeddings/<model fingerprint>/shard-*.parquet"
	@echo "  index            data/index/index.faiss (+ index.json)"
	@echo "  threshold        data/reports/calibration.json (calibrated for search.precision_target)"
	@echo "  pairs, clusters  data/pairs/pairs.parquet, data/pairs/clusters.parquet"
	@echo "  evaluation       data/reports/metrics.json, metrics.md, neighbors.parquet"
	@echo "  review gallery   data/reports/gallery/index.html (open it in a browser)"
	@echo "  catalogue        data/catalog.duckdb   try: $(BIN)/cbir sql \"SELECT * FROM duplicate_pairs ORDER BY score DESC LIMIT 10\""

# ruff (lint rules and formatting) and mypy over the package, the tasks and the flows; the
# settings are in pyproject.toml. `make test` runs it first.
LINTED := cbir tasks flows

lint: install
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy $(LINTED)

# Two worker processes, each taking whole test files (their fixtures are built once per file).
PYTEST := $(BIN)/python -m pytest -q -n 2 --dist loadfile

test: install lint
	$(PYTEST)

# The suite on a busy machine: two CPU-bound processes run beside it (started here, and stopped
# whatever the outcome, Ctrl-C included), so that no test passes only when it has the machine
# to itself.
test-busy: install
	@( while :; do :; done ) & b1=$$!; ( while :; do :; done ) & b2=$$!; \
	trap 'kill $$b1 $$b2 2>/dev/null; wait $$b1 $$b2 2>/dev/null' EXIT INT TERM; \
	echo "test-busy: two CPU-bound processes ($$b1, $$b2) run beside the suite"; \
	$(PYTEST) $(PYTEST_ARGS)

# The full fault-injection, hostile-input and resource matrix (CI runs a reduced set through
# make test).
faults: install
	$(BIN)/python -m pytest -q -m "" tests/test_faults.py tests/test_hostile.py tests/test_resources.py

clean-data:
	rm -rf data/manifest data/catalog.duckdb data/embeddings data/index data/pairs data/reports data/models data/cache
