PYTHON ?= python3
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test lint bench plan clean

install:
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e ".[dev,bench]"

demo:
	$(PYTHON) -m ringattn.cli demo

test:
	$(PYTHON) -m pytest tests

lint:
	$(PYTHON) -m ruff check src tests benchmarks
	$(PYTHON) -m ruff format --check src tests benchmarks

bench:
	$(PYTHON) -m ringattn.cli bench attention

clean:
	rm -rf build dist .pytest_cache runs
