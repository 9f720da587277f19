# Two entry points that work on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (CPU torch pinned; see README).
PY := .venv/bin/python
STAMP := .venv/.installed

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0" "triton==3.6.0" "numpy<2.4"
	$(PY) -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

.PHONY: demo test fuzz gpu-bench gpu-check
demo: $(STAMP)
	$(PY) -m compiler demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

fuzz: $(STAMP)  # the differential fuzzer's long run (25,000 examples, ~30 min): see tests/fuzz/test_differential.py
	FLASHFX_FUZZ=long $(PY) -m pytest -q -x tests/fuzz -p no:cacheprovider --hypothesis-show-statistics

gpu-bench:  # one suite group per call on the GPU machine: see benchmarks/run_all.py
	PYTHONPATH=. python benchmarks/run_all.py --budget-s 500 $(if $(SUITES),--suites $(SUITES))

gpu-check:  # the five-minute GPU check: tests, then headline configs; see benchmarks/gpu_check.py
	PYTHONPATH=. python3 benchmarks/gpu_check.py --out $${OUT:-gpu-check-out}
