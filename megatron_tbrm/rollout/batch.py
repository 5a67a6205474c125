"""A step's rollout as typed objects: what rank 0 generates, scores and broadcasts.

`Sample` is one trajectory as token rows for the update; `RolloutBatch` is a step's samples
with the rollout's metrics and the sampler position after it; `ServerRestarted` says that the
vLLM server died during the rollout and was restarted (the batch is to be redone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .client import Trajectory


@dataclass
class Sample:
    """One trajectory (prompt + response) as rows of equal length S = len(tokens).

    tokens: prompt then response ids. labels: tokens shifted left (labels[t] is the token
    predicted at position t). loss_mask: 1.0 on the positions that predict a response token;
    the first of them is the last prompt position, where V(s_1) is read.
    rollout_logprobs: the sampler's log pi(a_h|s_h) at those positions, 0.0 elsewhere
    (behaviour-policy log-probs: GRPO's ratio denominator and the train/rollout consistency
    check). advantage: GRPO's, filled by `algorithms.GRPO.prepare`; unused by TBRM.
    ref_logprobs: the frozen reference's log pi_ref(a_h|s_h) at the loss-mask positions (0.0
    elsewhere), once the trainer has computed them (None before): the reference never changes,
    so a replayed sample (data.replay) reuses them instead of another reference forward.
    policy_version / policy_version_end: the optimizer step count of the weights the server held
    when the sample's rollout started / ended (equal unless a push landed in between; -1: not
    known, e.g. a trajectory file without versions).
    """

    tokens: list[int]
    labels: list[int]
    loss_mask: list[float]
    rollout_logprobs: list[float]
    reward: float
    prompt_index: int
    advantage: float = 0.0
    policy_version: int = 0
    policy_version_end: int = 0
    ref_logprobs: Optional[list[float]] = None

    def on_policy(self, version: int) -> float:
        """1.0 when the weights of optimizer step `version` (the policy being trained)
        generated the whole sample, else 0.0."""
        return float(self.policy_version == self.policy_version_end == version)

    @classmethod
    def from_ids(cls, prompt_ids: Sequence[int], response_ids: Sequence[int], logprobs: Sequence[float],
                 reward: float, prompt_index: int, pad_id: int, version: int = 0,
                 version_end: Optional[int] = None) -> Optional["Sample"]:
        """None for an empty response (it has no residual). `logprobs`: the sampler's, per
        response token (may be shorter or empty: the rest count as 0)."""
        p, a = list(prompt_ids), list(response_ids)
        if not a or not p:
            return None
        tokens = p + a
        start = len(p) - 1  # the last prompt position predicts a_1
        mask = [0.0] * len(tokens)
        lps = [0.0] * len(tokens)
        for j in range(len(a)):
            mask[start + j] = 1.0
            if j < len(logprobs):
                lps[start + j] = float(logprobs[j])
        return cls(tokens, tokens[1:] + [pad_id], mask, lps, float(reward), prompt_index,
                   policy_version=version, policy_version_end=version if version_end is None else version_end)

    @classmethod
    def from_trajectory(cls, t: Trajectory, reward: float, pad_id: int, version: int = 0,
                        version_end: Optional[int] = None) -> Optional["Sample"]:
        return cls.from_ids(t.prompt_token_ids, t.response_token_ids, t.response_logprobs, reward, t.prompt_index,
                            pad_id, version, version_end)


@dataclass
class RolloutBatch:
    """A step's samples (empty responses dropped and counted in metrics["dropped_empty"]),
    the rollout's metrics (floats, logged as they are), and the prompt sampler's state after
    the step's prompts were drawn (the other ranks mirror it)."""

    samples: list[Sample]
    metrics: dict[str, float] = field(default_factory=dict)
    sampler_state: dict = field(default_factory=dict)
    trajectory_sampler_state: Optional[dict] = None  # data.trajectories' sampler, after this batch

    @classmethod
    def from_trajectories(cls, trajs: Sequence[Trajectory], rewards: Sequence[float], pad_id: int,
                          version: int = 0, version_end: Optional[int] = None, **kw) -> "RolloutBatch":
        samples = [Sample.from_trajectory(t, r, pad_id, version, version_end) for t, r in zip(trajs, rewards)]
        kept = [s for s in samples if s is not None]
        batch = cls(kept, **kw)
        batch.metrics["dropped_empty"] = float(len(samples) - len(kept))
        return batch


@dataclass
class ServerRestarted:
    """The rollout server died during step `step` and was restarted from its HF folder; the
    step's prompts were put back. Every rank pushes the current policy, then the step is redone."""

    step: int
    cause: Optional[str] = None


def collate(samples: Sequence[Sample], pad_id: int, seq_len: int, version: int = 0) -> dict[str, torch.Tensor]:
    """Samples -> tensors right-padded to [B, S], S = max(longest row, seq_len) rounded up to 8
    (causal attention needs no mask):
    tokens, labels (int64, pad_id), loss_mask, rollout_logprobs (fp32, 0), position_ids, and
    rewards, advantages, on_policy [B] fp32 (on_policy: 1 for samples generated from start to
    end by the weights of optimizer step `version`, the policy being trained); ref_logprobs
    (fp32, 0) too when every sample carries them (the trainer then skips the reference forward)."""
    from ..engine import pad_batch

    rows = [{"tokens": s.tokens, "labels": s.labels, "loss_mask": s.loss_mask,
             "rollout_logprobs": s.rollout_logprobs, "rewards": s.reward, "advantages": s.advantage,
             "on_policy": s.on_policy(version)}
            for s in samples]
    if all_ref_logprobs(samples):
        for row, s in zip(rows, samples):
            row["ref_logprobs"] = s.ref_logprobs
    return pad_batch(rows, pad_id, seq_len=seq_len)


def all_ref_logprobs(samples: Sequence[Sample]) -> bool:
    """Every sample carries its reference log-probs (a micro-batch of them needs no reference forward)."""
    return bool(samples) and all(s.ref_logprobs is not None for s in samples)
