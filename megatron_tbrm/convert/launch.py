"""The converters' worker processes: a minimal torchrun for a command run TP x PP times.

Only the standard library at module level: the converters import this, and the processes
dist_checkpointing spawns re-import the converter module (torch would cost them seconds).
"""
from __future__ import annotations

import os
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

# The folder holding megatron_tbrm/: a checkout's root, or site-packages once installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


def module_command(module: str) -> list[str]:
    """`python -m module` with this interpreter."""
    return [sys.executable, "-m", module]


def _worker_env(nproc: int, store_port: int) -> dict[str, str]:
    # As torchrun does: the ranks are clients of the launcher's store (rank 0 does not bind a
    # port picked ahead of time, which another process can take first).
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    # A checkout run without an install (tools/*.py put its root on their own sys.path only):
    # the workers import megatron_tbrm from the same place. An installed package needs nothing.
    if _PACKAGE_ROOT not in site.getsitepackages():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env


def launch(command: str | Sequence[str], nproc: int, argv: Sequence[str]) -> int:
    """Run `command argv` as `nproc` local ranks with torchrun's environment variables.
    `command` is a script path (run with this interpreter) or a full command line.

    A minimal torchrun: it hosts the ranks' rendezvous store on a port it binds itself, and
    when one rank fails the others are stopped instead of waiting in a collective until the
    timeout.
    """
    from torch.distributed import TCPStore  # here, not at module level (see the module docstring)

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    cmd = [sys.executable, command] if isinstance(command, (str, os.PathLike)) else list(command)
    env = _worker_env(nproc, store.port)
    procs = [subprocess.Popen([*cmd, *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()


def is_worker(module: str, nproc: int, argv: Sequence[str]) -> bool:
    """True when this process does the work: a launched rank, or a world of one. Otherwise
    launch `nproc` ranks of `python -m module argv` and return False once they all succeeded."""
    if "WORLD_SIZE" not in os.environ:
        if nproc > 1:
            rc = launch(module_command(module), nproc, argv)
            if rc:
                raise SystemExit(f"error: conversion workers failed (exit code {rc})")
            return False
    elif int(os.environ["WORLD_SIZE"]) != nproc:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but --tp x --pp = {nproc}: "
                         f"run one process per model-parallel rank")
    return True
