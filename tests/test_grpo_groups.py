"""GRPO advantages are grouped by prompt, always (issue 15, item 3).

Before: one empty response anywhere in a batch (dropped, so the batch no longer divided into
groups of n) made the trainer fall back to a global mean for the whole batch, without std
normalisation. Published GRPO (DeepSeekMath) normalises within each prompt's group:
A_i = (r_i - mean(group)) / std(group). References below are computed by hand.
"""
from __future__ import annotations

import math

import pytest
import torch

from megatron_tbrm.loss import grpo_advantages, grpo_advantages_by_prompt


def test_matches_hand_computed_groups_with_a_dropped_response():
    # Prompt 0: rewards 1, 0, 0, 1 (n=4). Prompt 1: 1, 1, 0 (its 4th response was empty and
    # dropped). Prompt 2: all 0. Samples interleaved, as a client may return them.
    ids = [0, 1, 0, 2, 1, 0, 2, 1, 0, 2, 2]
    r = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0])
    adv = grpo_advantages_by_prompt(r, ids, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3): +-0.5 * sqrt(3)
    s0 = 0.5 * math.sqrt(3.0)
    # group 1: mean 2/3, deviations 1/3, 1/3, -2/3; unbiased var (1/9 + 1/9 + 4/9) / 2 = 1/3
    d = 1.0 / math.sqrt(1.0 / 3.0)
    # group 2: zero variance -> 0 / (0 + eps); with eps=0 that is 0/0: use eps below
    want = {0: s0, 1: d / 3, 2: -s0, 4: d / 3, 5: -s0, 7: -2 * d / 3, 8: s0}
    for i, w in want.items():
        assert adv[i].item() == pytest.approx(w, abs=1e-6), i

    adv = grpo_advantages_by_prompt(r, ids)  # default eps
    assert torch.all(adv[[3, 6, 9, 10]] == 0)  # a group that all failed carries no signal


def test_equals_the_fixed_size_form_when_groups_are_whole():
    torch.manual_seed(0)
    r = (torch.rand(32) > 0.6).float()
    ids = [i // 4 for i in range(32)]
    torch.testing.assert_close(grpo_advantages_by_prompt(r, ids), grpo_advantages(r, 4))
    torch.testing.assert_close(grpo_advantages_by_prompt(r, ids, normalize_std=False),
                               grpo_advantages(r, 4, normalize_std=False))


def test_a_group_of_one_has_no_advantage_and_other_groups_are_untouched():
    r = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.0])
    ids = ["a", "a", "b", "c", "c"]  # prompt b kept one response of its n
    adv = grpo_advantages_by_prompt(r, ids, normalize_std=False)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, 0.0, 0.0, 0.0]))


def test_bad_input():
    with pytest.raises(ValueError, match="prompt ids"):
        grpo_advantages_by_prompt(torch.zeros(3), [0, 0])
    with pytest.raises(ValueError, match="non-finite"):
        grpo_advantages_by_prompt(torch.tensor([0.0, float("nan")]), [0, 0])


def test_trainer_groups_by_prompt_index():
    """The trainer's GRPO (algorithms.GRPO.prepare, run on every rollout batch) groups the
    samples by their prompt_index, whatever their order, with an empty response dropped from
    its own group only (no global-mean fallback)."""
    from types import SimpleNamespace

    from megatron_tbrm.algorithms import make_algorithm
    from megatron_tbrm.rollout.batch import RolloutBatch
    from megatron_tbrm.rollout.client import Trajectory

    def traj(prompt, resp):
        return Trajectory(prompt, 0, [1, 2], resp, [-0.5] * len(resp), "stop", "")

    # prompt 0: rewards 1, 0 (+ an empty response, dropped); prompt 1: 1, 1, 0, interleaved.
    trajs = [traj(0, [5]), traj(1, [5]), traj(0, []), traj(1, [6]), traj(0, [7]), traj(1, [7])]
    batch = RolloutBatch.from_trajectories(trajs, [1.0, 1.0, 0.0, 1.0, 0.0, 0.0], pad_id=0)
    grpo = make_algorithm(SimpleNamespace(name="grpo"), vocab_size=10, tp_group=None)
    grpo.prepare(batch)
    assert batch.metrics["dropped_empty"] == 1.0
    # group 0: [1, 0] -> mean 0.5, std 0.7071; group 1: [1, 1, 0] -> mean 2/3, std 0.5774
    assert [s.prompt_index for s in batch.samples] == [0, 1, 1, 0, 1]
    assert [s.advantage for s in batch.samples] == pytest.approx([0.7071, 0.5774, 0.5774, -0.7071, -1.1547], abs=1e-4)


def test_grpo_old_logprobs_rollout_vs_recompute():
    """loss.old_logprobs: "rollout" takes PPO's ratio against the sampler's log-probs (stale
    samples are clipped), "recompute" against the policy before the update (ratio 1, nothing
    clipped: the loss is -mean advantage per token). Reference: the formula by hand, fp64."""
    from types import SimpleNamespace

    from megatron_tbrm.algorithms import make_algorithm

    torch.manual_seed(0)
    b, s, v = 3, 5, 11
    logits = torch.randn(b, s, v, dtype=torch.float64)
    labels = torch.randint(0, v, (b, s))
    mask = torch.zeros(b, s)
    mask[:, 2:] = 1.0
    adv = torch.tensor([1.0, -0.5, 0.25])
    logp = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    stale = logp - 0.5  # the sampler's: the policy has since made these tokens e^0.5 likelier
    mb = {"labels": labels, "loss_mask": mask, "rollout_logprobs": stale.float(), "ref_logprobs": None,
          "advantages": adv, "rewards": torch.zeros(b)}
    cfg = dict(name="grpo", clip_eps=0.2, kl_coef=0.0, aggregation="token_mean")
    n_tok = mask.sum()
    rec = make_algorithm(SimpleNamespace(**cfg, old_logprobs="recompute"), v, None)
    loss, count, sums = rec.loss_sums(mb, logits)
    assert float(loss / count) == pytest.approx(float(-(adv.unsqueeze(1) * mask).sum() / n_tok), abs=1e-6)
    assert float(sums["clip_fraction"][0]) == 0.0
    roll = make_algorithm(SimpleNamespace(**cfg, old_logprobs="rollout"), v, None)
    loss, count, sums = roll.loss_sums(mb, logits)
    ratio = torch.exp(torch.tensor(0.5, dtype=torch.float64))
    a = adv.unsqueeze(1)
    per_tok = torch.maximum(-ratio * a, -ratio.clamp(0.8, 1.2) * a)
    assert float(loss / count) == pytest.approx(float((per_tok * mask).sum() / n_tok), abs=1e-5)
    assert float(sums["clip_fraction"][0]) == float(((a > 0).expand(b, s) * mask).sum())  # A > 0 rows clip
