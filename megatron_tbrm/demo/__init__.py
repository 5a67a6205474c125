"""The CPU demo and what only it needs, apart from the library: the tiny model maker
(tiny.py), the arithmetic task (arithmetic.py), the supervised warm start (sft.py) and the
end-to-end run (run.py; `python -m megatron_tbrm.demo`). Measurements: docs/demo.md,
docs/learning.md."""
