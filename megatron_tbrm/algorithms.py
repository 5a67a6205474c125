"""Training objectives behind one small interface, chosen by `loss.name`.

- `TBRM`: the method (shared/notes/tbrm.md): one squared trajectory residual per sample, no
  advantages, no behaviour log-probs; optionally the value offset (`model.value_offset`).
- `GRPO`: the baseline as published (DeepSeekMath): per-prompt group advantages, the
  PPO-clip surrogate against the sampler's log-probs, k3 KL to the reference.

An algorithm says what a rollout batch needs before the update (`prepare`, rank 0), may look
at the first batch before the first update (`on_first_batch`, every rank), and gives the
per-micro-batch loss in megatron-core's per-token-loss form (`loss_sums`). Its `state_dict`
goes into checkpoints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .log import get_logger
from .loss import grpo_advantages_by_prompt, grpo_loss_sums, tbrm_loss_sums, trajectories
from .vocab_parallel import ProcessGroup, vocab_parallel_logprob

if TYPE_CHECKING:
    from .config import LossSection
    from .engine import Engine, Microbatch
    from .parallel import ParallelState
    from .rollout.batch import RolloutBatch

log = get_logger(__name__)
LossSums = tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]


class Algorithm:
    """What the trainer asks of an objective. `vocab_size` is the true (unpadded) vocabulary;
    `tp_group` the tensor-parallel group (None without TP)."""

    name = ""

    def __init__(self, loss_cfg: "LossSection", vocab_size: int, tp_group: Optional[ProcessGroup]):
        self.cfg = loss_cfg
        self.vocab_size = vocab_size
        self.tp_group = tp_group

    def prepare(self, batch: "RolloutBatch") -> None:
        """Rank 0, after the rewards and before the batch is broadcast."""

    def on_first_batch(self, ref: "Engine", microbatches: list["Microbatch"], ps: "ParallelState") -> None:
        """Every rank, before the first update of a run that starts from the reference."""

    def loss_sums(self, mb: "Microbatch", logits: torch.Tensor) -> LossSums:
        """(loss_sum, count, {metric: [sum, count]}) on the last pipeline stage."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class TBRM(Algorithm):
    name = "tbrm"

    def __init__(self, loss_cfg, vocab_size, tp_group, value_offset: bool = False):
        super().__init__(loss_cfg, vocab_size, tp_group)
        self.value_offset = value_offset
        self.v_offset = 0.0

    def on_first_batch(self, ref, microbatches, ps):
        if self.value_offset and self.v_offset == 0.0:
            self.v_offset = self._calibrate(ref, microbatches, ps)

    def _calibrate(self, ref: "Engine", microbatches, ps: "ParallelState") -> float:
        """`model.value_offset`: shift V(s_1) by a constant (a uniform output bias: the policy
        is unchanged) so that the base model's mean V(s_1) equals the first batch's mean target
        r/beta. Otherwise the first updates spend themselves moving V by up to r/beta through
        the first response token's logit, which disturbs the policy (shared/notes/tbrm.md saw
        collapses from a V far from r/beta)."""
        from .engine import allreduce_metric_sums

        beta = self.cfg.beta

        def collect(mb, logits):
            _, lse = vocab_parallel_logprob(logits, mb["labels"], self.vocab_size, self.tp_group,
                                            mask=mb["loss_mask"].bool())
            v = trajectories(mb["loss_mask"], mb.get("sequence_ids"), mb["rewards"].numel()).first(lse)
            n = torch.tensor(float(v.numel()), dtype=torch.float64)
            return {"v": torch.stack([v.sum().double(), n]),
                    "target": torch.stack([mb["rewards"].sum().double() / beta, n])}

        out = ref.run(microbatches, collect, forward_only=True, collect=True)
        sums = allreduce_metric_sums(out if ps.is_last_stage else [])
        v_mean = float(sums["v"][0] / sums["v"][1])
        target = float(sums["target"][0] / sums["target"][1])
        if ps.rank == 0:
            log.info(f"value offset {v_mean - target:.3f}: base mean V(s_1) {v_mean:.3f} -> mean r/beta "
                     f"{target:.3f} of the first batch")
        return v_mean - target

    def loss_sums(self, mb, logits):
        return tbrm_loss_sums(logits, mb["labels"], mb["ref_logprobs"], mb["rewards"], mb["loss_mask"],
                              self.cfg.beta, vocab_size=self.vocab_size, tp_group=self.tp_group,
                              v_offset=self.v_offset, sequence_ids=mb.get("sequence_ids"))

    def state_dict(self):
        return {"v_offset": self.v_offset}

    def load_state_dict(self, state):
        self.v_offset = float(state.get("v_offset", 0.0))


class GRPO(Algorithm):
    name = "grpo"

    def prepare(self, batch):
        # Groups are the samples of one prompt, always (published GRPO: per-group mean and
        # std); a dropped empty response only shrinks its own group.
        rewards = torch.tensor([s.reward for s in batch.samples])
        adv = grpo_advantages_by_prompt(rewards, [s.prompt_index for s in batch.samples])
        for s, a in zip(batch.samples, adv.tolist()):
            s.advantage = a

    def loss_sums(self, mb, logits):
        c = self.cfg
        # "recompute": None, the ratio against the policy before this update (grpo_loss_sums)
        old = mb["rollout_logprobs"] if c.old_logprobs == "rollout" else None
        loss_sum, count, sums = grpo_loss_sums(
            logits, mb["labels"], old, mb["ref_logprobs"], mb["advantages"], mb["loss_mask"],
            clip_eps=c.clip_eps, kl_coef=c.kl_coef, aggregation=c.aggregation, vocab_size=self.vocab_size,
            tp_group=self.tp_group, sequence_ids=mb.get("sequence_ids"),
        )
        r = mb["rewards"]
        sums["reward_mean"] = torch.tensor([r.sum().item(), r.numel()], dtype=torch.float64)
        return loss_sum, count, sums


ALGORITHMS: dict[str, type[Algorithm]] = {a.name: a for a in (TBRM, GRPO)}


def make_algorithm(loss_cfg: "LossSection", vocab_size: int, tp_group: Optional[ProcessGroup],
                   value_offset: bool = False) -> Algorithm:
    """The algorithm named by `loss.name`; ValueError names the valid ones."""
    if loss_cfg.name not in ALGORITHMS:
        raise ValueError(f"loss.name={loss_cfg.name!r}: expected one of {sorted(ALGORITHMS)}")
    if loss_cfg.name == "tbrm":
        return TBRM(loss_cfg, vocab_size, tp_group, value_offset=value_offset)
    return ALGORITHMS[loss_cfg.name](loss_cfg, vocab_size, tp_group)
