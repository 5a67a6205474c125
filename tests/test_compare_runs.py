"""megatron_tbrm/compare_runs.py (and its tools/ wrapper) on synthetic metrics.jsonl files:
table values computed by hand, a PNG with one panel per (metric, x-axis)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tbrm import compare_runs

REPO = Path(__file__).resolve().parents[1]


def write_run(path: Path, records: list[dict], tail: str = "") -> Path:
    path.mkdir(parents=True)
    with open(path / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        f.write(tail)
    return path


@pytest.fixture
def two_runs(tmp_path):
    # tbrm: steps 1..10, 2 s per step after a 10 s start, reward 0.1*step, eval every 5 steps.
    tbrm = [{"step": s, "wall_time": 10.0 + 2.0 * s, "reward_mean": 0.1 * s, "loss": 1.0} for s in range(1, 11)]
    tbrm[4]["eval_accuracy"] = 0.3
    tbrm[9]["eval_accuracy"] = 0.5
    # grpo: steps 1..8, 5 s per step, reward rises then falls (best != final); no eval.
    rewards = [0.1, 0.2, 0.4, 0.6, 0.5, 0.4, 0.3, 0.2]
    grpo = [{"step": s, "wall_time": 5.0 * s, "reward_mean": r, "loss": 2.0} for s, r in zip(range(1, 9), rewards)]
    # A resumed run re-logged step 8 (the last record wins) and the last line is half written.
    grpo.append({"step": 8, "wall_time": 40.0, "reward_mean": 0.25, "loss": 2.0})
    a = write_run(tmp_path / "tbrm_n1", tbrm)
    b = write_run(tmp_path / "grpo_n4", grpo, tail='{"step": 9, "wall_ti')
    return a, b


def _row(table: str, run: str) -> list[str]:
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] == run:
            return cells
    raise AssertionError(f"no row for {run} in\n{table}")


def test_table_values_and_png(two_runs, tmp_path):
    out = tmp_path / "plots" / "compare.png"
    table = compare_runs.main([str(p) for p in two_runs] + ["--out", str(out)])
    header = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    # (the records have reward_mean only, which stands in for the default rollout_reward_mean)
    assert header == ["run", "steps", "rollout_reward_mean final", "rollout_reward_mean best",
                      "rollout_reward_mean last-5 mean",
                      "eval_accuracy final", "eval_accuracy best", "eval_accuracy last-5 mean",
                      "wall time", "time/step"]
    # tbrm: final 1.0, best 1.0, last 5 = mean(0.6..1.0) = 0.8; eval final .5 best .5 mean .4;
    # wall 30 s; (30 - 12) / (10 - 1) = 2 s per step.
    assert _row(table, "tbrm_n1") == ["tbrm_n1", "10", "1", "1", "0.8", "0.5", "0.5", "0.4", "30.0 s", "2.0 s"]
    # grpo: 8 steps, step 8 re-logged as 0.25; best 0.6; the last 5 are 0.6, 0.5, 0.4, 0.3, 0.25;
    # wall 40 s; (40 - 5) / (8 - 1) = 5 s per step; no eval.
    last5 = (0.6 + 0.5 + 0.4 + 0.3 + 0.25) / 5
    assert _row(table, "grpo_n4") == ["grpo_n4", "8", "0.25", "0.6", f"{last5:.4g}", "-", "-", "-",
                                      "40.0 s", "5.0 s"]

    png = out.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg
    h, w = mpimg.imread(out).shape[:2]
    assert (w, h) == (1200, 800)  # 2 columns (step, wall time) x 2 rows (reward, eval accuracy)


def plotted_figure(run_dirs, out):
    """The matplotlib Figure compare_runs.plot saves for `run_dirs` (caught at savefig)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    captured = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **kw):
        captured["fig"] = fig
        return real_savefig(fig, *a, **kw)

    plt.Figure.savefig = spy
    try:
        compare_runs.plot(compare_runs.load_runs(run_dirs), out)
    finally:
        plt.Figure.savefig = real_savefig
    return captured["fig"]


def test_plot_lines_follow_the_data(two_runs, tmp_path):
    axes = plotted_figure(two_runs, tmp_path / "c.png").axes
    assert len(axes) == 4
    by_label = {line.get_label(): line for line in axes[0].get_lines()}  # reward vs step
    assert sorted(by_label) == ["grpo_n4", "tbrm_n1"]
    assert list(by_label["tbrm_n1"].get_xdata()) == list(range(1, 11))
    assert list(by_label["grpo_n4"].get_ydata())[-1] == 0.25
    wall = {line.get_label(): line for line in axes[1].get_lines()}  # reward vs wall time (s)
    assert list(wall["grpo_n4"].get_xdata()) == [5.0 * s for s in range(1, 9)]
    evals = {line.get_label(): line for line in axes[2].get_lines()}  # eval accuracy vs step
    assert list(evals) == ["tbrm_n1"] and list(evals["tbrm_n1"].get_xdata()) == [5, 10]


def test_runs_of_one_method_share_a_colour_and_differ_in_line_style():
    styles = compare_runs.run_styles(["tbrm_n1_s0", "grpo_n4_s0", "tbrm_n1_s1", "grpo_n4_lr1e-4_s0", "tbrm_n1_s2",
                                      "plain"])
    assert styles["tbrm_n1_s0"]["color"] == styles["tbrm_n1_s1"]["color"] == styles["tbrm_n1_s2"]["color"]
    assert [styles[f"tbrm_n1_s{i}"]["linestyle"] for i in range(3)] == ["-", "--", ":"]
    colours = [styles[k]["color"] for k in ("tbrm_n1_s0", "grpo_n4_s0", "grpo_n4_lr1e-4_s0", "plain")]
    assert len(set(colours)) == 4  # grpo_n4 and grpo_n4_lr1e-4 are different methods
    # The style follows the seed number, not the run's position in its method: a method that
    # lacks seed 0 still draws seed 1 dashed, as the figure legend says.
    styles = compare_runs.run_styles(["a_s0", "a_s1", "a_s2", "b_s1", "b_s2", "a_s10"])
    assert styles["b_s1"]["linestyle"] == styles["a_s1"]["linestyle"] == "--"
    assert styles["b_s2"]["linestyle"] == ":" and styles["a_s10"]["linestyle"] == ":"  # 10 % 4 == 2


def test_many_runs_get_one_figure_legend_by_method_and_seed(tmp_path):
    dirs = [write_run(tmp_path / f"{m}_s{seed}", [{"step": 1, "wall_time": 1.0, "reward_mean": 0.1}])
            for m in ("tbrm_n1", "grpo_n4", "tbrm_n1_k1") for seed in (0, 1, 2)]
    fig = plotted_figure(dirs, tmp_path / "c.png")
    assert all(ax.get_legend() is None for ax in fig.axes)  # 9 per-axes entries would cover the curves
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["tbrm_n1", "grpo_n4", "tbrm_n1_k1", "seed 0", "seed 1",
                                                         "seed 2"]
    assert [h.get_linestyle() for h in legend.legend_handles[3:]] == ["-", "--", ":"]


def test_cli_and_errors(two_runs, tmp_path):
    out = tmp_path / "cli.png"
    r = subprocess.run([sys.executable, str(REPO / "tools" / "compare_runs.py"), *map(str, two_runs),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sum(line.startswith("|") for line in r.stdout.splitlines()) == 4  # header, rule, 2 runs
    assert "tbrm_n1" in r.stdout and out.is_file()

    missing = tmp_path / "nothing"
    missing.mkdir()
    r = subprocess.run([sys.executable, str(REPO / "tools" / "compare_runs.py"), str(two_runs[0]), str(missing)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "nothing/metrics.jsonl does not exist" in r.stderr

    bad = write_run(tmp_path / "bad", [{"step": 1, "wall_time": 1.0, "loss": 3.0}])
    with pytest.raises(ValueError, match="no numeric 'rollout_reward_mean' \\(or 'reward_mean'\\)"):
        compare_runs.main([str(bad), "--out", str(tmp_path / "x.png")])


def test_the_policys_own_reward_is_plotted_when_replay_raises_the_trained_reward(tmp_path):
    """With data.replay, reward_mean counts the replayed successes; rollout_reward_mean is the
    policy's own rollouts, what the table and the plot show by default."""
    rows = [{"step": s, "wall_time": float(s), "reward_mean": 0.5, "rollout_reward_mean": 0.05 * s} for s in (1, 2)]
    table = compare_runs.main([str(write_run(tmp_path / "tbrm_n1", rows)), "--out", str(tmp_path / "r.png")])
    assert _row(table, "tbrm_n1")[2:5] == ["0.1", "0.1", "0.075"]


def test_same_folder_names_get_their_parent():
    paths = [Path("/r/a/run"), Path("/r/b/run"), Path("/r/c")]
    assert compare_runs.labels_for(paths) == ["a/run", "b/run", "c"]
