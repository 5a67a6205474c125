"""The vLLM server's command line: extra arguments from a recipe (list or dict) and the
scheduler settings that keep the CPU engine alive."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def extra_cli_args(extra: list[str] | dict[str, Any] | None) -> list[str]:
    """Extra vLLM CLI args: a list is passed as is; a dict maps "flag" -> value, where
    True means a bare flag and False/None leave the flag out."""
    if extra is None:
        return []
    if isinstance(extra, (list, tuple)):
        return [str(a) for a in extra]
    out: list[str] = []
    for key, value in extra.items():
        flag = key if key.startswith("--") else "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not None and value is not False:
            out += [flag, str(value)]
    return out


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def cpu_scheduler_args(model: str | os.PathLike, max_model_len: int | None) -> list[str]:
    """vLLM CLI args that keep the CPU engine alive under seeded sampling.

    With chunked prefill, a prompt that does not fit the step's batched-token budget is
    prefilled over several scheduler steps; vLLM samples a token for it on each partial step,
    discards it and rewinds the request's generator with `Generator.set_offset`, which CPU
    generators lack: `RuntimeError: CPU Generator does not use offset` kills the engine
    (vllm/v1/worker/gpu_model_runner.py, 0.32). Without chunked prefill every prompt is
    prefilled in one step, nothing is discarded, and per-request seeds stay reproducible.
    vLLM then needs a budget of at least max_model_len tokens per step."""
    if max_model_len is None:
        import json

        try:
            cfg = json.loads((Path(model) / "config.json").read_text())
            max_model_len = int(cfg.get("max_position_embeddings") or 0) or None
        except (OSError, ValueError):
            max_model_len = None
    return ["--no-enable-chunked-prefill", "--max-num-batched-tokens", str(max(max_model_len or 0, 4096))]
