# The README's two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (small, from PyPI or this machine's local wheel); GPU hosts: make TORCH="torch>=2.4"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: run test lint bench clean

$(BIN)/harmonica: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: $(BIN)/harmonica
	$(BIN)/python -m app.run

lint: $(BIN)/harmonica
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(BIN)/harmonica
	$(BIN)/python bench/speed.py

clean:
	rm -rf $(VENV) out var .pytest_cache .ruff_cache
