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

# The oldest Triton the kernels support (pyproject's triton extra); test-compat compiles every
# kernel with it, in a venv of its own that holds nothing but Triton (no torch needed to compile).
TRITON_OLDEST ?= 3.6.0
COMPAT_VENV ?= .venv-triton-$(TRITON_OLDEST)

.PHONY: setup demo test test-fast test-compat bench lint clean

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

# Every kernel compiled for sm_80/86/89/90 with the oldest supported Triton (make test does the
# same with the installed one: tests/test_kernel_aot.py). Writes the per-target report.
test-compat:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install --quiet "triton==$(TRITON_OLDEST)"
	$(COMPAT_VENV)/bin/python galore_opt/kernels/aot.py --json benchmarks/results/aot-triton-$(TRITON_OLDEST).json

test-fast: setup
	$(PY) -m pytest -q -m "not slow" --ignore=tests/kernels

bench: setup
	$(PY) benchmarks/bench_projector.py
	$(PY) benchmarks/bench_step.py

lint: setup
	$(VENV)/bin/ruff check galore_opt tests benchmarks examples

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
