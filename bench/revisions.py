#!/usr/bin/env python
"""Step time of this checkout against another revision, side by side, from one checkpoint.

A throughput change that is exact should leave the work the same and take less time. This
resumes the same checkpoint of a demo run (its policy, optimizer, replay buffer and data
position: the steady state, not start-up) for `--steps` steps under the base revision (a git
worktree of `--base`, made under `--work`) and under this checkout, in ABBA order (base, head,
head, base for `--repeats 2`), one run at a time, and prints the medians of the step and of its
parts per run, their means per revision and head / base. Every run has the same seeds and the
same first batch: the first step's loss is printed per run as a check that both trained on the
same data (later steps may part: an exact change can still reorder float sums, and sampling at
T = 1 amplifies that).

    python bench/revisions.py --base 6272e79 --demo runs/learn/tb20/seed1 --from-step 400 [--steps 60] \
        [--repeats 2] [--work runs/bench-revisions] [key.sub=value ...]

`--demo` is a folder `python -m megatron_tbrm.demo` wrote (sft_model, data, tbrm/checkpoints);
the runs use recipes/tiny_cpu.yaml with that folder's paths, seeds 1 (`--seed`), no evaluation
and no checkpoints. The steps' medians skip the first 20 (after a resume the buffer's older
entries may predate a change; the next steps replace them). Run nothing else beside it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from step import abba_step_times, run_logged  # noqa: E402

from megatron_tbrm.ports import torchrun_command  # noqa: E402

SKIP = 20


def worktree(rev: str, path: Path) -> Path:
    """A detached git worktree of `rev` at `path` (made anew)."""
    if path.exists():
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=REPO, check=False)
        shutil.rmtree(path, ignore_errors=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO, check=True,
                   stdout=subprocess.DEVNULL)
    return path


def run(code: Path, demo: Path, start: int, steps: int, seed: int, run_dir: Path, overrides: list[str]) -> list[dict]:
    """The demo recipe resumed from `demo`'s checkpoint at step `start` for `steps` steps, with the
    package of `code` (the ranks run in that folder, which comes first on their sys.path)."""
    src = demo / "tbrm" / "checkpoints" / f"iter_{start:07d}"
    if not src.is_dir():
        raise SystemExit(f"--from-step {start}: no checkpoint {src}")
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(src, run_dir / "checkpoints" / src.name)
    (run_dir / "checkpoints" / "latest").write_text(src.name)
    cmd = [*torchrun_command(2), "-m", "megatron_tbrm.train", "--config", str(REPO / "recipes/tiny_cpu.yaml"),
           "--resume", f"model.path={demo.resolve() / 'sft_model'}",
           f"data.train_path={demo.resolve() / 'data/train.jsonl'}", f"run.dir={run_dir.resolve()}",
           f"train.steps={start + steps}", f"parallel.seed={seed}", f"data.seed={seed}", "eval.every=0",
           "checkpoint.save_every=0", "run.progress=false", *overrides]
    run_logged(cmd, run_dir / "launcher.log", f"run in {run_dir}", cwd=code)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="git revision to compare this checkout against")
    ap.add_argument("--demo", type=Path, required=True, help="a demo folder with tbrm/checkpoints")
    ap.add_argument("--from-step", type=int, required=True, help="the checkpoint to resume (iter_N)")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per revision, in ABBA order (even)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-revisions")
    ap.add_argument("overrides", nargs="*", help="key.sub=value for both revisions")
    a = ap.parse_args()
    if a.repeats < 2 or a.repeats % 2 or a.steps <= SKIP:
        raise SystemExit(f"--repeats must be even and >= 2 (got {a.repeats}); --steps > {SKIP} (got {a.steps})")
    base = worktree(a.base, a.work / "base_tree")
    abba_step_times({"base": lambda i: run(base, a.demo, a.from_step, a.steps, a.seed, a.work / f"{i}_base", a.overrides),
                     "head": lambda i: run(REPO, a.demo, a.from_step, a.steps, a.seed, a.work / f"{i}_head", a.overrides)},
                    a.repeats, SKIP)


if __name__ == "__main__":
    main()
