# Two commands for a fresh machine: `make demo` and `make test`. Both set up .venv first.
#
# torch is installed before anything else, pinned to the CPU build this project is developed
# on (2.13.0): an unpinned torch pulled in by another package would fetch a multi-GB CUDA build.
# On a GPU machine keep your own torch: `make setup TORCH_SPEC=` skips the pin.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-fast bench lint clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install --quiet "$(TORCH_SPEC)")
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(PY) examples/pretrain_llama.py

# Kernel tests run in a second pytest process with Triton's interpreter on (it must be set
# before the kernel modules are imported, and it would send every other test's impl="auto"
# through the slow interpreter).
test: setup
	$(PY) -m pytest -q --ignore=tests/kernels
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/kernels

test-fast: setup
	$(PY) -m pytest -q -m "not slow" --ignore=tests/kernels

bench: setup
	$(PY) benchmarks/bench_projector.py
	$(PY) benchmarks/bench_step.py

lint: setup
	$(VENV)/bin/ruff check galore_opt tests benchmarks examples

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
