"""torchrun worker for tests/test_packing.py: one step's reference forward + TBRM / GRPO
forward-backward of the tiny GPT on the same trajectories in the micro-batch layouts of
megatron_tbrm/microbatches.py, at any TP/PP/VPP/DP over gloo.

The policy and the frozen reference start from deterministic full weights (mcore_worker's, the
reference with another salt), so every layout holds the same two models. For each layout and
loss it writes the loss, the loss's count, the metrics, the number of trajectories trained, the
real-token fraction, the micro-batches (and how many shapes they have) on this DP rank, and the
policy's gradients gathered to the full (TP=1) shapes.

    torchrun --nproc-per-node W packing_worker.py --tp T --pp P [--vpp V] --layouts rows,budget,packed --out F
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from mcore_worker import HF, VOCAB, gather_full, init_weights

from megatron_tbrm.algorithms import make_algorithm
from megatron_tbrm.config import LossSection
from megatron_tbrm.engine import Engine, OptimSettings, allreduce_metric_sums
from megatron_tbrm.loss import metric_means
from megatron_tbrm.microbatches import build_microbatches
from megatron_tbrm.model import ModelConfig
from megatron_tbrm.parallel import destroy_distributed, init_distributed
from megatron_tbrm.rollout.batch import Sample
from megatron_tbrm.vocab_parallel import vocab_parallel_logprob

PAD = 0
N = 10  # trajectories: not a multiple of 4, so DP=2 with micro-batches of 2 rows drops 2 of them
BUDGET = 64  # positions per micro-batch (>= the longest trajectory, 52)
LOSSES = {
    "tbrm": LossSection(name="tbrm", beta=0.5),
    "grpo_token": LossSection(name="grpo", kl_coef=0.1, aggregation="token_mean"),
    "grpo_seq": LossSection(name="grpo", kl_coef=0.1, aggregation="seq_mean"),
}


def samples() -> list[Sample]:
    """N trajectories, prompts of 3-12 tokens and long-tailed responses of 1-40 tokens, with
    rewards, GRPO advantages and sampler log-probs."""
    g = torch.Generator().manual_seed(11)
    out = []
    for i in range(N):
        p = 3 + int(torch.randint(0, 10, (1,), generator=g))
        a = min(40, max(1, int(torch.empty(1).log_normal_(2.0, 0.9, generator=g))))
        toks = torch.randint(1, VOCAB - 5, (p + a,), generator=g).tolist()
        lps = (-6.2 + 0.3 * torch.randn(a, generator=g)).tolist()
        s = Sample.from_ids(toks[:p], toks[p:], lps, float(i % 3 == 0), i // 2, PAD)
        s.advantage = float(torch.randn(1, generator=g))
        out.append(s)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--layouts", default="rows,budget,packed")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    ps = init_distributed(tp=a.tp, pp=a.pp, vpp=a.vpp, seed=1)
    from megatron.core import parallel_state as mpu

    cfg = ModelConfig.from_hf(HF)
    # The plain optimizer: every DP rank then holds the whole (DP-reduced) gradient.
    policy = Engine(cfg, OptimSettings(lr=1e-3, clip_grad=0.0, distributed_optimizer=False))
    init_weights(policy.chunks, ps.tp_size, ps.tp_rank)
    ref = Engine(cfg, None)
    init_weights(ref.chunks, ps.tp_size, ps.tp_rank, salt="ref")
    tp_group = mpu.get_tensor_model_parallel_group() if ps.tp_size > 1 else None
    vocab = VOCAB - 5  # the last columns are padding, as in mcore_worker

    def ref_logprobs(mb, logits):
        return vocab_parallel_logprob(logits, mb["labels"], vocab, tp_group, mask=mb["loss_mask"].bool())[0]

    result: dict = {}
    for layout in a.layouts.split(","):
        budget = None if layout == "rows" else BUDGET
        step = build_microbatches(samples(), PAD, 0, ps.dp_size, ps.dp_rank, micro_batch_size=2, max_tokens=budget,
                                  pack_sequences=layout.startswith("packed"), multiple=a.pp if a.vpp else 1)
        mbs = step.microbatches
        if layout == "packed_unconfined":  # the check that confinement matters: one segment per row
            for mb in mbs:
                mb["cu_seqlens"] = torch.tensor([0, mb["tokens"].shape[1]], dtype=torch.int32)
                mb["max_seqlen"] = torch.tensor(mb["tokens"].shape[1])
        out = ref.run(mbs, ref_logprobs, forward_only=True, collect=True)
        if ps.is_last_stage:
            for mb, lp in zip(mbs, out):
                mb["ref_logprobs"] = lp.float()
        for name, section in LOSSES.items():
            algo = make_algorithm(section, vocab, tp_group)

            def loss_fn(mb, logits, algo=algo):
                loss_sum, count, sums = algo.loss_sums(mb, logits)
                sums["loss"] = torch.stack([loss_sum.detach().double(), count.double()])
                return loss_sum, count, sums

            sums = allreduce_metric_sums(policy.run(mbs, loss_fn))  # global sums on every rank
            result[(layout, name)] = {
                "metrics": metric_means(sums), "count": float(sums["loss"][1]), "trajectories": step.trajectories,
                "real_token_fraction": step.real_token_fraction, "microbatches": len(mbs),
                "shapes": len({tuple(mb["tokens"].shape) for mb in mbs}),
                "grads": gather_full(policy.chunks, "grad"),
            }

    gathered: list = [None] * ps.world_size
    dist.all_gather_object(gathered, result if ps.dp_rank == 0 and ps.tp_rank == 0 else None)
    if ps.rank == 0:
        merged: dict = {}
        for g in filter(None, gathered):  # one per pipeline stage, each with its stage's gradients
            for key, r in g.items():
                merged.setdefault(key, dict(r, grads={}))["grads"].update(r["grads"])
        torch.save(merged, a.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
