"""Off-policy TBRM (issue 18): training from trajectory files, real megatron-core over gloo,
2 ranks. (The staleness of overlapped rollouts, read from the saved rollout files, is checked
in test_train_e2e.py for k=0 and test_reliability_resume.py for k=1, on runs those tests make anyway.)

- Training from a trajectory file with no server at all: the TBRM loss on that file falls,
  and the policy moves towards its successful responses (their summed log pi/pi_ref, 0 at
  step 1, rises), away from its failures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_tbrm.demo.arithmetic import arithmetic_solution, make_arithmetic_splits

from _trainer import run_trainer



@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_arithmetic_splits(tmp_path_factory.mktemp("data"), 256, 16, seed=0)


def _trajectory_file(path: Path, train_jsonl: Path, n: int) -> Path:
    """Text-form trajectories: for each of n problems, its worked solution (reward 1) and a
    wrong one (reward 0)."""
    rows = []
    for line in train_jsonl.read_text().splitlines()[:n]:
        item = json.loads(line)
        right = arithmetic_solution(item["prompt"])
        wrong = right.replace(item["answer"], str(int(item["answer"]) + 1))
        rows.append({"prompt": item["prompt"], "response": right, "reward": 1.0})
        rows.append({"prompt": item["prompt"], "response": wrong, "reward": 0.0})
    rows.append({"prompt": "What is 1 + 1?", "response": "2", "reward": "yes"})  # bad: not a number
    rows.append({"prompt": "What is 1 + 2?", "reward": 1.0})  # bad: no response field
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_train_from_a_trajectory_file_without_a_server(tmp_path, tiny_model_dir, data):
    traj = _trajectory_file(tmp_path / "traj.jsonl", data[0], 8)  # 16 samples = one step's batch
    run = tmp_path / "offline"
    rows = run_trainer(run, tiny_model_dir, None, f"data.trajectories={traj}", "train.steps=12", "loss.beta=0.1",
                       "train.prompts_per_step=16", "optim.lr=1.0e-3", "optim.warmup_steps=0", "data.shuffle=false")
    assert not (run / "vllm").exists()  # no server was started
    assert all(r["trajectory_samples"] == 16.0 and r["trajectory_rows_skipped"] == 2.0 for r in rows)
    assert rows[0]["log_ratio_success_mean"] == pytest.approx(0.0, abs=1e-4)  # the policy starts at the reference
    # every step trains on the same 16 samples: the loss on the file falls; the successes get
    # likelier than under the reference, the failures less likely (the fit wants a gap of 1/beta)
    last = rows[-3:]  # Adam at lr 1e-3 on one batch oscillates: the mean of the last three steps

    def mean(key):
        return sum(r[key] for r in last) / len(last)

    assert mean("loss") < 0.6 * rows[0]["loss"], [r["loss"] for r in rows]
    assert mean("log_ratio_success_mean") > 1.0, [r["log_ratio_success_mean"] for r in rows]
    assert mean("log_ratio_failure_mean") < 0.0, [r["log_ratio_failure_mean"] for r in rows]
