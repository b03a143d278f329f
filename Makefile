# Two commands on a fresh machine:
#   make quickstart   # venv + install, then `rmtrain train` (tiny LLaMA, sample data, CPU, < 2 min)
#   make test         # venv + install, then the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install quickstart test test-fast lint

install: $(STAMP)

# Without a GPU, install the CPU build of torch first: an unpinned torch pulls a multi-GB CUDA
# build. On GPU nodes the normal (CUDA) torch dependency is installed.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(PY) -m pip install -q torch==2.13.0; fi
	$(PY) -m pip install -q -e ".[dev]"
	# RewardBench's own scoring code, for the cross-check test only (its dependency tree is not
	# needed: the test loads the scoring function from the package's files)
	$(PY) -m pip install -q --no-deps rewardbench==0.1.4
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/rmtrain train

# The real models and the transformers 4.x environment some tests read are built once into the
# user cache first (downloads: minutes on a fresh machine, nothing once cached). Two pytest
# workers, each taking whole test files (module fixtures, e.g. a file's shared training runs,
# are built once): many tests wait on launchers and process start-up, which the other worker
# fills. TEST_WORKERS=1 runs them in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) tests/prepare.py
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check rmtrain tests
	$(VENV)/bin/ruff format --check rmtrain tests
	$(VENV)/bin/mypy
