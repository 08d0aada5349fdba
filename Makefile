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
$(STAMP): pyproject.toml benchmarks/requirements-e5.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@# torch first, as the CPU wheel: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,spark,dask]"
	$(PY) -m pip install --quiet --no-deps -r benchmarks/requirements-e5.txt
	touch $(STAMP)

demo: setup
	$(VENV)/bin/ads-relevance pipeline --demo

# Two pytest workers (pytest-xdist), one per core: each test runs torch on one thread (tests/conftest.py),
# and the server, JVM and subprocess tests mostly wait, so the suite ran in 437 s instead of ~635 s on 2 cores.
# A file's tests stay on one worker (--dist loadfile), so module-scoped fixtures are built once.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

# Every benchmark, then benchmarks/RESULTS.md (the quality run alone takes about 2 h 35 min - 3 h on 2 cores).
bench: setup
	$(PY) benchmarks/ingest_speed.py
	$(PY) benchmarks/adapter_speed.py
	$(PY) benchmarks/adapter_speed.py --threads 1 --out benchmarks/results/adapter_speed_1thread.json
	$(PY) benchmarks/adapter_speed.py --real
	$(PY) benchmarks/adapter_speed.py --real --precision fp32 --out benchmarks/results/adapter_speed_real_fp32.json
	$(PY) benchmarks/scoring_speed.py --repeats 2
	$(PY) benchmarks/quality.py
	$(PY) benchmarks/scoring_speed.py --workload long --repeats 2 --no-spark --pairs 4320
	$(PY) benchmarks/add_market.py
	$(PY) benchmarks/collapse_search.py
	$(PY) benchmarks/divergence_guard.py
	$(PY) benchmarks/mtl_knobs.py
	$(PY) benchmarks/per_market_lr.py
	$(PY) benchmarks/collect.py

# A smoke run of every benchmark (tiny sizes, results under $(QUICK)), in a few minutes; CI runs it.
QUICK := /tmp/ads-relevance-bench-quick
bench-quick: setup
	rm -rf $(QUICK) && mkdir -p $(QUICK)
	$(PY) benchmarks/ingest_speed.py --quick --out $(QUICK)/ingest_speed.json
	$(PY) benchmarks/adapter_speed.py --quick --out $(QUICK)/adapter_speed.json
	$(PY) benchmarks/adapter_speed.py --quick --real --out $(QUICK)/adapter_speed_real.json
	$(PY) benchmarks/scoring_speed.py --quick --out $(QUICK)/scoring_speed.json
	$(PY) benchmarks/scoring_speed.py --quick --workload long --no-spark --out $(QUICK)/scoring_speed_long.json
	$(PY) benchmarks/quality.py --quick --workdir $(QUICK)/quality-work --out $(QUICK)/quality
	$(PY) benchmarks/add_market.py --quick --workdir $(QUICK)/quality-work --out $(QUICK)/add_market
	$(PY) benchmarks/collapse_search.py --quick --workdir $(QUICK)/collapse-work --out $(QUICK)/collapse_search
	$(PY) benchmarks/divergence_guard.py --quick --workdir $(QUICK)/divergence-work --out $(QUICK)/divergence_guard
	$(PY) benchmarks/mtl_knobs.py --quick --workdir $(QUICK)/knobs-work --out $(QUICK)/mtl_knobs
	$(PY) benchmarks/per_market_lr.py --quick --shared-starts 0,0.5 --mtl-lora --b-lr-ratio 2 --workdir $(QUICK)/pml-work --out $(QUICK)/per_market_lr_demo
	GPU_SH_SMOKE=1 benchmarks/gpu.sh $(QUICK)/gpu
	$(PY) -c "from relevance.model.tiny import build_tiny_model; build_tiny_model('$(QUICK)/tiny-arch')"
	GPU_SPEED_SMOKE=1 PYTHON=$(PY) benchmarks/gpu_speed.sh $(QUICK)/tiny-arch benchmarks/fixtures $(QUICK)/gpu_speed
	$(PY) benchmarks/collect.py --results $(QUICK) --out $(QUICK)/RESULTS.md

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info demo_workdir
