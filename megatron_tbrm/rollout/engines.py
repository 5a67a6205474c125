"""Several vLLM engines side by side: where each runs, and calling all of them at once.

An engine is one vLLM server (rollout.engines of them, each rollout.tensor_parallel_size
GPUs); they hold the same weights and answer the same requests alike (per-request seeds), so
any engine can serve any request. The client routes (client.py), the weight sync pushes into
every one (weight_sync.py), the manager starts, restarts, sleeps and wakes them (manager.py).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Callable, Optional, Sequence, TypeVar

if TYPE_CHECKING:
    from .server import VLLMServer

T = TypeVar("T")


def engine_devices(engines: int, tensor_parallel_size: int, visible: Optional[str] = None) -> list[str]:
    """CUDA_VISIBLE_DEVICES of each engine: engine i gets devices i*tp .. (i+1)*tp - 1 of the
    devices this process sees (`visible`: its own CUDA_VISIBLE_DEVICES, default the
    environment's; unset: 0, 1, ...), so together they cover the first engines x tp GPUs and
    no two share one. ValueError when there are fewer devices than that (a count is only
    known from an explicit list; validation checks torch.cuda.device_count())."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    need = engines * tensor_parallel_size
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else [str(i) for i in range(need)]
    if len(ids) < need:
        raise ValueError(f"{engines} engines x tensor_parallel_size {tensor_parallel_size} need {need} GPUs; "
                         f"CUDA_VISIBLE_DEVICES={visible!r} lists {len(ids)}")
    return [",".join(ids[i * tensor_parallel_size:(i + 1) * tensor_parallel_size]) for i in range(engines)]


def engine_cpu_binds(engines: int, tensor_parallel_size: int, cpus: Optional[Sequence[int]] = None) -> list[Optional[str]]:
    """VLLM_CPU_OMP_THREADS_BIND of each engine on a CPU host: the cores this process may use
    (`cpus`, default os.sched_getaffinity(0)) split into `engines` equal disjoint shares, each
    share split over the engine's tensor_parallel_size workers ("0-3|4-7": one list per worker).

    Without it every vLLM CPU engine binds its worker to the same cores (vLLM's "auto" takes the
    last cores of the NUMA node), so a second engine only competes with the first (measured in
    docs/throughput.md: 3.3x slower than one engine on 2 cores). One engine keeps vLLM's
    "auto" (None). ValueError when there are fewer cores than engines x tensor_parallel_size."""
    if engines == 1:
        return [None]
    cores = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    need = engines * tensor_parallel_size
    if len(cores) < need:
        raise ValueError(f"{engines} CPU engines x tensor_parallel_size {tensor_parallel_size} need {need} cores "
                         f"(one per worker); this process may use {len(cores)}")
    per_engine, per_worker = len(cores) // engines, len(cores) // engines // tensor_parallel_size
    binds = []
    for e in range(engines):
        share = cores[e * per_engine:(e + 1) * per_engine]
        workers = [share[w * per_worker:(w + 1) * per_worker] for w in range(tensor_parallel_size)]
        binds.append("|".join(",".join(map(str, w)) for w in workers))
    return binds


def each(servers: Sequence["VLLMServer"], fn: Callable[["VLLMServer"], T]) -> list[T]:
    """fn(server) for every engine at once (one thread each), results in order; the first
    error (in engine order) is raised once every call has ended, so no call is left running
    against an engine the caller goes on to recover."""
    if len(servers) == 1:
        return [fn(servers[0])]
    with ThreadPoolExecutor(len(servers)) as pool:
        futures = [pool.submit(fn, s) for s in servers]
        for f in futures:
            f.exception()  # wait for all
    return [f.result() for f in futures]


def start_all(servers: Sequence["VLLMServer"], timeout: float) -> None:
    """Start every engine, then wait for all to be healthy (they load in parallel). An engine
    that lost its picked port (PortTaken) is started again here, on this thread, which its
    parent-death signal follows. On an error every engine started here is stopped again."""
    from .server import PortTaken

    def port_lost(s: "VLLMServer") -> bool:
        try:
            s.wait_healthy(timeout)
            return False
        except PortTaken:
            return True

    try:
        for s in servers:
            s.start()
        waiting = list(servers)
        while waiting:  # bounded: each PortTaken uses one of the server's PORT_RETRIES
            waiting = [s for s, lost in zip(waiting, each(waiting, port_lost)) if lost]
            for s in waiting:
                s.start_on_new_port()
    except BaseException:
        for s in servers:
            s.stop()
        raise
