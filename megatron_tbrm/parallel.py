"""torch.distributed + megatron-core parallel state (TP, PP, virtual PP, CP, DP) under torchrun.

gloo on CPU (with megatron_tbrm.cpu_patches applied), NCCL on GPU. Seeds: the same base seed
on every rank for data/sampling, and megatron-core's model-parallel RNG tracker for
TP-sharded initialisation, so weights are identical for any parallel layout when
`use_cpu_initialization` is on.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from . import cpu_patches


@dataclass(frozen=True)
class ParallelState:
    rank: int
    world_size: int
    local_rank: int
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    vpp_size: Optional[int]
    cp_size: int
    dp_rank: int
    dp_size: int
    device: torch.device

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def die_with_launcher() -> None:
    """torchrun starts every rank in its own session, so a SIGKILL of the launcher (or of its
    process group) would leave the ranks running unsupervised. Ask the kernel to SIGKILL this
    rank when its parent (the launcher) dies; rank 0's vLLM server follows by its own PDEATHSIG."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() == 1:  # the launcher died before prctl took effect
        os._exit(1)
    if os.getpgid(0) == os.getpid():  # torchrun made this rank a group leader
        _start_group_reaper()


# A SIGKILLed rank cannot clean up: the multiprocessing helpers it started (mcore's checkpoint
# writer Manager, resource trackers) would live on. This process, in its own session so a kill
# of the trainer's groups spares it, learns of the rank's death by PR_SET_PDEATHSIG, gives the
# group 3 s to exit by itself (a normal exit: helpers finish their own cleanup), then SIGKILLs it.
_REAPER = r"""
import ctypes, os, signal, sys, time
pgid, parent = int(sys.argv[1]), int(sys.argv[2])
def reap(*_):
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            os._exit(0)
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os._exit(0)
signal.signal(signal.SIGTERM, reap)
ctypes.CDLL(None).prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
if os.getppid() != parent:
    reap()
while True:
    signal.pause()
"""


_reaper = None


def _start_group_reaper() -> None:
    import subprocess
    import sys

    global _reaper
    _reaper = subprocess.Popen(
        [sys.executable, "-c", _REAPER, str(os.getpgid(0)), str(os.getpid())],
        stdin=subprocess.DEVNULL, start_new_session=True,
    )


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    vpp: Optional[int] = None,
    cp: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> ParallelState:
    """Initialise (or reuse) the default process group and megatron-core's model-parallel groups.

    Reads RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT as set by torchrun; a plain
    `python` run is a world of one (its store on a free port unless MASTER_PORT is set).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun rank
        die_with_launcher()
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        cpu_patches.apply()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size % (tp * pp * cp):
        raise ValueError(f"tp x pp x cp = {tp} x {pp} x {cp} does not divide the world size {world_size}")
    if on_gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        # A world of one binds a free port itself (0): a fixed or picked-ahead one can be taken.
        os.environ.setdefault("MASTER_PORT", "0" if world_size == 1 else "29500")
        dist.init_process_group(
            backend="nccl" if on_gpu else "gloo",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )
    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    mpu.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    cpu_patches.apply_torch_adam_fixes()
    set_seed(seed)
    # Offsets per TP rank for sharded init/dropout; the tracker is required even with dropout 0.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return current_state()


def current_state() -> ParallelState:
    from megatron.core import parallel_state as mpu

    return ParallelState(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        tp_rank=mpu.get_tensor_model_parallel_rank(),
        tp_size=mpu.get_tensor_model_parallel_world_size(),
        pp_rank=mpu.get_pipeline_model_parallel_rank(),
        pp_size=mpu.get_pipeline_model_parallel_world_size(),
        vpp_size=mpu.get_virtual_pipeline_model_parallel_world_size(),
        cp_size=mpu.get_context_parallel_world_size(),
        dp_rank=mpu.get_data_parallel_rank(),
        dp_size=mpu.get_data_parallel_world_size(),
        device=torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"),
    )


def destroy_distributed(barrier: bool = True) -> None:
    """Tear down cleanly: an exit without destroy_process_group() sometimes aborts under gloo.
    After an error pass barrier=False: the other ranks may be blocked in a collective, and the
    launcher stops them once this rank exits non-zero."""
    from megatron.core import parallel_state as mpu

    if mpu.model_parallel_is_initialized():
        mpu.destroy_model_parallel()
    if dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()
