# Two commands on a fresh machine:  `make demo`  and  `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint test-deployment test-slow data clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)

# Debian's dataset-fashion-mnist package (offline route); a machine with no apt lists yet needs
# `apt-get update` once, which we try when we may (root).
data: $(STAMP)
	$(BIN)/fedsparse data fetch fashion-mnist || { [ "$$(id -u)" = 0 ] && apt-get update -qq && $(BIN)/fedsparse data fetch fashion-mnist; }

# FedAvg vs FedDIP, FedLUAR, partial-update broadcast and Top-k+EF on one non-IID split (Fashion-MNIST,
# LeNet-5, Dirichlet 0.5, 20 clients, 25 rounds; experiments/configs/demo.toml): accuracy against
# cumulative MB in runs/demo/, and a final table (accuracy, MB up, MB down, x FedAvg). <= 10 min on 2 cores.
demo: data
	$(BIN)/python experiments/demo.py --out runs/demo

# The default test suite (what CI runs). Slow tests: `make test-slow`.
# tests/conftest.py points FEDSPARSE_DATA at ../shared/data when it exists; elsewhere fetch first.
test: $(STAMP) lint
	@if [ -z "$${FEDSPARSE_DATA:-}" ] && [ ! -d ../shared/data ]; then \
		$(MAKE) data && $(BIN)/fedsparse data fetch mnist; fi
	$(BIN)/python -m pytest -q --durations=15
	$(BIN)/python -m pytest -q -m deployment --durations=10

# Lint and types (config in pyproject.toml): part of `make test`.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Real Flower deployments only: SuperLink + 2 SuperNodes on 127.0.0.1 through `flwr run`.
test-deployment: $(STAMP)
	$(BIN)/python -m pytest -q -m deployment --durations=10

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs .pytest_cache
