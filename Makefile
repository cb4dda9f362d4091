# `make train` and `make test` create the virtual environment on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
SHARED_DATA ?= ../shared/data/prepare.py
# `make train` runs EXPERIMENT with any extra overrides in ARGS (EXPERIMENT= for none).
EXPERIMENT ?= experiment=cifar_cpu
ARGS ?=

.PHONY: train test test-fast lint docs mutate data clean-env

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

# Unpack the offline data copy when this checkout sits beside ../shared; real users get
# CIFAR-10 with `make train ARGS="... task.datamodule.download=true"` instead.
data:
	@if [ -f $(SHARED_DATA) ] && [ ! -d data/cifar10/test ]; then python3 $(SHARED_DATA) data; fi

train: $(STAMP) data
	$(PY) -m deqlab $(EXPERIMENT) $(ARGS)

# The suite in JOBS worker processes of one thread each: it is mostly Python and process
# start-up, which two single-threaded workers overlap better than one process with two threads
# (docs/tests.md has the figures). JOBS=0 runs it in this process.
JOBS ?= 2
PYTEST := OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -n $(JOBS) --dist worksteal

# Everything, slow tests included (what CI runs).
test: $(STAMP) data
	DEQLAB_DATA=$${DEQLAB_DATA:-$(CURDIR)/data} $(PYTEST)

test-fast: $(STAMP)
	$(PYTEST) -m "not slow"

# The documentation site, into site/ (README.md is its home page).
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

# Mutation testing of the engine ([tool.mutmut] in pyproject.toml; about 30 min on 2 cores,
# not part of CI). One OpenMP thread: a child forked from a process whose thread pool is up
# hangs, and mutmut would count the hang as a killed mutant.
mutate: $(STAMP)
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run
	$(VENV)/bin/mutmut results

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean-env:
	rm -rf $(VENV)
