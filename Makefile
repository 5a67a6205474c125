# Two commands on a fresh machine: `make demo` and `make test`. Both create the .venv once.
VENV := .venv
PY := $(VENV)/bin/python
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test bench clean

venv:
	@bash tools/setup_venv.sh

demo: venv
	$(PY) -m megatron_tbrm.demo

test: venv
	$(PY) -m pytest -q tests

bench: venv
	$(PY) bench/loss.py
	$(PY) bench/step.py
	$(PY) bench/weight_sync.py

clean:
	rm -rf runs .cache .pytest_cache
