#!/usr/bin/env python
"""`megatron-tbrm-convert-megatron-to-hf` from a checkout without an install: the code is megatron_tbrm/convert/megatron_to_hf.py."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_tbrm.convert.megatron_to_hf import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
