# The README's two commands: `make demo` (the main job, end to end) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_SPEC ?= torch==2.13.0
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: setup demo test test-fast bench bench-quick clean

setup: $(STAMP)

# Re-installs only when the project's dependency list changes: a no-op when up to date.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first, as the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,spark,dask]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ads-relevance pipeline --demo

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) benchmarks/ingest_speed.py
	$(PY) benchmarks/adapter_speed.py
	$(PY) benchmarks/scoring_speed.py

bench-quick: setup
	$(PY) benchmarks/ingest_speed.py --quick --out /tmp/ads-relevance-bench-quick-ingest.json
	$(PY) benchmarks/adapter_speed.py --quick --out /tmp/ads-relevance-bench-quick-adapter.json
	$(PY) benchmarks/scoring_speed.py --quick --out /tmp/ads-relevance-bench-quick-scoring.json

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info demo_workdir
