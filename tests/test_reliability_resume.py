"""Reliability (issue 9), part 2: runs that must go on or resume, on the real trainer under
torchrun (2 ranks, the tiny model, real vLLM CPU server, megatron-core over gloo);
docs/reliability.md has the table. Part 1 (test_reliability.py): config, checkpoints, a server
that stays dead, Ctrl-C.

- vLLM: an owned server killed mid-run is restarted, the batch redone, the run finishes;
- SIGKILL of the whole trainer mid-run: --resume reproduces an uninterrupted run's metrics,
  with overlapped rollouts (train.max_staleness=1) too: the batches in flight are regenerated;
- numerics: a NaN loss skips the update and the run goes on; K in a row stop it, with the last
  good state saved;
- after every exit no process of the run is left (the launch's tag, _launch.py).

The first run owns its server and comes first; the module's shared server (for the runs that
attach by rollout.server_url) starts on first use after it, so one server runs at a time here.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from pathlib import Path

import pytest
import torch

from _launch import REPO, Launch, data, describe, launches, own_server, shared, trainer_args  # noqa: F401

# ----------------------------------------------------------------------------- 4, 6a, 7: restart, SIGKILL, resume

COMPARE = ("reward_mean", "response_length_mean", "loss", "delta_mean", "v_s1_mean", "log_ratio_sum_mean", "grad_norm")


def test_vllm_restart_then_sigkill_then_resume_reproduces_uninterrupted(tmp_path, tiny_model_dir, data, shared,
                                                                         launches):
    """One run on its own server: its vLLM server is SIGKILLed after step 1 (restarted with the
    current weights, the batch redone), then the whole trainer is SIGKILLed after step 2. No
    process survives; --resume finishes the run, and every step matches an uninterrupted run."""
    own_server(shared)
    args = ("parallel.tp=2", "train.steps=5", "checkpoint.save_every=1")
    crash_dir = tmp_path / "crash"
    run = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args))
    launches.append(run)
    run.wait_step(1)
    first = run.vllm_server()
    os.killpg(os.getpgid(first.pid), signal.SIGKILL)
    # The kill lands in a rollout or in a weight push (then the next rollout finds the server dead).
    run.wait_text("restarting it (1/3) and redoing the batch")
    run.wait_step(2)
    time.sleep(random.uniform(0.0, 0.5))  # into step 3 (or the step-2 save)
    os.killpg(run.proc.pid, signal.SIGKILL)
    assert run.wait(60) == -signal.SIGKILL
    # torchrun runs each rank in its own session and the vLLM server has its own too, so the killpg
    # reaches only the launcher: the ranks die with it (PR_SET_PDEATHSIG, parallel.die_with_launcher),
    # the server with rank 0 (its own PR_SET_PDEATHSIG).
    # Their multiprocessing helpers (mcore's checkpoint-writer Manager, resource trackers) go too,
    # SIGKILLed by the rank's group reaper (parallel._start_group_reaper), which then exits.
    assert not (left := run.leftovers()), f"orphans after SIGKILL:\n{describe(left)}"
    crashed = run.metrics()
    assert [r["step"] for r in crashed][:2] == [1, 2] and all(r["update_ok"] == 1.0 for r in crashed)
    assert len(crashed) < 5, "the run finished before the SIGKILL"
    # the restarted server wrote its start-up to the same log
    assert (crash_dir / "vllm" / "server.log").read_text(errors="replace").count("Starting vLLM") >= 2

    resumed = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args,
                                             f"rollout.server_url={shared.url}"), resume=True)
    launches.append(resumed)
    rows = resumed.check_ok()
    assert "resumed from" in resumed.output()
    ref = Launch(tmp_path / "ref", trainer_args(tmp_path / "ref", tiny_model_dir, data, *args,
                                                f"rollout.server_url={shared.url}"))
    launches.append(ref)
    expected = {r["step"]: r for r in ref.check_ok()}
    got = {r["step"]: r for r in rows}  # the resumed steps overwrite the crashed run's rows
    assert sorted(got) == [1, 2, 3, 4, 5] and sorted(expected) == [1, 2, 3, 4, 5]
    for step in (1, 2, 3, 4, 5):
        for k in COMPARE:
            # (the first update after --resume must equal the uninterrupted one: metrics of the
            # step after it, e.g. log_ratio_sum_mean, show any optimizer-state difference)
            assert got[step][k] == pytest.approx(expected[step][k], rel=1e-5, abs=1e-5), (step, k)
    assert (crash_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000005"
    assert not (left := resumed.leftovers() + ref.leftovers()), describe(left)


def _trained_prompts(run_dir: Path) -> dict[int, list]:
    """Per step (from RUN/rollouts/step_N.jsonl): the prompt token ids of its samples, in order."""
    out = {}
    for f in (run_dir / "rollouts").glob("step_*.jsonl"):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        out[int(f.stem.split("_")[1])] = [r["prompt_token_ids"] for r in rows]
    return out


def test_overlapped_rollouts_sigkill_then_resume_keep_the_data_position(tmp_path, tiny_model_dir, data, shared,
                                                                      launches):
    """train.max_staleness=1: while step t updates, rank 0's thread already generates step t+1's
    batch (its prompts drawn from the sampler). SIGKILL after step 2, --resume: the checkpoint
    recorded only trained batches, so the batches in flight are regenerated: every step 1..5 is
    trained once, on the prompts an uninterrupted run trains on, and the last checkpoint holds
    the same sampler position and step count as the uninterrupted run's."""
    args = ("train.steps=5", "checkpoint.save_every=1", "train.max_staleness=1", "rollout.save=true",
            f"rollout.server_url={shared.url}")
    crash_dir = tmp_path / "crash"
    run = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args))
    launches.append(run)
    run.wait_step(2)
    time.sleep(random.uniform(0.0, 0.5))  # into step 3 (or the step-2 save), the thread ahead
    os.killpg(run.proc.pid, signal.SIGKILL)
    assert run.wait(60) == -signal.SIGKILL
    assert len(run.metrics()) < 5, "the run finished before the SIGKILL"
    resumed = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args), resume=True)
    launches.append(resumed)
    rows = resumed.check_ok()
    assert "resumed from" in resumed.output()
    ref_dir = tmp_path / "ref"
    ref = Launch(ref_dir, trainer_args(ref_dir, tiny_model_dir, data, *args))
    launches.append(ref)
    ref.check_ok()
    assert sorted({r["step"] for r in rows}) == [1, 2, 3, 4, 5]
    assert _trained_prompts(crash_dir) == _trained_prompts(ref_dir)  # none lost, none trained twice
    assert sorted(_trained_prompts(ref_dir)) == [1, 2, 3, 4, 5]  # the thread made no batch past train.steps
    # staleness read from the uninterrupted run's saved rollouts, not assumed: the batch trained
    # at step t was generated by version t-2 (one update old) from step 2 on
    ref_rows = {r["step"]: r for r in ref.metrics()}
    for t in range(1, 6):
        saved = [json.loads(x) for x in (ref_dir / "rollouts" / f"step_{t}.jsonl").read_text().splitlines()]
        assert {r["policy_version"] for r in saved} == {max(t - 2, 0)}, t
        assert ref_rows[t]["staleness_max"] == (t - 1) - max(t - 2, 0)
        assert "trainer_idle_s" in ref_rows[t] and "rollout_idle_s" in ref_rows[t]
    last = "iter_0000005"
    assert (crash_dir / "checkpoints" / "latest").read_text().strip() == last
    got, want = (json.loads((d / "checkpoints" / last / "extra.json").read_text()) for d in (crash_dir, ref_dir))
    assert got["sampler"] == want["sampler"] and got["step"] == want["step"] == 5
    assert not (left := resumed.leftovers() + ref.leftovers()), describe(left)


def test_replay_sigkill_then_resume_reproduces_uninterrupted(tmp_path, tiny_model_dir, data, shared, launches):
    """data.replay (issue 15): from step 2 on, every batch holds 4 trajectories replayed from
    earlier steps. SIGKILL after step 2, --resume: the checkpoint held the buffer and its
    generator (rank 0's replay.pt), so every step trains on what an uninterrupted run trains on
    (the same metrics), and the last checkpoints hold the same buffer, with the reference
    log-probs of each trajectory (reused instead of a reference forward) equal to pi_ref's."""
    args = ("train.steps=5", "checkpoint.save_every=1", "data.replay.size=12", "data.replay.per_step=4",
            "data.replay.successes_only=false", f"rollout.server_url={shared.url}")  # (the tiny model gets no reward)
    crash_dir = tmp_path / "crash"
    run = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args))
    launches.append(run)
    run.wait_step(2)
    time.sleep(random.uniform(0.0, 0.5))  # into step 3 (or the step-2 save)
    os.killpg(run.proc.pid, signal.SIGKILL)
    assert run.wait(60) == -signal.SIGKILL
    assert len(run.metrics()) < 5, "the run finished before the SIGKILL"
    resumed = Launch(crash_dir, trainer_args(crash_dir, tiny_model_dir, data, *args), resume=True)
    launches.append(resumed)
    got = {r["step"]: r for r in resumed.check_ok()}
    assert "resumed from" in resumed.output()
    ref_dir = tmp_path / "ref"
    ref = Launch(ref_dir, trainer_args(ref_dir, tiny_model_dir, data, *args))
    launches.append(ref)
    expected = {r["step"]: r for r in ref.check_ok()}
    assert sorted(got) == sorted(expected) == [1, 2, 3, 4, 5]
    # 8 fresh trajectories a step; the buffer holds 8 after step 1, so steps 2.. draw 4 (none at step 1)
    assert [expected[t]["replay_samples"] for t in range(1, 6)] == [0.0, 4.0, 4.0, 4.0, 4.0]
    assert [expected[t]["trajectories"] for t in range(1, 6)] == [8.0, 12.0, 12.0, 12.0, 12.0]
    assert [expected[t]["replay_buffer"] for t in range(1, 6)] == [8.0, 12.0, 12.0, 12.0, 12.0]
    # Rank r trains rows r, r+2, ... in micro-batches of 2: the 4 replayed rows (8-11) fill one
    # micro-batch per rank, and those two take their reference log-probs from the buffer.
    assert [expected[t]["ref_reused"] for t in range(1, 6)] == [0.0] + [pytest.approx(4 / 12)] * 4
    assert [got[t]["ref_reused"] for t in (3, 4, 5)] == [pytest.approx(4 / 12)] * 3  # kept through the resume
    for step in (3, 4, 5):  # the steps after the resume
        for k in COMPARE:
            assert got[step][k] == pytest.approx(expected[step][k], rel=1e-5, abs=1e-5), (step, k)
        assert got[step]["replay_staleness_mean"] == expected[step]["replay_staleness_mean"], step
    # the buffers after step 5 (rank 0's replay.pt): the same trajectories, the same generator
    want, have = (torch.load(d / "checkpoints" / "iter_0000005" / "replay.pt", weights_only=False)
                  for d in (ref_dir, crash_dir))
    assert len(want["samples"]) == 12 and have["rng"] == want["rng"]
    for h, w in zip(have["samples"], want["samples"]):
        assert torch.equal(h["tokens"], w["tokens"]) and h["reward"] == w["reward"]
        assert (h["prompt_index"], h["policy_version"]) == (w["prompt_index"], w["policy_version"])
        assert torch.allclose(h["logprobs"], w["logprobs"], atol=1e-5)  # the sampler's, two servers' runs
        assert torch.allclose(h["ref_logprobs"], w["ref_logprobs"], atol=1e-5)
    # The reference log-probs the buffer keeps (what replayed rows train with) are pi_ref's:
    # against the HF model the trainer started from, in fp64 over the full vocabulary.
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64).eval()
    for row in have["samples"]:
        tokens, n = row["tokens"], row["prompt_len"]
        with torch.no_grad():
            lp = hf(tokens[None]).logits[0].log_softmax(-1)
        want_lp = lp[n - 1:-1].gather(-1, tokens[n:, None])[:, 0]
        assert row["ref_logprobs"].shape == want_lp.shape
        assert torch.allclose(row["ref_logprobs"].double(), want_lp, atol=1e-4), (row["ref_logprobs"], want_lp)
    assert not (left := resumed.leftovers() + ref.leftovers()), describe(left)


# ----------------------------------------------------------------------------- 5. numerics


def _weights(ckpt: Path, tmp: Path) -> dict:
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor) and not k.startswith("optimizer")}


def test_nan_loss_skips_update_then_stops_with_last_good_state(tmp_path, tiny_model_dir, data, shared, launches):
    """NaN losses injected at steps 2, 4, 5 (train.max_bad_steps=2): step 2's update is skipped
    and the run goes on (step 3 updates); 4 and 5 in a row stop it, non-zero, with a checkpoint
    whose weights are those after step 3 (the last good update)."""
    run_dir = tmp_path / "run"
    run = Launch(run_dir, trainer_args(run_dir, tiny_model_dir, data, "parallel.tp=1", "train.steps=8",
                                       "train.max_bad_steps=2", "checkpoint.save_every=1",
                                       f"rollout.server_url={shared.url}"),
                 entry=(str(REPO / "tests" / "workers" / "train_faults.py"), "--nan-steps", "2,4,5"))
    launches.append(run)
    rc = run.wait()
    out = run.output()
    assert rc != 0
    assert "2 non-finite losses in a row (step 4)" in out, out[-6000:]
    rows = run.metrics()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["update_ok"] for r in rows] == [1.0, 0.0, 1.0, 0.0]
    assert rows[1]["loss"] is None and rows[1]["bad_steps"] == 1.0 and rows[2]["bad_steps"] == 0.0
    import torch

    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "iter_0000004"
    w = {i: _weights(ckpts / f"iter_{i:07d}", tmp_path) for i in (1, 2, 3, 4)}
    assert w[1] and w[1].keys() == w[4].keys()

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(w[1], w[2])  # step 2 skipped
    assert not same(w[2], w[3])  # the run went on: step 3 updated
    assert same(w[3], w[4])  # the stop saved the state after the last good update
    assert not (left := run.leftovers()), describe(left)
