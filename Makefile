# Two commands are the contract: `make demo` and `make test` (both set everything up).
VENV   ?= .venv
PYTHON ?= python3
# Pinned so that pip takes the local CPU build here and the normal (CUDA) build elsewhere,
# and never pulls a second torch through a dependency's range. deploy/lock.sh pins the rest.
TORCH  ?= torch==2.13.0
# The tested dependency set: what CI installs, and (deploy/runtime-requirements.txt, the same
# pins) what clusters run. `make lock` regenerates both after a change to pyproject.toml.
LOCK   := requirements.lock
BIN    := $(VENV)/bin

.PHONY: install demo test lint clean bench lock

$(BIN)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -r $(LOCK)
	$(BIN)/pip install -q --no-deps -e .
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

lock:
	command -v uv >/dev/null || $(PYTHON) -m pip install -q uv
	bash deploy/lock.sh

clean:
	rm -rf demo_data demo_output
