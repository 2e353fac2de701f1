PYTHON ?= python3
export OMP_NUM_THREADS ?= 1
STAMP := .make/installed

.PHONY: install demo check test lint bench plan clean

# Installs once per pyproject change; torch is pinned here (an unpinned resolver would fetch a
# multi-GB CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev,bench]"
	@mkdir -p .make && touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m ringattn.cli train --config configs/demo.toml

check: $(STAMP)
	$(PYTHON) -m ringattn.cli check

test: $(STAMP)
	$(PYTHON) -m pytest tests

lint: $(STAMP)
	$(PYTHON) -m ruff check src tests benchmarks examples
	$(PYTHON) -m ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(PYTHON) -m ringattn.cli bench attention --world 2 4 --seq 8192 --layout contiguous zigzag striped --causal both --dtype fp32 bf16

plan: $(STAMP)
	$(PYTHON) -m ringattn.cli plan --paper-table

clean:
	rm -rf build dist .pytest_cache runs .make
