"""CPU-only patches to vLLM, applied inside the vLLM server processes this trainer starts.

`apply()` is a vLLM general plugin (entry point group ``vllm.general_plugins`` in setup.py):
vLLM calls it in each of its processes (API server, EngineCore, workers) before they build
their message queues. It does nothing unless the server was started by `VLLMServer` with
``shm_busy_loop_s`` set (the environment variable below), and nothing on a machine with CUDA,
so a user's own vLLM servers in the same environment are left alone.

The patch: vLLM's shared-memory message queue (vllm/distributed/device_communicators/
shm_broadcast.py, 0.32) makes each reader (the worker reading the scheduler's step, the
EngineCore reading the worker's output) spin on ``sched_yield`` for ``busy_loop_s`` seconds
after every read before it sleeps on a zmq notification. vLLM hard-codes 1 s, tuned for a GPU
box where the spinning cores are otherwise idle. On a CPU-only machine those cores are the
trainer's: after every rollout two vLLM processes spin for a second each while the update
runs (measured per process in docs/offpolicy.md, "Where the CPU time goes"). A short loop
(0.05 s) keeps the spin between decode steps, which arrive every few ms, and sleeps
between rollouts. 0 is slower, not faster: with no spin every read waits on the zmq
notification, and a missed one costs the 5 s recheck interval (measured: 17.6 s per step).
"""
from __future__ import annotations

import logging
import os

ENV_BUSY_LOOP_S = "MEGATRON_TBRM_SHM_BUSY_LOOP_S"

logger = logging.getLogger("vllm.megatron_tbrm")  # under vLLM's logger: its handler, its format


PLUGIN_NAME = "megatron_tbrm_cpu"  # the entry point's name in setup.py


def busy_loop_env(busy_loop_s: float | None, vllm_plugins: str | None = None) -> dict[str, str]:
    """The server environment that turns the patch on: {} for None (vLLM's own 1 s). When the
    caller's VLLM_PLUGINS allowlist is set (`vllm_plugins`), it gets this plugin's name added, or
    vLLM would skip the plugin and the setting would silently do nothing.

    Raises ValueError for a negative or non-finite value."""
    if busy_loop_s is None:
        return {}
    if not 0 <= float(busy_loop_s) < float("inf"):
        raise ValueError(f"shm_busy_loop_s must be a finite number of seconds >= 0, got {busy_loop_s!r}")
    env = {ENV_BUSY_LOOP_S: repr(float(busy_loop_s))}
    if vllm_plugins is not None and PLUGIN_NAME not in vllm_plugins.split(","):
        env["VLLM_PLUGINS"] = ",".join(p for p in (vllm_plugins, PLUGIN_NAME) if p)
    return env


def plugin_installed() -> bool:
    """Whether vLLM will find the plugin: the package is installed with setup.py's entry points
    (an editable install made before the entry point existed lacks it: pip install -e . again)."""
    from importlib.metadata import entry_points

    return any(ep.name == PLUGIN_NAME for ep in entry_points(group="vllm.general_plugins"))


def apply() -> None:
    """vLLM plugin entry point: cap SpinCondition's reader busy loop at $MEGATRON_TBRM_SHM_BUSY_LOOP_S
    seconds. Idempotent (vLLM may call plugins more than once per process)."""
    value = os.environ.get(ENV_BUSY_LOOP_S)
    if not value:
        return
    # vLLM's platform, not torch.cuda.is_available(): that would initialise CUDA in the API server
    # before it forks the engine (torch: "poisons fork").
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():  # GPU boxes keep vLLM's tuning
        return
    from vllm.distributed.device_communicators import shm_broadcast

    cls = getattr(shm_broadcast, "SpinCondition", None)
    if cls is None or not hasattr(cls, "wait"):
        logger.warning("megatron_tbrm: this vLLM has no shm_broadcast.SpinCondition; %s=%s ignored",
                       ENV_BUSY_LOOP_S, value)
        return
    if getattr(cls, "_megatron_tbrm_busy_loop_s", None) is not None:
        return
    busy = float(value)
    original_wait = cls.wait

    def wait(self, timeout_ms=None):
        # Readers set busy_loop_s in __init__, and some queues are built before plugins load
        # (the worker's input queue): cap it here, where it is read, so every queue gets it.
        if getattr(self, "busy_loop_s", 0) > busy:
            self.busy_loop_s = busy
        return original_wait(self, timeout_ms)

    cls.wait = wait
    cls._megatron_tbrm_busy_loop_s = busy
    logger.info("megatron_tbrm: vLLM shm reader busy loop capped at %g s (CPU; vLLM's default is 1 s)", busy)
