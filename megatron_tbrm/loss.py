"""TBRM and GRPO losses on (vocab-parallel) logits.

Shapes: logits [b, s, v_local] (this rank's vocab shard), labels [b, s] already shifted
(labels[:, t] is the token predicted at position t), loss_mask [b, s] with 1 on response
tokens. Every row needs at least one response token.

Packed rows (microbatches.py) hold several trajectories each: `sequence_ids` [b, s] (int64)
names the trajectory of every position (-1 or anything on padding), and the per-trajectory
inputs (rewards, advantages) are [n]. Without it each row is one trajectory (n = b). Every
per-trajectory quantity (V(s_1) at a trajectory's first response position, the summed
log-ratio, GRPO's seq_mean, each metric) is taken per trajectory either way.

Two forms of each loss:
- `tbrm_loss` / `grpo_loss` -> (loss, metrics): the mean over this batch, metrics as floats.
- `tbrm_loss_sums` / `grpo_loss_sums` -> (loss_sum, num_items, metric_sums): Megatron-core's
  `calculate_per_token_loss=True` contract for a forward_step's loss_func. The trainer adds
  these over micro-batches and data-parallel ranks and divides by the global count, so the
  loss is the mean over the whole global batch whatever the micro-batch split. Each metric is
  a float64 tensor [sum, count] (the form Megatron's training loop sums and divides);
  `metric_means` turns summed pairs into means.

    # in a Megatron forward_step, on the last pipeline stage:
    loss_func = functools.partial(
        tbrm_loss_sums, labels=labels, ref_logprobs=ref, rewards=r, loss_mask=mask, beta=beta,
        vocab_size=true_vocab, tp_group=parallel_state.get_tensor_model_parallel_group(),
    )  # loss_func(logits) -> (sum of delta^2, trajectories, {name: [sum, count]})
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from megatron_tbrm.vocab_parallel import DEFAULT_CHUNK_SIZE, ProcessGroup, vocab_parallel_logprob

AGGREGATIONS = ("token_mean", "seq_mean")


class TBRMTerms(NamedTuple):
    """Per-trajectory pieces of the residual, fp32 [b]."""

    delta: torch.Tensor
    v_s1: torch.Tensor
    log_ratio_sum: torch.Tensor


class Trajectories(NamedTuple):
    """Where each trajectory's response positions lie in a [b, s] micro-batch, flattened."""

    ids: torch.Tensor  # [m] int64: the trajectory of each response position
    positions: torch.Tensor  # [m] int64: its flat index (row * s + t), ascending
    n: int
    shape: tuple[int, int]  # (b, s)

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """sum over each trajectory's response positions of values [b, s] -> [n]."""
        flat = values.flatten()[self.positions]
        return flat.new_zeros(self.n).index_add(0, self.ids, flat)

    def first(self, values: torch.Tensor) -> torch.Tensor:
        """values [b, s] at each trajectory's first response position -> [n]."""
        start = self.positions.new_full((self.n,), self.shape[0] * self.shape[1])
        start = start.scatter_reduce(0, self.ids, self.positions, "amin")
        return values.flatten()[start]

    def count(self) -> torch.Tensor:
        """Response positions per trajectory [n] (int64)."""
        return torch.bincount(self.ids, minlength=self.n)

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """values [n] spread onto each trajectory's response positions -> [b, s]; 0 elsewhere."""
        out = values.new_zeros(self.shape[0] * self.shape[1])
        return out.index_copy(0, self.positions, values[self.ids]).view(self.shape)


def trajectories(loss_mask: torch.Tensor, sequence_ids: torch.Tensor | None = None,
                 n: int | None = None) -> Trajectories:
    """The trajectories of a micro-batch: one per row without `sequence_ids`, else n of them
    named by sequence_ids [b, s] at the positions where loss_mask is 1. Raises ValueError for
    an id outside [0, n) on a response position, or a trajectory with no response token."""
    mask = loss_mask.bool()
    positions = mask.flatten().nonzero().squeeze(1)
    if sequence_ids is None:
        return Trajectories(positions // mask.shape[1], positions, mask.shape[0], tuple(mask.shape))
    _check_shape("sequence_ids", sequence_ids, tuple(mask.shape))
    if n is None:
        raise ValueError("n (the number of trajectories) is required with sequence_ids")
    ids = sequence_ids.flatten()[positions].long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"sequence_ids on response positions must lie in [0, {n})")
    t = Trajectories(ids, positions, n, tuple(mask.shape))
    empty = (t.count() == 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"loss_mask has no response token in trajectory(ies) {empty.tolist()}")
    return t


# --- validation ----------------------------------------------------------------------------


def _check_shape(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {shape}")


def _check_finite(name: str, t: torch.Tensor, where: torch.Tensor | None = None) -> None:
    bad = ~torch.isfinite(t) if where is None else where & ~torch.isfinite(t)
    if bad.any():
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) where they are used")


def _response_mask(
    logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor
) -> torch.Tensor:
    if logits.dim() != 3:
        raise ValueError(f"logits must be [b, s, v_local], got shape {tuple(logits.shape)}")
    _check_shape("labels", labels, tuple(logits.shape[:2]))
    _check_shape("loss_mask", loss_mask, tuple(logits.shape[:2]))
    if not ((loss_mask == 0) | (loss_mask == 1)).all():
        raise ValueError("loss_mask must hold only 0 and 1")
    mask = loss_mask.bool()
    empty = (~mask.any(dim=1)).nonzero().flatten()
    if empty.numel():
        raise ValueError(f"loss_mask has no response token in row(s) {empty.tolist()}")
    return mask


def _per_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    vocab_size: int | None,
    tp_group: ProcessGroup | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(response mask, log pi_theta(label) with 0 off the response, lse), fp32 [b, s]."""
    mask = _response_mask(logits, labels, loss_mask)
    logprob, lse = vocab_parallel_logprob(
        logits, labels, vocab_size, tp_group, mask=mask, chunk_size=chunk_size
    )
    return mask, logprob, lse


def _pair(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    total = total.detach().to(torch.float64)
    return torch.stack([total, torch.as_tensor(count, dtype=torch.float64, device=total.device)])


def metric_means(metric_sums: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """[sum, count] pairs (possibly summed over micro-batches / ranks) -> means.

    A metric over an empty subset (e.g. no successes in the batch) is nan. `delta_std`
    (population std) is derived from `delta_mean` and `delta_sq_mean` when both are present.
    """
    out = {}
    for name, pair in metric_sums.items():
        total, count = pair.tolist()
        out[name] = total / count if count else float("nan")
    if "delta_mean" in out and "delta_sq_mean" in out:
        out["delta_std"] = max(out["delta_sq_mean"] - out["delta_mean"] ** 2, 0.0) ** 0.5
    return out


# --- TBRM ----------------------------------------------------------------------------------


def tbrm_terms(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ref_logprobs: torch.Tensor,
    rewards: torch.Tensor,
    loss_mask: torch.Tensor,
    beta: float,
    vocab_size: int | None = None,
    tp_group: ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    v_offset: float = 0.0,
    sequence_ids: torch.Tensor | None = None,
) -> TBRMTerms:
    """delta = V(s_1) + sum_h [log pi(a_h|s_h) - log pi_ref(a_h|s_h)] - r / beta, all fp32,
    one per trajectory: [b], or [n] for packed rows (`sequence_ids`, rewards [n]).

    V(s_1) is the log-sum-exp over the true vocabulary at the trajectory's first position
    where loss_mask is 1 (the last prompt position, which predicts a_1). Sums are never
    length-normalised. `v_offset` is a constant subtracted from V(s_1): a uniform output bias
    of -v_offset, which leaves the softmax policy unchanged (0 = the paper's objective).
    """
    n = logits.shape[0] if sequence_ids is None else rewards.shape[0]
    _check_shape("rewards", rewards, (n,))
    _check_finite("rewards", rewards)
    if not (beta > 0 and beta != float("inf")):
        raise ValueError(f"beta must be a positive finite number, got {beta}")
    mask, logprob, lse = _per_token_logprobs(
        logits, labels, loss_mask, vocab_size, tp_group, chunk_size
    )
    _check_shape("ref_logprobs", ref_logprobs, tuple(mask.shape))
    _check_finite("ref_logprobs", ref_logprobs, mask)
    traj = trajectories(mask, sequence_ids, n)

    v_s1 = traj.first(lse) - v_offset
    ref = torch.where(mask, ref_logprobs.float(), torch.zeros_like(logprob))  # masked may be nan
    log_ratio_sum = traj.sum(logprob - ref)
    delta = v_s1 + log_ratio_sum - rewards.float() / beta
    _check_finite("logits (the residual)", delta.detach())
    return TBRMTerms(delta, v_s1, log_ratio_sum)


def tbrm_residuals(*args, **kwargs) -> torch.Tensor:
    """delta [b] fp32; same arguments as `tbrm_terms`."""
    return tbrm_terms(*args, **kwargs).delta


def tbrm_loss_sums(
    logits: torch.Tensor, labels: torch.Tensor, ref_logprobs: torch.Tensor, rewards: torch.Tensor,
    loss_mask: torch.Tensor, beta: float, **kw,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(sum of delta^2, number of trajectories, metric [sum, count] pairs) for a forward_step.
    Arguments as `tbrm_terms` (`kw`: vocab_size, tp_group, chunk_size, v_offset, sequence_ids)."""
    t = tbrm_terms(logits, labels, ref_logprobs, rewards, loss_mask, beta, **kw)
    n = t.delta.shape[0]  # trajectories
    delta, success = t.delta.detach(), rewards > 0
    loss_sum = t.delta.square().sum()
    metric_sums = {
        "delta_mean": _pair(delta.sum(), n),
        "delta_sq_mean": _pair(delta.square().sum(), n),
        "v_s1_mean": _pair(t.v_s1.sum(), n),
        "log_ratio_sum_mean": _pair(t.log_ratio_sum.sum(), n),
        "reward_mean": _pair(rewards.sum(), n),
        "response_length_mean": _pair(loss_mask.sum(), n),
        "delta_success_mean": _pair(delta[success].sum(), success.sum()),
        "delta_failure_mean": _pair(delta[~success].sum(), (~success).sum()),
        # sum_h log pi/pi_ref of the sampled responses that succeeded / failed: how much more
        # likely the policy makes them than the reference does
        "log_ratio_success_mean": _pair(t.log_ratio_sum.detach()[success].sum(), success.sum()),
        "log_ratio_failure_mean": _pair(t.log_ratio_sum.detach()[~success].sum(), (~success).sum()),
    }
    return loss_sum, torch.tensor(n, dtype=torch.int, device=delta.device), metric_sums


def tbrm_loss(*args, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean over the batch of delta^2, and metrics; same arguments as `tbrm_loss_sums` (see
    `metric_means`)."""
    loss_sum, n, metric_sums = tbrm_loss_sums(*args, **kwargs)
    return loss_sum / n, metric_means(metric_sums)


# --- GRPO ----------------------------------------------------------------------------------


def grpo_advantages(
    rewards: torch.Tensor, group_size: int, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """(r - group mean) [/ (group std + eps)], fp32 [n].

    The rollouts of one prompt are adjacent: rewards[i * group_size : (i + 1) * group_size].
    std is the unbiased sample std (torch.std), as in DeepSeekMath's GRPO and TRL.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [n], got shape {tuple(rewards.shape)}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"group_size={group_size} must be >= 2 and divide the number of rewards "
            f"({rewards.numel()})"
        )
    _check_finite("rewards", rewards)
    r = rewards.float().view(-1, group_size)
    adv = r - r.mean(dim=1, keepdim=True)
    if normalize_std:
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    return adv.flatten()


def grpo_advantages_by_prompt(
    rewards: torch.Tensor, prompt_ids, eps: float = 1e-6, normalize_std: bool = True
) -> torch.Tensor:
    """GRPO advantages grouped by prompt, whatever the order and group sizes, fp32 [n].

    `prompt_ids[i]` names the prompt of sample i; the group of a prompt is every sample that
    names it (the samples still in the batch: an empty response dropped before this leaves its
    group one smaller, and no other group changes). Each sample gets
    (r - group mean) / (group std + eps), std the unbiased sample std as in DeepSeekMath's GRPO
    (`grpo_advantages`). A group of one sample has no baseline: advantage 0, no signal.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [n], got shape {tuple(rewards.shape)}")
    ids = list(prompt_ids)
    if len(ids) != rewards.numel():
        raise ValueError(f"{len(ids)} prompt ids for {rewards.numel()} rewards")
    _check_finite("rewards", rewards)
    r = rewards.float()
    adv = torch.zeros_like(r)
    groups: dict = {}
    for i, g in enumerate(ids):
        groups.setdefault(g, []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        idx = torch.tensor(members)
        g = r[idx]
        a = g - g.mean()
        if normalize_std:
            a = a / (g.std() + eps)
        adv[idx] = a
    return adv


def grpo_loss_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    rollout_logprobs: torch.Tensor | None,
    ref_logprobs: torch.Tensor | None,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_coef: float = 0.0,
    aggregation: str = "token_mean",
    vocab_size: int | None = None,
    tp_group: ProcessGroup | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sequence_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO-clip surrogate (+ kl_coef * k3 KL to the reference) as (loss_sum, count, metrics).

    Per token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + kl_coef * k3, with
    ratio = exp(logp - rollout_logp) (the sampler's log-probs: the behaviour policy, which is
    PPO's pi_old with one update per batch) and k3 = exp(ref - logp) - (ref - logp) - 1.
    token_mean: loss_sum over response tokens, count = response tokens.
    seq_mean: each trajectory's tokens averaged first, count = trajectories.
    advantages: [b], or [n] for packed rows (`sequence_ids`, as tbrm_terms).
    ref_logprobs may be None when kl_coef == 0 (then no KL metric). rollout_logprobs None: the
    ratio is taken against this policy's own log-probs, detached (verl's recomputed old
    log-probs: ratio 1, no off-policy correction).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation={aggregation!r}, expected one of {AGGREGATIONS}")
    if not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    if kl_coef < 0 or (kl_coef > 0 and ref_logprobs is None):
        raise ValueError(f"kl_coef={kl_coef} must be >= 0, and > 0 needs ref_logprobs")
    n = logits.shape[0] if sequence_ids is None else advantages.shape[0]
    _check_shape("advantages", advantages, (n,))
    _check_finite("advantages", advantages)
    mask, logprob, _ = _per_token_logprobs(
        logits, labels, loss_mask, vocab_size, tp_group, chunk_size
    )
    if rollout_logprobs is None:
        rollout_logprobs = logprob.detach()
    _check_shape("rollout_logprobs", rollout_logprobs, tuple(mask.shape))
    _check_finite("rollout_logprobs", rollout_logprobs, mask)
    zero = torch.zeros_like(logprob)
    traj = trajectories(mask, sequence_ids, n)

    ratio = torch.exp(logprob - torch.where(mask, rollout_logprobs.float(), zero))
    adv = traj.per_token(advantages.float())
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    per_token = torch.maximum(unclipped, clipped)
    n_tokens = mask.sum()
    metric_sums = {
        "pg_loss_mean": _pair(per_token[mask].sum(), n_tokens),
        "clip_fraction": _pair((clipped > unclipped)[mask].sum(), n_tokens),
        "ratio_mean": _pair(ratio[mask].sum(), n_tokens),
        "advantage_mean": _pair(advantages.sum(), n),
        "response_length_mean": _pair(n_tokens, n),
    }
    if ref_logprobs is not None:
        _check_shape("ref_logprobs", ref_logprobs, tuple(mask.shape))
        _check_finite("ref_logprobs", ref_logprobs, mask)
        log_r = torch.where(mask, ref_logprobs.float(), zero) - logprob
        kl = torch.exp(log_r) - log_r - 1
        metric_sums["kl_mean"] = _pair(kl[mask].sum(), n_tokens)
        if kl_coef > 0:
            per_token = per_token + kl_coef * kl

    per_token = torch.where(mask, per_token, zero)
    if aggregation == "token_mean":
        loss_sum, count = per_token.sum(), n_tokens
    else:
        loss_sum, count = (traj.sum(per_token) / traj.count()).sum(), torch.tensor(n)
    return loss_sum, count.to(device=logprob.device, dtype=torch.int), metric_sums


def grpo_loss(*args, **kwargs) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss over this batch and its metrics; same arguments as `grpo_loss_sums`."""
    loss_sum, count, metric_sums = grpo_loss_sums(*args, **kwargs)
    return loss_sum / count, metric_means(metric_sums)
