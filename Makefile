# Each target creates .venv and installs what it needs. torch==2.13.0 goes in
# first so pip takes the CPU wheel on disk instead of a multi-GB CUDA build.
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-torch lint graphs bench bench-quick bench-dist clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m fx_optim_pass.demo

test: $(STAMP)
	$(PYTHON) -m pytest -q

# The suite on another supported torch, in a venv of its own: make test-torch TORCH=2.14.1.
# PyPI's Linux wheel, CUDA libraries included (about 4 GB); the goldens are skipped off 2.13.
TORCH ?= 2.11.0
test-torch:
	python3 -m venv .venv-torch$(TORCH)
	.venv-torch$(TORCH)/bin/python -m pip install --quiet torch==$(TORCH)
	.venv-torch$(TORCH)/bin/python -m pip install --quiet -e '.[dev]'
	.venv-torch$(TORCH)/bin/python -m pytest -q

# Every figure of benchmarks/README.md; results land in benchmarks/results/.
# OMP_WAIT_POLICY=PASSIVE: on a machine shared with other processes, OpenMP threads that
# spin at every barrier measure the scheduler, not the code (benchmarks/README.md).
BENCH_ENV := OMP_WAIT_POLICY=PASSIVE

bench: $(STAMP)
	$(BENCH_ENV) $(PYTHON) -m benchmarks.run

# A subset (smaller transformer, one optimizer per model, no compiled autograd, no scale curve): under 5 minutes on 2 cores.
bench-quick: $(STAMP)
	$(BENCH_ENV) $(PYTHON) -m benchmarks.run --quick

lint: $(STAMP)
	$(VENV)/bin/ruff check fx_optim_pass tests benchmarks
	$(VENV)/bin/ruff format --check fx_optim_pass tests benchmarks
	$(VENV)/bin/mypy

bench-dist: $(STAMP)
	$(BENCH_ENV) $(PYTHON) benchmarks/distributed.py --out bench_dist_out

graphs: $(STAMP)
	EXPECTTEST_ACCEPT=1 $(PYTHON) -m pytest -q tests/test_golden_graphs.py

clean:
	rm -rf $(VENV) .venv-torch* demo_out bench_dist_out
