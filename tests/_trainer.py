"""Run the trainer under torchrun (real processes, gloo) on the tiny recipe with small sizes;
returns the rows of RUN/metrics.jsonl, or fails with the output tail."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Optional

from megatron_tbrm.ports import torchrun_command

REPO = Path(__file__).resolve().parents[1]


def run_trainer(run_dir: Path, model: Path, data: Optional[tuple], *overrides: str, server_url: Optional[str] = None,
                nproc: int = 2, resume: bool = False, timeout: float = 900) -> list[dict]:
    """`data`: (train, test) prompt files, or None (trajectory files only: pass data.trajectories)."""
    cmd = [*torchrun_command(nproc), "-m", "megatron_tbrm.train", "--config", str(REPO / "recipes/tiny_cpu.yaml"),
           f"model.path={model}", f"run.dir={run_dir}", "rollout.max_tokens=24", "train.prompts_per_step=8",
           "train.micro_batch_size=2", "eval.every=0", "run.progress=false", "model.value_offset=false",
           "loss.beta=0.5", "data.replay.per_step=0"]  # the demo's replay off: these runs test other things
    if data is not None:
        cmd += [f"data.train_path={data[0]}", f"eval.path={data[1]}"]
    else:
        cmd += ["data.train_path=", "eval.path=null"]
    if server_url:
        cmd.append(f"rollout.server_url={server_url}")
    cmd += list(overrides) + (["--resume"] if resume else [])
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if p.returncode:
        raise AssertionError(f"trainer failed ({p.returncode}):\n{(p.stdout + p.stderr)[-8000:]}")
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
