# Everything runs in a project-local virtual environment, .venv, created on first use: the
# Python that creates it (PYTHON) is never modified. `make demo` and `make test` are the only
# set-up commands a user needs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 1
STAMP := $(VENV)/.installed

.PHONY: install demo check gpu-check test lint bench plan clean distclean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Installs once per pyproject change; torch is pinned here (an unpinned resolver would fetch a
# multi-GB CUDA build).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev,bench]"
	@touch $(STAMP)

# The optional extras the tests exercise (transformers for ringattn.integrations.hf; tokenizers,
# safetensors and pyarrow for prepare/export; ring-flash-attn, ring-attention-pytorch, jax and
# JAX's ringattention for the peers tests), installed
# by `make test` only; their tests skip cleanly where they are absent. They must not replace
# torch==2.13.0 (pip keeps an installed torch that satisfies them).
EXTRAS := $(VENV)/.extras
$(EXTRAS): $(STAMP) Makefile
	$(PY) -m pip install -q -e ".[dev,bench,hf,data]" pyarrow torch==2.13.0
	# peers of `ringattn bench peers`: ring-attention-pytorch's small pure-Python deps and jax
	# first, then the peers themselves without deps (they pin nothing useful for CPU, and
	# ringattention's flax is not needed: bench/peer_jax.py), so torch stays
	$(PY) -m pip install -q einops beartype jaxtyping jax==0.10.2 torch==2.13.0
	$(PY) -m pip install -q --no-deps ring-flash-attn==0.1.8 ring-attention-pytorch==0.5.20 \
	  ringattention==0.1.2
	@touch $(EXTRAS)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m ringattn.cli demo

check: $(STAMP)
	$(PY) -m ringattn.cli check

# The oracle grid, ring vs single-GPU timing and two llama-3b trainer steps on all visible GPUs
# (NCCL); prints one line and exits 0 where there is no CUDA device.
gpu-check: $(STAMP)
	$(PY) -m ringattn.cli check --device cuda

test: $(EXTRAS)
	$(PY) -m pytest tests

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(PY) -m ringattn.cli bench attention --world 2 4 --seq 8192 --layout contiguous zigzag striped --causal both --dtype fp32 bf16

plan: $(STAMP)
	$(PY) -m ringattn.cli plan --paper-table

clean:
	rm -rf build dist .pytest_cache runs .make

distclean: clean
	rm -rf $(VENV)
