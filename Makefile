# Two commands are the contract: `make demo` and `make test` (both set everything up).
VENV   ?= .venv
PYTHON ?= python3
# Pinned so that pip takes the local CPU build here and the normal (CUDA) build elsewhere,
# and never pulls a second torch through a dependency's range.
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin

.PHONY: install demo test lint clean bench

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[demo,test,bench]"
	@# Headless Chromium for the report's browser test; best effort (root with apt only), the
	@# test is skipped without it.
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
	  >/dev/null 2>&1; } || echo "note: chromium not installed; the report's browser test is skipped"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/harmonize demo --root demo_data --output demo_output

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install lint
	$(BIN)/python -m pytest -q -p no:cacheprovider

# CPU benchmarks (about 20 minutes on 2 cores); bench/RESULTS.md says what they print.
bench: install
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.io_path

clean:
	rm -rf demo_data demo_output
