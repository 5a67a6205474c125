"""Shared test fixtures.

`tiny_model_dir`: path to the default tiny Qwen2 chat model (megatron_tbrm/demo/tiny.py), built
once and cached under <repo>/.cache/tiny_models/<family>-<key>, the key hashing the
generator's parameters and version. Safe when several pytest processes start at once.
`tiny_model_factory(**TinyModelSpec fields)`: the same for other variants (llama, tied, ...).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from megatron_tbrm.demo.tiny import TinyModelSpec, cached_tiny_model

# Tokenizers' thread pool and forked workers do not mix; tests never need it.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_CACHE = Path(__file__).resolve().parents[1] / ".cache" / "tiny_models"


@pytest.fixture(scope="session")
def tiny_model_factory() -> Callable[..., Path]:
    def make(**fields) -> Path:
        return cached_tiny_model(TINY_CACHE, TinyModelSpec(**fields))
    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_model_factory) -> Path:
    return tiny_model_factory()
