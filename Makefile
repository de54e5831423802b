# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates the virtualenv and installs what it needs first.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BROWSER_STAMP := $(VENV)/.browser

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
	# Test-only oracle: spandrel's upscaler architectures (it imports torchvision, so the tests stub it).
	$(PY) -m pip install -q --no-deps spandrel==0.4.2 einops==0.8.2
	touch $(STAMP)

# Browser tests drive Debian's Chromium (no browser download works here). Installed when we are root
# with apt; otherwise those tests skip and say why.
$(BROWSER_STAMP): $(STAMP)
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
		|| echo "chromium could not be installed: browser tests will be skipped"; \
	else echo "chromium not installed (needs root + apt): browser tests will be skipped"; fi
	touch $(BROWSER_STAMP)

demo: $(STAMP)
	$(VENV)/bin/voidprompt demo

test: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP) $(BROWSER_STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/load_checkpoint.py

clean:
	rm -rf $(VENV) build *.egg-info
