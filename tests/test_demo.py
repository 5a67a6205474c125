"""`make demo` says what happened (issue 15, items 1 and 4), without running the demo:
- a warm start outside its band stops the demo with a message, before any RL;
- the summary carries before / after / mean of the last evaluations / verdict / curve path,
  and the last lines say them in words.
The learning runs themselves are benchmarks (bench/learning.py, docs/learning.md), not tests.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tbrm.demo import run as demo


def test_verdict_follows_the_goal():
    assert demo.verdict(0.10, 0.25) == "learned"
    assert demo.verdict(0.10, 0.249) == "did not learn"
    assert demo.verdict(0.10, 0.05) == "did not learn"


def _fake_run(tmp_path: Path, evals: list[float]) -> Path:
    run = tmp_path / "tbrm"
    run.mkdir(parents=True)
    rows = [{"step": 0, "wall_time": 0.0, "eval_accuracy": evals[0]}]
    for step in range(1, 11):
        row = {"step": step, "reward_mean": 0.1 * step / 10, "wall_time": 6.0 * step}
        if step % 2 == 0:
            row["eval_accuracy"] = evals[step // 2]
        rows.append(row)
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return run


def test_summary_and_last_lines(tmp_path, monkeypatch, capsys):
    run = _fake_run(tmp_path, [0.10, 0.12, 0.15, 0.2, 0.3, 0.32])
    s = demo.summarize(run, tmp_path, t0=0.0, warm_start={"probe_accuracy": 0.11})
    assert s["accuracy_before"] == 0.10 and s["accuracy_after"] == 0.32
    assert s["accuracy_after_mean_last3"] == pytest.approx((0.2 + 0.3 + 0.32) / 3)
    assert s["gain_mean_last3"] == pytest.approx(s["accuracy_after_mean_last3"] - 0.10)
    assert s["verdict"] == "learned" and s["warm_start"] == {"probe_accuracy": 0.11}
    assert s["rl_wall_seconds"] == 60.0 and Path(s["curves_png"]).exists()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["verdict"] == "learned"

    flat = _fake_run(tmp_path / "flat", [0.10, 0.09, 0.1, 0.08, 0.11, 0.09])
    assert demo.summarize(flat, tmp_path / "flat", t0=0.0)["verdict"] == "did not learn"


def test_failed_warm_start_stops_the_demo(tmp_path, monkeypatch, capsys):
    import megatron_tbrm.demo.tiny as tiny

    monkeypatch.setattr(tiny, "write_tiny_model", lambda *a, **k: None)
    calls = []

    def fake_run(cmd, what, ok=(0,)):
        calls.append(what)
        assert "megatron_tbrm.demo.sft" in cmd and "--probe" in cmd and "--band" in cmd
        sft_json = Path(cmd[cmd.index("--metrics-out") + 1])
        sft_json.write_text(json.dumps({
            "probe": [{"step": 595, "greedy_exact": 0.05}, {"step": 600, "greedy_exact": 0.06}],
            "probe_accuracy": 0.06, "probe_size": 400, "steps": 600, "band": [0.1, 0.2],
            "band_status": "below_band", "seconds": 1.0}))
        return demo.WARM_START_FAILED

    monkeypatch.setattr(demo, "_run", fake_run)
    rc = demo.main(["--out", str(tmp_path / "d")])
    out = capsys.readouterr().out
    assert rc == demo.WARM_START_FAILED
    assert calls == ["2/4 supervised warm start (Megatron, DP=2)"]  # no RL after a failed warm start
    assert "STOP: the warm start failed (below_band)" in out and "0.060" in out
    # The probe set is held out from both the SFT data and the RL eval set.
    data = tmp_path / "d" / "data"
    probe = {json.loads(x)["prompt"] for x in (data / "probe.jsonl").read_text().splitlines()}
    train = {json.loads(x)["prompt"] for x in (data / "train.jsonl").read_text().splitlines()}
    test = {json.loads(x)["prompt"] for x in (data / "test.jsonl").read_text().splitlines()}
    sft = {json.loads(x)["prompt"] for x in (data / "sft_train.jsonl").read_text().splitlines()}
    assert len(probe) == 400 and not probe & train and not probe & test and not probe & sft and not test & sft


def _prompts(path: Path) -> list[str]:
    return [json.loads(x)["prompt"] for x in path.read_text().splitlines()]


@pytest.mark.parametrize("disjoint_from_rl", [False, True])
def test_warm_start_data_splits(tmp_path, disjoint_from_rl):
    """The demo's splits (DemoWarmStart.write_data): the probe and the RL eval set share no
    problem with each other nor with either training set; the SFT pool has the size asked
    for, without repeats, and meets the RL training set only when allowed to."""
    import dataclasses

    from megatron_tbrm.demo.sft import DEMO_WARM_START

    ws = dataclasses.replace(DEMO_WARM_START, sft_pool=5400 if disjoint_from_rl else DEMO_WARM_START.sft_pool,
                             sft_pool_disjoint_from_rl=disjoint_from_rl)
    files = ws.write_data(tmp_path)
    p = {k: _prompts(v) for k, v in files.items()}
    sizes = {"rl_train": ws.n_rl_train, "rl_eval": ws.n_rl_eval, "probe": ws.probe_size, "sft_train": ws.sft_pool}
    for k, v in p.items():
        assert len(v) == len(set(v)) == sizes[k], k
    s = {k: set(v) for k, v in p.items()}
    for held in ("rl_eval", "probe"):
        for other in s.keys() - {held}:
            assert not s[held] & s[other], (held, other)
    assert bool(s["sft_train"] & s["rl_train"]) is not disjoint_from_rl
    with pytest.raises(ValueError, match="outside the held-out sets"):
        dataclasses.replace(ws, sft_pool=ws.sft_pool + 1).sft_positions()


def test_time_box_minutes():
    assert demo.time_box_minutes(20.0, spent_s=100.0, reserve_s=45.0) == pytest.approx((1200 - 145) / 60)
    with pytest.raises(SystemExit, match="--time-budget-min 3: 2.5 min already spent"):
        demo.time_box_minutes(3.0, spent_s=150.0, reserve_s=45.0)  # 15 s left for TBRM


def test_time_budget_counts_a_reused_warm_start(tmp_path, monkeypatch, capsys):
    """--time-budget-min (20 by default): the trainer gets train.exit_duration_in_mins = the budget
    less the time spent so far, a reused warm start's recorded seconds included, less the reserve;
    the summary and the last lines say the time box ended the run; the band printed is the one
    the warm start was made for."""
    import megatron_tbrm.demo.tiny as tiny

    monkeypatch.setattr(tiny, "write_tiny_model", lambda *a, **k: None)
    out = tmp_path / "d"
    out.mkdir()
    (out / "sft.json").write_text(json.dumps({
        "probe": [{"step": 105, "greedy_exact": 0.07}], "probe_accuracy": 0.07, "probe_size": 400, "steps": 105,
        "band": [0.05, 0.08], "band_status": "in_band", "seconds": 300.0}))
    train_cmds = []

    def fake_run(cmd, what, ok=(0,)):
        assert "megatron_tbrm.train" in cmd, "a reused warm start runs no SFT"
        train_cmds.append(cmd)
        run_dir = Path(next(x for x in cmd if x.startswith("run.dir=")).split("=", 1)[1])
        _fake_run(run_dir.parent, [0.07, 0.1, 0.15, 0.2, 0.25, 0.3])  # 10 steps
        dtype = next(x for x in cmd if x.startswith("model.dtype=")).split("=", 1)[1]
        assert f"rollout.dtype={dtype}" in cmd
        (run_dir / "config.json").write_text(json.dumps({"train": {"steps": 1000}, "model": {"dtype": dtype},
                                                         "rollout": {"dtype": dtype}}))
        return 0

    monkeypatch.setattr(demo, "_run", fake_run)
    assert demo.main(["--out", str(out), "--reuse-sft", "--steps", "1000"]) == 0
    (cmd,) = train_cmds
    minutes = float(next(x for x in cmd if x.startswith("train.exit_duration_in_mins=")).split("=", 1)[1])
    # 20 min less the warm start's 300 s and the reserve, less the few seconds the data took here
    assert (1200 - 300 - demo.TIME_BUDGET_RESERVE_S - 60) / 60 < minutes <= (1200 - 300 - demo.TIME_BUDGET_RESERVE_S) / 60
    assert "train.steps=1000" in cmd
    s = json.loads((out / "summary.json").read_text())
    assert s["time_budget_min"] == 20.0 and s["warm_start"]["reused"] is True
    assert s["warm_start"]["recipe"]["band"] == [0.05, 0.08]  # not the default [0.20, 0.30]
    assert (s["steps"], s["steps_planned"], s["stopped_by"]) == (10, 1000, "time budget")
    printed = capsys.readouterr().out
    assert "inside the band [0.05, 0.08]" in printed
    assert "10 steps of 1000 (stopped by the 20-minute time budget)" in printed

    auto = demo.demo_dtype("auto")  # this machine's answer
    assert s["dtype"] == {"trainer": auto, "rollout": auto}

    train_cmds.clear()  # 0: no time box
    assert demo.main(["--out", str(out), "--reuse-sft", "--time-budget-min", "0", "--dtype", "fp32"]) == 0
    assert "model.dtype=fp32" in train_cmds[0] and "rollout.dtype=fp32" in train_cmds[0]
    assert not any(x.startswith("train.exit_duration_in_mins=") for x in train_cmds[0])
    assert "time_budget_min" not in json.loads((out / "summary.json").read_text())
    with pytest.raises(SystemExit):
        demo.main(["--out", str(out), "--time-budget-min", "-1"])
    assert "--time-budget-min must be 0 (no time box) or at least 1.75" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--sft-band", "0.3", "0.2"], "--sft-band 0.3 0.2: need 0 <= LO <= HI <= 1"),
    (["--sft-band", "0.2", "1.5"], "--sft-band 0.2 1.5: need 0 <= LO <= HI <= 1"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--sft-steps", "0"], "--sft-steps must be >= 1, got 0"),
    (["--nproc", "0"], "--nproc must be >= 1, got 0"),
    (["--time-budget-min", "1"], "--time-budget-min must be 0 (no time box) or at least 1.75"),
    (["loss.betta=0.1"], "unknown config key 'loss.betta' (from the command line): did you mean 'loss.beta'?"),
    (["optim.lr=abc"], "config key 'optim.lr': got 'abc', expected a number"),
    (["notakeyvalue"], "override 'notakeyvalue' must look like key.sub=value"),
])
def test_bad_input_fails_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    """Bad numbers and recipe overrides stop the demo at once with the flag or key named (exit 2),
    not after the minutes of its warm start (these were all found late by a new-user check)."""
    import megatron_tbrm.demo.tiny as tiny

    def no_work(*a, **k):
        raise AssertionError("the demo started work on bad input")

    monkeypatch.setattr(tiny, "write_tiny_model", no_work)
    monkeypatch.setattr(demo, "_run", no_work)
    with pytest.raises(SystemExit) as e:
        demo.main(["--out", str(tmp_path / "d"), *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_auto_dtype_is_bf16_only_with_native_bf16_matmuls(monkeypatch):
    """--dtype auto: bf16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), fp32 where
    it would be emulated (slower than fp32); an explicit choice is kept. The CPU's flags are
    patched: the machine running the test has one answer."""
    import torch

    for avx512_bf16, amx, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert demo.demo_dtype("auto") == want
        assert demo.demo_dtype("fp32") == "fp32" and demo.demo_dtype("bf16") == "bf16"


def test_standalone_warm_start_rejects_a_bad_band_before_any_work(capsys):
    """`python -m megatron_tbrm.demo.sft --band LO HI` checks the band in its parser (the same
    check_band as the demo's --sft-band and run_sft), not after building the model."""
    from megatron_tbrm.demo import sft

    with pytest.raises(SystemExit) as e:
        sft.main(["--model", "/nonexistent", "--data", "/nonexistent.jsonl", "--out", "/nonexistent_out",
                  "--band", "0.3", "0.2"])
    assert e.value.code == 2
    assert "--band 0.3 0.2: need 0 <= LO <= HI <= 1" in capsys.readouterr().err
