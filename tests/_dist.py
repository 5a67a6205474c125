"""Run a function in N real processes over gloo (torch.multiprocessing + a file store).

    results = run_distributed(fn, world_size, *args)   # list, one return value per rank

`fn(rank, world_size, *args)` runs after `init_process_group("gloo")` and must be picklable
(a module-level function). Return values come back through files written with torch.save,
which avoids the shared-memory lifetime rules of tensors sent over queues. An exception in any
rank fails the call with that rank's traceback.

Processes start by "forkserver": a clean server process (no threads, so forking it is safe,
unlike forking pytest) imports torch once per session and forks each rank from it. With plain
spawn every rank re-imports torch, ~2.5 CPU-seconds each, which dominated the test time.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, out_dir: str, fn: Callable, args: tuple) -> None:
    # N processes on a 2-core machine: one thread each, or they fight over the cores.
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        # A file store: no port picked here for rank 0 to bind later (another process can take it).
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world_size
    )
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    with tempfile.TemporaryDirectory() as out_dir:
        mp.set_forkserver_preload(["torch", "torch.distributed"])
        mp.start_processes(
            _worker,
            args=(world_size, out_dir, fn, args),
            nprocs=world_size,
            join=True,
            start_method="forkserver",
        )
        return [
            torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
            for r in range(world_size)
        ]
