# Two commands on a fresh machine: `make demo` and `make test`. Both create the .venv once.
VENV := .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean

venv:
	@bash tools/setup_venv.sh

demo: venv
	$(PY) -m megatron_tbrm.demo

# Two pytest workers, one test file each at a time (its module fixtures, e.g. its vLLM server,
# stay in one process): most of the suite is one busy core (vLLM's start-up imports, one
# process waiting on another), so two files side by side fill the 2-core CI machine (docs/ci.md).
# PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= 2
test: venv
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

bench: venv
	$(PY) bench/loss.py
	$(PY) bench/step.py
	$(PY) bench/weight_sync.py

clean:
	rm -rf runs .cache .pytest_cache
