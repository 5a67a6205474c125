"""A real vLLM CPU server for the tiny model, healthy inside the `with`, stopped after.

    with vllm_server(model_dir, work_dir, max_num_seqs=8) as srv: ...

Module-scoped fixtures share one per test file (a start costs ~1-2 min on 2 cores; why, and
how the suite is kept short: docs/ci.md).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from megatron_tbrm.rollout import VLLMServer

# fp32 (exact comparisons with the trainer), a small KV cache, fixed sampling seed, offline.
DEFAULTS = dict(dtype="float32", max_model_len=512, kv_cache_bytes=128 * 2**20, seed=0, env={"HF_HUB_OFFLINE": "1"})


@contextlib.contextmanager
def vllm_server(model: Path, work_dir: Path, timeout: float = 900, **kw) -> Iterator[VLLMServer]:
    srv = VLLMServer(model, work_dir=work_dir, **{**DEFAULTS, **kw})
    try:
        srv.start().wait_healthy(timeout)
        yield srv
    finally:  # the server's whole process group, also after a failed start
        srv.stop()
