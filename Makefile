# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv and installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-all lint bench clean

$(STAMP): pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU wheel on these machines; an unpinned torch would pull several GB of CUDA packages.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test]'
	# Test-only oracle: k-diffusion's sampler functions. --no-deps because its
	# package pulls torchvision (no CPU wheel) and a CUDA torch.
	$(PY) -m pip install -q --no-deps k-diffusion==0.1.1.post1 torchdiffeq==0.2.5
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/voidprompt demo

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/load_checkpoint.py

clean:
	rm -rf $(VENV) build *.egg-info
