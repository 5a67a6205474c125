#!/usr/bin/env python
"""Thin wrapper: python -m megatron_tbrm.demo.tiny (a tiny random-weight HF chat model)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without an install

from megatron_tbrm.demo.tiny import main  # noqa: E402

if __name__ == "__main__":
    main()
