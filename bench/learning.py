#!/usr/bin/env python
"""Does the demo recipe learn? Benchmarks for issue 15 (these are runs, not tests).

    # item 2: the demo end to end (warm start + TBRM) for several seeds -> a markdown table
    python bench/learning.py seeds --seeds 0 1 2 3 4 [--out runs/learn/seeds] [-- key.sub=value ...]
    # item 3: TBRM n=1, GRPO n=4 (same samples per step) and TBRM n=4 from the same warm starts
    python bench/learning.py compare --warm runs/learn/seeds/seed0 --seeds 0 1 2 [--out runs/learn/compare]
    # issue 18 item 4: the same, with stale rollouts (train.max_staleness k)
    python bench/learning.py compare --warm runs/learn/seeds/seed0 --seeds 0 1 2 --out runs/learn/staleness \
        --methods tbrm_n1 tbrm_n1_k1 tbrm_n1_k2 grpo_n4_lr1e-4 grpo_n4_k1 grpo_n4_k1_recompute
    # why a run did (not) learn: V(s_1), residuals on successes and failures, grad norm, the
    # log-ratio of successful responses, reward and held-out accuracy per window of steps
    python bench/learning.py diag RUN_DIR [RUN_DIR ...] [--window 25]

`seeds` runs `python -m megatron_tbrm.demo --out OUT/seed{S} --sft-seed S --seed S` for each
seed S (the warm start's data order and the RL run's sampling seed both change), one after the
other, and reads each summary.json. A failed warm start is a row too. `compare` reuses a
demo folder's warm start (sft_model, data) and runs the three methods per seed, then
tools/compare_runs.py for the table and the plot (held-out accuracy vs steps and vs wall time).

All runs use OMP_NUM_THREADS=1 (2-core machine); run one benchmark at a time.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megatron_tbrm.ports import torchrun_command  # noqa: E402

GOAL = 0.15

# The side-by-side (item 3): the same number of fresh samples per step (64) for all three, none
# replayed (data.replay.per_step=0: as every run of docs/learning.md before section 2g, when the
# recipe had no replay); "_replay" methods keep the recipe's replay of successes (64 more a step).
NO_REPLAY = "data.replay.per_step=0"
METHODS = {
    "tbrm_n1": ["loss.name=tbrm", "rollout.n=1", "train.prompts_per_step=64", NO_REPLAY],
    "tbrm_n1_replay": ["loss.name=tbrm", "rollout.n=1", "train.prompts_per_step=64"],
    "grpo_n4": ["loss.name=grpo", "rollout.n=4", "train.prompts_per_step=16", NO_REPLAY],
    "tbrm_n4": ["loss.name=tbrm", "rollout.n=4", "train.prompts_per_step=16", NO_REPLAY],
    # Staleness (issue 18 item 4): rollouts for the next k steps overlap the update. TBRM uses
    # no correction; GRPO's ratio is taken against the sampler's log-probs (its off-policy
    # correction) or, as "recompute", against the policy before the update (none: the setting
    # public async runs have seen collapse). GRPO at lr 1e-4, where it learned synchronously
    # (it collapsed at 3e-4, the recipe's lr then: docs/learning.md section 4).
    # GRPO's synchronous reference for the staleness runs, at their lr.
    "grpo_n4_lr1e-4": ["loss.name=grpo", "rollout.n=4", "train.prompts_per_step=16", "optim.lr=1.0e-4",
                       NO_REPLAY],
    "tbrm_n1_k1": ["loss.name=tbrm", "rollout.n=1", "train.prompts_per_step=64", "train.max_staleness=1", NO_REPLAY],
    "tbrm_n1_k2": ["loss.name=tbrm", "rollout.n=1", "train.prompts_per_step=64", "train.max_staleness=2", NO_REPLAY],
    "grpo_n4_k1": ["loss.name=grpo", "rollout.n=4", "train.prompts_per_step=16", "train.max_staleness=1", NO_REPLAY,
                   "loss.old_logprobs=rollout", "optim.lr=1.0e-4"],
    "grpo_n4_k1_recompute": ["loss.name=grpo", "rollout.n=4", "train.prompts_per_step=16", "train.max_staleness=1",
                             NO_REPLAY, "loss.old_logprobs=recompute", "optim.lr=1.0e-4"],
}
# The side-by-side of issue 15 item 3; `--methods` picks others (e.g. the staleness ones).
DEFAULT_METHODS = ["tbrm_n1", "grpo_n4", "tbrm_n4"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO))


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def _mean(xs):
    xs = [x for x in xs if isinstance(x, (int, float)) and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------- diag


def diagnose(run_dir: Path, window: int = 25, beta: float | None = None) -> str:
    """One line per window of steps: the quantities that say why TBRM moves or not. Reward and
    successes per step are the fresh rollouts'; with data.replay the residuals, V(s_1) and
    log-ratios are over the trained batch, replayed successes included."""
    rows = _rows(run_dir)
    if beta is None:
        cfg = json.loads((run_dir / "config.json").read_text())
        beta = cfg["loss"]["beta"]
    evals = {r["step"]: r["eval_accuracy"] for r in rows if r.get("eval_accuracy") is not None}
    train = [r for r in rows if r.get("loss") is not None]
    head = ("| steps | reward | successes/step | V(s_1) | delta succ | delta fail | log-ratio succ | "
            "log-ratio all | grad norm | held-out acc (end) |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for lo in range(0, max((r["step"] for r in train), default=0), window):
        w = [r for r in train if lo < r["step"] <= lo + window]
        if not w:
            continue
        # the policy's own samples (rollout_reward_mean); reward_mean also counts trajectory-file
        # and replayed samples
        reward = [r.get("rollout_reward_mean", r.get("reward_mean")) for r in w]
        succ = [(r.get("rollout_reward_mean", r.get("reward_mean")) or 0) *
                (r.get("trajectories", 0) - r.get("trajectory_samples", 0) - r.get("replay_samples", 0)) for r in w]
        # delta_success = V + log-ratio(successes) - 1/beta  =>  log-ratio of successes
        lr_succ = [r["delta_success_mean"] - r["v_s1_mean"] + 1.0 / beta for r in w
                   if r.get("delta_success_mean") is not None and r.get("v_s1_mean") is not None]
        end = max(r["step"] for r in w)
        acc = evals.get(end)
        lines.append(
            f"| {lo + 1}-{end} | {_mean(reward):.3f} | {_mean(succ):.1f} | "
            f"{_mean([r.get('v_s1_mean') for r in w]):.2f} | {_mean([r.get('delta_success_mean') for r in w]):.2f} | "
            f"{_mean([r.get('delta_failure_mean') for r in w]):.2f} | {_mean(lr_succ):.2f} | "
            f"{_mean([r.get('log_ratio_sum_mean') for r in w]):.2f} | {_mean([r.get('grad_norm') for r in w]):.1f} | "
            f"{'' if acc is None else f'{acc:.3f}'} |")
    start = evals.get(0)
    return f"{run_dir} (beta {beta}; held-out accuracy at step 0: {start})\n" + "\n".join(lines)


# ---------------------------------------------------------------------------------- seeds


def summary_row(seed: int, demo_dir: Path) -> dict:
    s_path, w_path = demo_dir / "summary.json", demo_dir / "sft.json"
    row = {"seed": seed, "dir": str(demo_dir)}
    if w_path.exists():
        w = json.loads(w_path.read_text())
        row.update(probe=w.get("probe_accuracy"), sft_steps=w.get("steps"), band_status=w.get("band_status"),
                   sft_s=w.get("seconds"))
    if s_path.exists():
        s = json.loads(s_path.read_text())
        ws = s.get("warm_start") or {}
        # a reused warm start (--reuse-sft) counts its recorded seconds, as the demo's time box does
        reused_s = ws.get("sft_seconds", 0.0) if ws.get("reused") else 0.0
        row.update(start=s["accuracy_before"], end=s["accuracy_after"], last3=s["accuracy_after_mean_last3"],
                   gain=s["accuracy_after_mean_last3"] - s["accuracy_before"], verdict=s.get("verdict"),
                   wall_s=s["wall_seconds"] + reused_s, rl_s=s.get("rl_wall_seconds"), steps=s["steps"])
    return row


def seeds_table(rows: list[dict]) -> str:
    out = ["| seed (SFT, RL) | warm start: probe acc (SFT steps) | start (held-out) | end (step) | mean of last 3 | "
           "gain (last 3 - start) | verdict | wall (demo total / RL) |",
           "|---|---|---|---|---|---|---|---|"]
    ok = 0
    for r in rows:
        if "start" not in r:
            out.append(f"| {r['seed']} | {r.get('probe', float('nan')):.3f} ({r.get('sft_steps')}) "
                       f"{r.get('band_status', 'no warm start')} | - | - | - | - | not run | - |")
            continue
        ok += r["gain"] >= GOAL - 1e-9
        out.append(f"| {r['seed']} | {r['probe']:.3f} ({r['sft_steps']}) | {r['start']:.3f} | {r['end']:.3f} ({r['steps']}) | "
                   f"{r['last3']:.3f} | {r['gain']:+.3f} | {r['verdict']} | {r['wall_s'] / 60:.1f} / "
                   f"{(r.get('rl_s') or float('nan')) / 60:.1f} min |")
    out.append(f"\n{ok} of {len(rows)} seeds reached the goal (mean of the last 3 evaluations >= start + {GOAL}).")
    return "\n".join(out)


def cmd_seeds(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in a.seeds:
        d = out / f"seed{seed}"
        if not (a.skip_done and (d / "summary.json").exists()):
            cmd = [sys.executable, "-m", "megatron_tbrm.demo", "--out", str(d.resolve()), "--sft-seed", str(seed),
                   "--seed", str(seed), *a.overrides]
            print("[learning] $", " ".join(cmd), flush=True)
            with open(out / f"seed{seed}.log", "w") as log:
                subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        rows.append(summary_row(seed, d))
        table = seeds_table(rows)
        (out / "seeds.md").write_text(table + "\n")
        (out / "seeds.json").write_text(json.dumps(rows, indent=1))
        print(table, flush=True)


# ---------------------------------------------------------------------------------- compare


def cmd_compare(a) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    warm = Path(a.warm)
    runs = []
    for seed in a.seeds:
        for name in a.methods:
            run = out / f"{name}_s{seed}"
            runs.append(run)
            if a.skip_done and (run / "metrics.jsonl").exists() and any(
                    r.get("step") == a.steps for r in _rows(run)):
                continue
            if run.exists():
                import shutil

                shutil.rmtree(run)
            cmd = [*torchrun_command(2), "-m", "megatron_tbrm.train",
                   "--config", str(REPO / "recipes" / "tiny_cpu.yaml"), f"model.path={warm / 'sft_model'}",
                   f"data.train_path={warm / 'data' / 'train.jsonl'}", f"eval.path={warm / 'data' / 'test.jsonl'}",
                   f"run.dir={run}", "run.progress=false", "checkpoint.save_every=0", f"train.steps={a.steps}",
                   f"parallel.seed={seed}", f"data.seed={seed}", *METHODS[name], *a.overrides]
            print("[learning] $", " ".join(cmd), flush=True)
            t0 = time.time()
            with open(out / f"{name}_s{seed}.log", "w") as log:
                subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT)
            print(f"[learning] {name} seed {seed}: {time.time() - t0:.0f} s", flush=True)
    done = [r for r in runs if (r / "metrics.jsonl").exists()]
    res = subprocess.run([sys.executable, str(REPO / "tools" / "compare_runs.py"), *map(str, done),
                          "--out", str(out / "compare.png"), "--last", "3"],
                         cwd=REPO, env=_env(), capture_output=True, text=True)
    print(res.stdout + res.stderr)
    (out / "compare.md").write_text(res.stdout)
    # Mean over seeds per method: start, mean of the last 3 evaluations, wall time, and the step's
    # clock (median s per step; staleness and idle times are logged with train.max_staleness > 0).
    lines = ["| method | seeds | start | mean of last 3 evals | gain | RL wall time | median s/step | staleness mean / max "
             "| trainer idle s/step | rollout idle s/step |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in a.methods:
        per = []  # one dict per finished run of this method
        for r in (out / f"{name}_s{seed}" for seed in a.seeds):  # the names the loop above gave them
            rows = _rows(r) if r in done else []
            ev = [x["eval_accuracy"] for x in rows if x.get("eval_accuracy") is not None]
            steps = [x for x in rows if x.get("step_s") is not None]
            if len(ev) >= 2 and steps:
                per.append(dict(start=ev[0], last3=_mean(ev[-3:]), wall=max(x.get("wall_time") or 0 for x in rows),
                                step_s=statistics.median(x["step_s"] for x in steps),
                                **{k: _mean([x.get(k, 0.0) for x in steps])
                                   for k in ("staleness_mean", "trainer_idle_s", "rollout_idle_s")},
                                staleness_max=max(x.get("staleness_max", 0.0) for x in steps)))
        if per:
            m = {k: _mean([p[k] for p in per]) for k in per[0]}
            lines.append(f"| {name} | {len(per)} | {m['start']:.3f} | {m['last3']:.3f} | {m['last3'] - m['start']:+.3f} "
                         f"| {m['wall'] / 60:.1f} min | {m['step_s']:.2f} | {m['staleness_mean']:.2f} / "
                         f"{m['staleness_max']:.0f} | {m['trainer_idle_s']:.2f} | {m['rollout_idle_s']:.2f} |")
    print("\n".join(lines))
    (out / "compare_by_method.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("seeds")
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    s.add_argument("--out", default="runs/learn/seeds")
    s.add_argument("--skip-done", action="store_true", help="keep seeds whose summary.json exists")
    s.add_argument("overrides", nargs="*", help="demo arguments / key.sub=value recipe overrides")
    c = sub.add_parser("compare")
    c.add_argument("--warm", required=True, help="a demo folder (its sft_model and data)")
    c.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    c.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    c.add_argument("--steps", type=int, default=150)
    c.add_argument("--out", default="runs/learn/compare")
    c.add_argument("--skip-done", action="store_true")
    c.add_argument("overrides", nargs="*", help="key.sub=value recipe overrides for every method")
    d = sub.add_parser("diag")
    d.add_argument("runs", nargs="+")
    d.add_argument("--window", type=int, default=25)
    a = ap.parse_args(argv)
    if a.cmd == "seeds":
        cmd_seeds(a)
    elif a.cmd == "compare":
        cmd_compare(a)
    else:
        for r in a.runs:
            print(diagnose(Path(r), a.window) + "\n")


if __name__ == "__main__":
    main()
