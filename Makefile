# qrepro — `make demo` (install + train on sklearn digits) and `make test` (install + test suite)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.qrepro-installed
TORCH_SPEC ?= "torch>=2.3,<2.15" "torchvision>=0.18,<0.30"

.PHONY: install demo test tables lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python scripts/demo.py

test: $(STAMP)
	$(BIN)/lint-imports --no-logo
	WANDB_MODE=disabled OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest -n $${QREPRO_TEST_WORKERS:-2}  # tests are single-threaded: one worker per core

tables: $(STAMP)
	$(BIN)/python -m qrepro.tables --all

bench: $(STAMP)
	$(BIN)/python -m qrepro.bench

lint: $(STAMP)
	$(BIN)/ruff check qrepro tests scripts

format: $(STAMP)
	$(BIN)/ruff format qrepro tests scripts

clean:
	rm -rf runs outputs multirun wandb .pytest_cache
