"""Compare training runs side by side: one markdown table and one PNG plot.

    megatron-tbrm-compare-runs RUN_DIR RUN_DIR ... [--out compare.png] [--metric rollout_reward_mean]
        [--eval-metric eval_accuracy] [--last 5]

Each RUN_DIR holds metrics.jsonl: one JSON object per logged step with at least `step`,
`wall_time` (seconds since the run started) and the metric (default `rollout_reward_mean`, the
reward of the policy's own rollouts; a record without it, from runs before it was logged or
trained on trajectory files only, gives its `reward_mean`, the reward of every trained sample,
which replayed successes raise), and
optionally the eval metric (default `eval_accuracy`, present on the steps that evaluated).
A step logged twice (a resumed run re-logging it) keeps its last record; a truncated last
line (a run still writing) is ignored.

Table, per run: steps (last step), final / best / mean of the last N values of the metric
and of the eval metric (training runs oscillate: the mean of the last evaluations is the
number to quote), wall time, and time per step (from the first to the last logged step, so
start-up is left out). The plot has the metric and the eval metric (rows) against steps
and against wall time (columns), one line per run labelled by its folder name. Runs named
METHOD_sSEED (bench/learning.py's folders) share one colour per METHOD and differ in line
style per seed, so a dozen runs stay readable.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

METRICS_FILE = "metrics.jsonl"
DEFAULT_METRIC = "rollout_reward_mean"
FALLBACK = {"rollout_reward_mean": "reward_mean"}  # the key a record without the metric gives
_SEED_SUFFIX = re.compile(r"_s(\d+)$")


@dataclass
class Run:
    label: str
    path: Path
    records: list[dict] = field(default_factory=list)  # sorted by step, one per step

    def series(self, key: str) -> tuple[list[float], list[float], list[float]]:
        """(steps, wall times, values) of the records that have a finite `key` (or its FALLBACK)."""
        steps, walls, values = [], [], []
        for r in self.records:
            v = r.get(key, r.get(FALLBACK.get(key, "")))
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                steps.append(float(r["step"]))
                walls.append(float(r.get("wall_time", math.nan)))
                values.append(float(v))
        return steps, walls, values


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of run_dir/metrics.jsonl, one per step (the last wins), sorted by step."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (each RUN_DIR needs a {METRICS_FILE})")
    lines = path.read_text(encoding="utf-8").splitlines()
    by_step: dict[float, dict] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines):  # a run still writing its last line
                continue
            raise ValueError(f"{path}: line {lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise ValueError(f"{path}: line {lineno}: expected an object with a 'step' field")
        by_step[rec["step"]] = rec
    if not by_step:
        raise ValueError(f"{path}: no records")
    return [by_step[s] for s in sorted(by_step)]


def labels_for(paths: Sequence[Path]) -> list[str]:
    """Folder names; where two runs share one, the parent is prefixed."""
    names = [p.resolve().name for p in paths]
    return [f"{p.resolve().parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]


def load_runs(run_dirs: Sequence[str | Path]) -> list[Run]:
    paths = [Path(d) for d in run_dirs]
    return [Run(label, p, read_metrics(p)) for label, p in zip(labels_for(paths), paths)]


def _stats(values: list[float], last: int) -> dict:
    if not values:
        return {"final": None, "best": None, "last_mean": None}
    tail = values[-last:]
    return {"final": values[-1], "best": max(values), "last_mean": sum(tail) / len(tail)}


def summarize(run: Run, metric: str = DEFAULT_METRIC, eval_metric: str = "eval_accuracy", last: int = 5) -> dict:
    """The numbers of one table row."""
    steps = [float(r["step"]) for r in run.records]
    walls = [float(r["wall_time"]) for r in run.records if isinstance(r.get("wall_time"), (int, float))]
    if len(steps) >= 2 and len(walls) == len(steps) and steps[-1] > steps[0]:
        per_step = (walls[-1] - walls[0]) / (steps[-1] - steps[0])
    elif walls and steps[-1] > 0:
        per_step = walls[-1] / steps[-1]
    else:
        per_step = None
    return {
        "run": run.label,
        "steps": run.records[-1]["step"],
        metric: _stats(run.series(metric)[2], last),
        eval_metric: _stats(run.series(eval_metric)[2], last),
        "wall_time": walls[-1] if walls else None,
        "time_per_step": per_step,
    }


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def format_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_table(rows: Sequence[dict], metric: str = DEFAULT_METRIC, eval_metric: str = "eval_accuracy",
                 last: int = 5) -> str:
    head = ["run", "steps",
            f"{metric} final", f"{metric} best", f"{metric} last-{last} mean",
            f"{eval_metric} final", f"{eval_metric} best", f"{eval_metric} last-{last} mean",
            "wall time", "time/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for r in rows:
        m, e = r[metric], r[eval_metric]
        lines.append("| " + " | ".join([
            r["run"], str(r["steps"]),
            _fmt(m["final"]), _fmt(m["best"]), _fmt(m["last_mean"]),
            _fmt(e["final"]), _fmt(e["best"]), _fmt(e["last_mean"]),
            format_duration(r["wall_time"]), format_duration(r["time_per_step"]),
        ]) + " |")
    return "\n".join(lines)


def plot(runs: Sequence[Run], out: str | Path, metric: str = DEFAULT_METRIC,
         eval_metric: str = "eval_accuracy") -> Path:
    """One PNG: rows = metric (and eval metric when any run has it), columns = against step
    and against wall time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [metric] + ([eval_metric] if any(run.series(eval_metric)[2] for run in runs) else [])
    max_wall = max((max(run.series(k)[1], default=0.0) for run in runs for k in keys), default=0.0)
    scale, unit = (3600.0, "h") if max_wall >= 7200 else (60.0, "min") if max_wall >= 120 else (1.0, "s")
    styles = run_styles([run.label for run in runs])
    fig, axes = plt.subplots(len(keys), 2, figsize=(12, 4 * len(keys)), squeeze=False)
    for row, key in enumerate(keys):
        ax_step, ax_wall = axes[row]
        for run in runs:
            steps, walls, values = run.series(key)
            if not values:
                continue
            kw = dict(marker="o" if len(values) <= 30 else None, markersize=3, label=run.label, **styles[run.label])
            ax_step.plot(steps, values, **kw)
            ax_wall.plot([w / scale for w in walls], values, **kw)
        ax_step.set_xlabel("step")
        ax_wall.set_xlabel(f"wall time ({unit})")
        for ax in (ax_step, ax_wall):
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
            if len(runs) <= 4:
                ax.legend(fontsize="small")
    if len(runs) <= 4:
        fig.suptitle(", ".join(run.label for run in runs))
        fig.tight_layout()
    else:
        # A legend per axes with a dozen runs covers the curves: one figure legend below,
        # one entry per method (its colour) and one per seed position (its line style).
        from matplotlib.lines import Line2D

        first = {}
        for run in runs:
            first.setdefault(_SEED_SUFFIX.sub("", run.label), styles[run.label]["color"])
        handles = [Line2D([], [], color=c, label=m) for m, c in first.items()]
        seeds: dict[int, str] = {}
        for run in runs:
            if m := _SEED_SUFFIX.search(run.label):
                seeds.setdefault(int(m.group(1)), styles[run.label]["linestyle"])
        handles += [Line2D([], [], color="grey", linestyle=ls, label=f"seed {s}") for s, ls in sorted(seeds.items())]
        fig.suptitle(f"{len(runs)} runs: colour = method" + (", line style = seed" if seeds else ""))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize="small")
        fig.tight_layout(rect=(0, 0.04 * ((len(handles) + 4) // 5), 1, 1))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def run_styles(labels: Sequence[str]) -> dict[str, dict[str, str]]:
    """Matplotlib line colour and style per run label: one colour per method (the label
    without a trailing `_s<seed>`); the line style follows the seed number (seed % 4), so a
    seed looks the same in every method even when a method misses some seeds; labels without a
    seed get one style per run of their method, in order."""
    palette = [f"C{i}" for i in range(10)]
    dashes = ["-", "--", ":", "-."]
    methods: dict[str, int] = {}
    seen: dict[str, int] = {}
    out = {}
    for label in labels:
        method = _SEED_SUFFIX.sub("", label)
        methods.setdefault(method, len(methods))
        if m := _SEED_SUFFIX.search(label):
            k = int(m.group(1))
        else:
            k = seen[method] = seen.get(method, -1) + 1
        out[label] = {"color": palette[methods[method] % len(palette)], "linestyle": dashes[k % len(dashes)]}
    return out


def main(argv: Optional[Sequence[str]] = None) -> str:
    p = argparse.ArgumentParser(prog="megatron-tbrm-compare-runs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", default="compare.png", help="PNG to write")
    p.add_argument("--metric", default=DEFAULT_METRIC)
    p.add_argument("--eval-metric", default="eval_accuracy")
    p.add_argument("--last", type=int, default=5, help="N of the last-N mean")
    args = p.parse_args(argv)
    if args.last < 1:
        p.error(f"--last {args.last}: must be >= 1")
    runs = load_runs(args.runs)
    for run in runs:
        if not run.series(args.metric)[2]:
            also = f" (or {FALLBACK[args.metric]!r})" if args.metric in FALLBACK else ""
            raise ValueError(f"{run.path / METRICS_FILE}: no numeric {args.metric!r}{also} in any record")
    table = format_table([summarize(r, args.metric, args.eval_metric, args.last) for r in runs],
                         args.metric, args.eval_metric, args.last)
    print(table)
    print(f"wrote {plot(runs, args.out, args.metric, args.eval_metric)}", file=sys.stderr)
    return table


def cli() -> int:
    """The console script: a missing or malformed metrics file ends with one `error: ...` line."""
    from megatron_tbrm.cli import run

    return run(main, FileNotFoundError, ValueError)


if __name__ == "__main__":
    sys.exit(cli())
