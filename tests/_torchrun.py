"""Launch a worker script under torchrun (real processes, gloo) and fail with its output tail."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from megatron_tbrm.ports import torchrun_command

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def torchrun(script: str, nproc: int, *args: str, timeout: float = 240, env: dict | None = None) -> str:
    """Run tests/workers/<script> on `nproc` ranks; returns combined output, raises on failure."""
    cmd = [
        *torchrun_command(nproc), str(WORKERS / script), *map(str, args),
    ]
    full_env = dict(os.environ, PYTHONPATH=f"{REPO}:{WORKERS}", OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} {' '.join(map(str, args))} failed ({proc.returncode}):\n{out[-6000:]}")
    return out
