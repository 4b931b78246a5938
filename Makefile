# Two commands are the contract: `make demo` and `make test` (both set everything up).
VENV   ?= .venv
PYTHON ?= python3
# Pinned so that pip takes the local CPU build here and the normal (CUDA) build elsewhere,
# and never pulls a second torch through a dependency's range.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/harmonize demo --root demo_data --output demo_output

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

clean:
	rm -rf demo_data demo_output
