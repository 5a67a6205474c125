"""A step's trajectories -> this data-parallel rank's micro-batches, in one of three layouts.

- fixed rows (`train.max_tokens_per_microbatch` null): `train.micro_batch_size` rows each,
  every row right-padded to the step's longest; a multiple of DP x rows is kept (the rest of
  the batch, from its end, is dropped); DP rank r takes trajectories r, r + DP, r + 2 DP, ...
- token budget (`max_tokens_per_microbatch` B): trajectories sorted by length, each
  micro-batch's rows padded to its own longest, rows x padded length <= B.
- packed (B and `train.pack_sequences`): each micro-batch is ONE row [1, T], T <= B, holding
  several trajectories end to end. Attention stays inside each trajectory through
  `cu_seqlens` (megatron-core's THD `PackedSeqParams`, which `Engine` passes to the model:
  Transformer Engine's attention on GPUs, `model.PackedDotProductAttention` (a block-diagonal
  causal mask, one block at a time) with the local spec); RoPE positions restart at 0 per trajectory (megatron-core
  applies RoPE per `cu_seqlens` segment); `sequence_ids` names each position's trajectory, so
  the losses (loss.py) keep V(s_1), the log-ratio sums and every metric per trajectory.
  Per-trajectory tensors (rewards, advantages, on_policy) are [n] in both budget layouts.

With a budget every trajectory of the step is trained (unless the budget cannot give every DP
rank the same number of non-empty micro-batches: then trajectories are dropped from the end
until it can), none is split, and every DP rank runs the same number of micro-batches (a
pipeline schedule needs it; interleaving a multiple of PP): `plan_bins`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import torch

if TYPE_CHECKING:
    from .rollout.batch import Sample

PAD_MULTIPLE = 8  # every micro-batch's length is a multiple of this
Microbatch = dict[str, torch.Tensor]
Bins = list[list[list[int]]]  # [DP rank][micro-batch] -> sample indices


def round_up(n: int, multiple: int = PAD_MULTIPLE) -> int:
    return -(-n // multiple) * multiple


def bin_tokens(lengths: Sequence[int], packed: bool) -> int:
    """Positions a micro-batch of trajectories of these lengths computes (padding included)."""
    return round_up(sum(lengths)) if packed else len(lengths) * round_up(max(lengths))


@dataclass
class StepMicrobatches:
    """This DP rank's micro-batches and the step's accounting over every DP rank."""

    microbatches: list[Microbatch]
    trajectories: int  # trained this step, all DP ranks (every rank computes the same plan)
    real_tokens: int  # their prompt + response tokens
    computed_tokens: int  # the positions the model runs, padding included
    indices: list[list[int]]  # per micro-batch: the batch indices of its trajectories, in row / segment order

    @property
    def real_token_fraction(self) -> float:
        return self.real_tokens / max(self.computed_tokens, 1)


# ------------------------------------------------------------------------------ planning


def _fits(lengths: list[int], length: int, budget: int, packed: bool) -> bool:
    """`length` may join a micro-batch of `lengths` (always when it is empty: a trajectory is never split)."""
    return not lengths or bin_tokens(lengths + [length], packed) <= budget


def _runs(order: list[int], lengths: Sequence[int], budget: int) -> list[list[int]]:
    """Token budget without packing: consecutive runs of the length-sorted samples, as long as
    they fit (similar lengths share a micro-batch, so little padding)."""
    out: list[list[int]] = []
    for i in order:
        if out and _fits([lengths[j] for j in out[-1]], lengths[i], budget, False):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def _split_runs(runs: list[list[int]], lengths: Sequence[int], bins: int) -> Optional[list]:
    """Halve the runs with the most rows until there are `bins` (None: too few samples)."""
    out = [list(r) for r in runs]
    while len(out) < bins:
        k = max(range(len(out)), key=lambda b: (len(out[b]), bin_tokens([lengths[j] for j in out[b]], False)))
        if len(out[k]) < 2:
            return None
        half = len(out[k]) // 2
        out[k:k + 1] = [out[k][:half], out[k][half:]]
    return out


def _least_loaded(order: list[int], lengths: Sequence[int], budget: int, bins: int) -> Optional[list]:
    """Packing: samples (longest first) into `bins` rows, each to the least loaded row it fits
    in (the first `bins` samples open one each), so the rows come out of similar lengths;
    None when one fits nowhere."""
    out: list[list[int]] = [[] for _ in range(bins)]
    load = [0] * bins
    for i in order:
        fits = [b for b in range(bins) if _fits([lengths[j] for j in out[b]], lengths[i], budget, True)]
        if not fits:
            return None
        b = min(fits, key=lambda b: (load[b], b))
        out[b].append(i)
        load[b] += lengths[i]
    return out


def _first_fit_count(order: list[int], lengths: Sequence[int], budget: int) -> int:
    """Rows first-fit decreasing packs the samples into: the fewest to try."""
    rows: list[list[int]] = []
    for i in order:
        for r in rows:
            if _fits([lengths[j] for j in r], lengths[i], budget, True):
                r.append(i)
                break
        else:
            rows.append([i])
    return len(rows)


def plan_bins(lengths: Sequence[int], budget: int, packed: bool, dp: int, multiple: int = 1) -> tuple[Bins, int]:
    """Assign samples (their token lengths) to micro-batches under a token budget.

    Returns (bins, kept): bins[r] is DP rank r's list of micro-batches, each a list of sample
    indices in batch order; every rank gets the same number, a multiple of `multiple`; the
    samples 0..kept-1 are used (those after them dropped, only when no balanced split of all
    exists). A micro-batch computes `bin_tokens` <= budget positions, except a lone sample
    longer than the budget. Deterministic: every rank computes the same plan from the
    broadcast batch. Raises ValueError when fewer than dp x multiple samples are left.
    """
    n = len(lengths)
    unit = dp * multiple
    while n >= unit:
        order = sorted(range(n), key=lambda i: (-lengths[i], i))
        runs = None if packed else _runs(order, lengths, budget)
        fewest = _first_fit_count(order, lengths, budget) if packed else len(runs)
        per_rank = -(-fewest // unit) * multiple
        while per_rank * dp <= n:
            bins = (_least_loaded(order, lengths, budget, per_rank * dp) if packed
                    else _split_runs(runs, lengths, per_rank * dp))
            if bins is not None:
                return _deal(bins, lengths, packed, dp), n
            per_rank += multiple
        n -= 1
    raise ValueError(f"{len(lengths)} trajectories cannot give {dp} data-parallel rank(s) "
                     f"{multiple} non-empty micro-batch(es) each")


def _deal(bins: list, lengths: Sequence[int], packed: bool, dp: int) -> Bins:
    """Micro-batches to DP ranks, the same number each, costliest first to the least loaded
    rank with room: the ranks' compute stays close."""
    per_rank = len(bins) // dp
    ranks: Bins = [[] for _ in range(dp)]
    load = [0] * dp
    for b in sorted(bins, key=lambda b: -bin_tokens([lengths[i] for i in b], packed)):
        r = min((r for r in range(dp) if len(ranks[r]) < per_rank), key=lambda r: load[r])
        ranks[r].append(sorted(b))
        load[r] += bin_tokens([lengths[i] for i in b], packed)
    return ranks


# ------------------------------------------------------------------------------ tensors


def pack(samples: Sequence["Sample"], pad_id: int, version: int = 0) -> Microbatch:
    """Trajectories end to end in one row [1, T], T = their total rounded up to PAD_MULTIPLE.

    Row tensors [1, T]: tokens, labels (int64, pad_id after the last trajectory), loss_mask,
    rollout_logprobs (fp32, 0 there; ref_logprobs too when every sample carries them),
    position_ids (restarting at 0 per trajectory and for the padding), sequence_ids (int64: the
    trajectory's index, -1 on the padding). cu_seqlens (int32 [k + 1], or [k + 2] with the
    padding as a last segment: THD's cumulative lengths end at T) and max_seqlen (int64
    scalar). Per trajectory [k] fp32: rewards, advantages, on_policy (as rollout.batch.collate)."""
    from .rollout.batch import all_ref_logprobs

    total = sum(len(s.tokens) for s in samples)
    seq = round_up(total)
    per_position = ["tokens", "labels", "loss_mask", "rollout_logprobs"]
    if all_ref_logprobs(samples):
        per_position.append("ref_logprobs")
    fill = {"tokens": pad_id, "labels": pad_id, "sequence_ids": -1}  # the padding's; 0.0 for the float keys
    floats = ("loss_mask", "rollout_logprobs", "ref_logprobs")
    row: dict[str, list] = {k: [] for k in per_position + ["position_ids", "sequence_ids"]}
    lengths = []
    for i, s in enumerate(samples):
        n = len(s.tokens)
        lengths.append(n)
        for key in per_position:
            row[key] += getattr(s, key)
        row["position_ids"] += range(n)
        row["sequence_ids"] += [i] * n
    if seq > total:  # the padding: a segment of its own, outside every trajectory
        lengths.append(seq - total)
        for key in per_position + ["sequence_ids"]:
            row[key] += [fill.get(key, 0.0)] * (seq - total)
        row["position_ids"] += range(seq - total)
    out = {k: torch.tensor([v], dtype=torch.float32 if k in floats else torch.long) for k, v in row.items()}
    out["cu_seqlens"] = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    out["max_seqlen"] = torch.tensor(max(lengths))
    out["rewards"] = torch.tensor([s.reward for s in samples], dtype=torch.float32)
    out["advantages"] = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    out["on_policy"] = torch.tensor([s.on_policy(version) for s in samples], dtype=torch.float32)
    return out


def per_trajectory(t: torch.Tensor, mb: Microbatch, lengths: Sequence[int]) -> list[list[float]]:
    """A per-position tensor of micro-batch `mb` ([B, S] padded rows, or [1, T] packed) back as
    one list per trajectory, `lengths[k]` positions for its k-th (rows in order, or the
    `cu_seqlens` segments of a packed row): the inverse of collate / pack for that key."""
    if "cu_seqlens" in mb:
        starts = mb["cu_seqlens"].tolist()
        return [t[0, starts[k]:starts[k] + n].tolist() for k, n in enumerate(lengths)]
    return [t[k, :n].tolist() for k, n in enumerate(lengths)]


def packed_seq_params(mb: Microbatch):
    """megatron-core's THD PackedSeqParams for a packed micro-batch (None for padded rows):
    the same cumulative lengths for queries and keys (self-attention), max_seqlen the longest
    segment (RoPE's table length)."""
    if "cu_seqlens" not in mb:
        return None
    from megatron.core.packed_seq_params import PackedSeqParams

    cu = mb["cu_seqlens"].to(torch.int32)
    longest = int(mb["max_seqlen"])
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=longest,
                           max_seqlen_kv=longest)


def build_microbatches(samples: Sequence["Sample"], pad_id: int, version: int, dp_size: int, dp_rank: int,
                       micro_batch_size: int, max_tokens: Optional[int] = None, pack_sequences: bool = False,
                       multiple: int = 1) -> StepMicrobatches:
    """This DP rank's micro-batches of the step's `samples` (the layouts of the module
    docstring). `version`: the policy's optimizer step (on_policy). `multiple`: micro-batches
    per rank must be a multiple of it (PP with interleaving). Raises ValueError when there are
    too few samples for one micro-batch per rank."""
    from .rollout.batch import collate

    if max_tokens is None:
        unit = dp_size * micro_batch_size * multiple
        kept = len(samples) // unit * unit
        if kept == 0:
            raise ValueError(f"{len(samples)} trajectories are too few for {multiple} micro-batch(es) of "
                             f"{micro_batch_size} rows on each of {dp_size} data-parallel rank(s)")
        seq = round_up(max(len(s.tokens) for s in samples))
        # Strided, so every rank gets its share of each part of the batch (fresh, then file, then
        # replayed samples): replayed ones skip the reference forward, and the ranks stay even.
        index = list(range(dp_rank, kept, dp_size))
        indices = [index[i:i + micro_batch_size] for i in range(0, len(index), micro_batch_size)]
        mbs = [collate([samples[i] for i in b], pad_id, seq, version=version) for b in indices]
        return StepMicrobatches(mbs, kept, sum(len(s.tokens) for s in samples[:kept]), kept * seq, indices)
    lengths = [len(s.tokens) for s in samples]
    bins, kept = plan_bins(lengths, max_tokens, pack_sequences, dp_size, multiple)
    mine = [[samples[i] for i in b] for b in bins[dp_rank]]
    mbs = [pack(b, pad_id, version) if pack_sequences else collate(b, pad_id, 0, version=version) for b in mine]
    computed = sum(bin_tokens([lengths[i] for i in b], pack_sequences) for rank in bins for b in rank)
    return StepMicrobatches(mbs, kept, sum(lengths[:kept]), computed, bins[dp_rank])
