# The README's two commands: `make run` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV ?= .venv
# CPU build by default (small, from PyPI or this machine's local wheel); GPU hosts: make TORCH="torch>=2.4"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
OUT ?= out/run

.PHONY: run test lint bench clean

$(BIN)/harmonica: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

run: $(BIN)/harmonica
	$(BIN)/harmonica generate --model digits --method harmonica --router builtin --steps 20 \
		--labels 0,1,2,3,4,5,6,7,8,9 --num-images 4 --seed 0 --out $(OUT)

lint: $(BIN)/harmonica
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest -q

bench: $(BIN)/harmonica
	$(BIN)/python bench/speed.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache
