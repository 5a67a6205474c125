#!/usr/bin/env python
"""Step time of the demo recipe under two sets of overrides, side by side, from one warm start.

Each arm trains the demo recipe (recipes/tiny_cpu.yaml: replay, value offset, 64 prompts a step)
from the same warm start (a demo folder's sft_model and data), seeds and first batch, for
`--steps` steps, one run at a time in ABBA order (A, B, B, A for `--repeats 2`), and the bench
prints the medians of the step and of its parts per run (after the first `--skip` steps: start-up
and the replay buffer filling), their means per arm and B / A. The first step's loss is printed
per run: the arms differ only in their overrides, so it says how far the first update already
parts (0 for an exact change). No evaluation, no checkpoints. Run nothing else beside it.

    python bench/settings.py --demo runs/demo --a model.dtype=fp32 rollout.dtype=fp32 \
        --b model.dtype=bf16 rollout.dtype=bf16 [--steps 60] [--skip 20] [--repeats 2] [--seed 1] \
        [--work runs/bench-settings]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from step import abba_step_times, run_logged, train_command  # noqa: E402


def run(demo: Path, steps: int, seed: int, run_dir: Path, overrides: list[str]) -> list[dict]:
    """The per-step metrics of one run of the demo recipe from `demo`'s warm start."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = train_command(2, demo / "sft_model", demo / "data" / "train.jsonl", run_dir, steps,
                        f"parallel.seed={seed}", f"data.seed={seed}", *overrides)
    run_logged(cmd, run_dir / "launcher.log", f"run in {run_dir}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "step_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", type=Path, required=True, help="a demo folder (sft_model, data/train.jsonl)")
    ap.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="arm A's overrides")
    ap.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="arm B's overrides")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=20, help="steps left out of the medians")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per arm, in ABBA order (even)")
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "bench-settings")
    a = ap.parse_args()
    if a.repeats < 2 or a.repeats % 2:
        ap.error(f"--repeats {a.repeats}: give an even number >= 2 (ABBA order)")
    if a.steps <= a.skip:
        ap.error(f"--steps {a.steps} must be larger than --skip {a.skip}")
    if a.a == a.b:
        ap.error("--a and --b are the same overrides: nothing to compare")
    demo = a.demo.resolve()
    for p in (demo / "sft_model" / "config.json", demo / "data" / "train.jsonl"):
        if not p.exists():
            ap.error(f"--demo {demo}: {p} is missing (a folder `python -m megatron_tbrm.demo` wrote)")
    arms = {"A": a.a, "B": a.b}
    for name, over in arms.items():
        print(f"{name}: {' '.join(over) or '(the recipe)'}")
    work = a.work.resolve()
    abba_step_times({arm: (lambda i, arm=arm: run(demo, a.steps, a.seed, work / f"{i}_{arm}", arms[arm])) for arm in arms},
                    a.repeats, a.skip)


if __name__ == "__main__":
    main()
