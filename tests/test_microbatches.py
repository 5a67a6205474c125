"""Micro-batch layouts (megatron_tbrm/microbatches.py) without processes: the token-budget plan
(every trajectory once, none split, under the budget, the same number of micro-batches on every
DP rank), the packed row's tensors and THD PackedSeqParams against values written out here, and
the local spec's packed attention against fp64 attention under a block-diagonal causal mask (in
one gloo process: megatron-core needs its parallel state). The GPU path (Transformer Engine's THD
attention) cannot run on this machine; only the parameters it receives are checked."""

from __future__ import annotations

import random

import pytest
import torch

from megatron_tbrm.microbatches import bin_tokens, build_microbatches, pack, packed_seq_params, plan_bins
from megatron_tbrm.rollout.batch import Sample


def long_tailed(n: int, seed: int, longest: int = 200) -> list[int]:
    rng = random.Random(seed)
    return [min(longest, max(2, int(rng.lognormvariate(3.5, 0.9)))) for _ in range(n)]


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dp,multiple", [(1, 1), (2, 1), (3, 1), (2, 2)])
@pytest.mark.parametrize("seed", range(4))
def test_plan_trains_every_trajectory_once_balanced_under_the_budget(packed, dp, multiple, seed):
    lengths = long_tailed(40, seed)
    budget = 256
    bins, kept = plan_bins(lengths, budget, packed, dp, multiple)
    assert kept == len(lengths)
    flat = [i for rank in bins for b in rank for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # each once, none split (an index is one whole trajectory)
    counts = {len(rank) for rank in bins}
    assert len(counts) == 1 and counts.pop() % multiple == 0 and len(bins) == dp
    for rank in bins:
        for b in rank:
            assert b and b == sorted(b)
            assert bin_tokens([lengths[i] for i in b], packed) <= budget
    assert plan_bins(lengths, budget, packed, dp, multiple) == (bins, kept)  # every rank computes the same
    if packed:  # nearly full rows (0.98-0.99 on these lengths)
        computed = sum(bin_tokens([lengths[i] for i in b], True) for rank in bins for b in rank)
        assert sum(lengths) / computed > 0.95


def test_token_budget_groups_similar_lengths():
    """Rows of one micro-batch are consecutive in length order: 100, 90 | 12, 11, 10, 9."""
    bins, _ = plan_bins([10, 100, 12, 90, 9, 11], budget=208, packed=False, dp=1)
    assert sorted(map(sorted, bins[0])) == [[0, 2, 4, 5], [1, 3]]


def test_packed_rows_sum_under_the_budget():
    # 50 + 10 = 60 <= 64; 40 + 20 = 60; first-fit decreasing needs 2 rows
    bins, _ = plan_bins([10, 50, 40, 20], budget=64, packed=True, dp=1)
    assert sorted(map(sorted, bins[0])) == [[0, 1], [2, 3]]


def test_a_trajectory_over_the_budget_runs_alone():
    bins, kept = plan_bins([100, 5, 6], budget=64, packed=True, dp=1)
    assert kept == 3 and [0] in bins[0]


def test_no_balanced_split_drops_from_the_end():
    """5 trajectories that each fill a micro-batch cannot give 2 ranks the same number: the
    last is dropped (the fixed-rows layout drops from the end too)."""
    bins, kept = plan_bins([60] * 5, budget=64, packed=True, dp=2)
    assert kept == 4 and [len(r) for r in bins] == [2, 2]
    with pytest.raises(ValueError, match="cannot give 2 data-parallel"):
        plan_bins([60], budget=64, packed=True, dp=2)


def sample(prompt: list[int], response: list[int], reward: float, version: int = 0) -> Sample:
    s = Sample.from_ids(prompt, response, [-0.5] * len(response), reward, 0, pad_id=0, version=version)
    s.advantage = reward - 0.5
    return s


def test_pack_lays_trajectories_end_to_end():
    a = sample([5, 6], [7, 8, 9], 1.0)  # 5 tokens
    b = sample([3], [4, 2], 0.0, version=1)  # 3 tokens, another policy version
    mb = pack([a, b], pad_id=0, version=0)
    # 8 positions, a multiple of 8: no padding segment
    assert mb["tokens"].tolist() == [[5, 6, 7, 8, 9, 3, 4, 2]]
    # labels shift within each trajectory; the last position of each predicts the pad, unmasked
    assert mb["labels"].tolist() == [[6, 7, 8, 9, 0, 4, 2, 0]]
    assert mb["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 1, 1, 0]]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert mb["sequence_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]
    assert mb["cu_seqlens"].tolist() == [0, 5, 8] and mb["cu_seqlens"].dtype == torch.int32
    assert int(mb["max_seqlen"]) == 5
    assert mb["rewards"].tolist() == [1.0, 0.0] and mb["advantages"].tolist() == [0.5, -0.5]
    assert mb["on_policy"].tolist() == [1.0, 0.0]
    assert mb["rollout_logprobs"].tolist() == [[0, -0.5, -0.5, -0.5, 0, -0.5, -0.5, 0]]


def test_pack_pads_with_a_segment_of_its_own():
    mb = pack([sample([5, 6], [7, 8, 9], 1.0)], pad_id=0)
    assert mb["tokens"].shape == (1, 8)
    assert mb["cu_seqlens"].tolist() == [0, 5, 8]  # THD lengths end at T
    assert mb["sequence_ids"].tolist() == [[0] * 5 + [-1] * 3]
    assert mb["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    assert mb["loss_mask"][0, 5:].sum() == 0 and mb["rewards"].numel() == 1


def test_packed_seq_params_for_thd():
    mb = pack([sample([1, 2, 3], [4] * 9, 0.0), sample([1], [2], 1.0)], pad_id=0)
    p = packed_seq_params(mb)
    assert p.qkv_format == "thd"
    assert p.cu_seqlens_q.tolist() == p.cu_seqlens_kv.tolist() == [0, 12, 14, 16]
    assert p.cu_seqlens_q.dtype == torch.int32
    assert p.max_seqlen_q == p.max_seqlen_kv == 12  # an int, RoPE's table length
    assert p.cu_seqlens_q_padded is None
    assert packed_seq_params({"tokens": mb["tokens"]}) is None  # padded rows: no THD


def _packed_attention(rank: int, world: int, q, k, v, cu):
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_tbrm.model import ModelConfig, _packed_attention_class, transformer_config
    from megatron_tbrm.parallel import init_distributed

    init_distributed(seed=0)  # megatron-core's parallel state and RNG tracker in this gloo process
    cfg = ModelConfig(family="qwen2", vocab_size=128, hidden_size=128, num_layers=1, num_attention_heads=4,
                      num_kv_heads=2, ffn_hidden_size=128, max_position_embeddings=64)
    attn = _packed_attention_class()(transformer_config(cfg, 1, 1), layer_number=1, attn_mask_type=AttnMaskType.causal,
                                      attention_type="self")
    p = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=9, max_seqlen_kv=9)
    return attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, packed_seq_params=p)


def test_local_packed_attention_is_block_diagonal_causal():
    """model.PackedDotProductAttention on THD q, k, v [t, heads, dim] (GQA: 4 query heads, 2 KV
    heads) against softmax attention in fp64 under the row's block-diagonal causal mask."""
    from _dist import run_distributed

    g = torch.Generator().manual_seed(0)
    cu = torch.tensor([0, 5, 6, 15, 16], dtype=torch.int32)  # segments of 5, 1, 9 and 1 positions
    q, k, v = torch.randn(16, 4, 32, generator=g), torch.randn(16, 2, 32, generator=g), torch.randn(16, 2, 32, generator=g)
    (got,) = run_distributed(_packed_attention, 1, q, k, v, cu)
    seg = torch.repeat_interleave(torch.arange(4), cu.diff().long())
    allowed = (seg[:, None] == seg[None, :]) & torch.ones(16, 16, dtype=torch.bool).tril()
    kk, vv = k.double().repeat_interleave(2, dim=1), v.double().repeat_interleave(2, dim=1)  # query head h uses KV h // 2
    scores = torch.einsum("qhd,khd->hqk", q.double(), kk) / 32 ** 0.5
    want = torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), vv)
    assert got.shape == (16, 1, 128)
    torch.testing.assert_close(got.double().view(16, 4, 32), want, rtol=1e-5, atol=1e-6)


def test_build_keeps_every_trajectory_and_counts_tokens():
    samples = [sample([1] * p, [2] * r, float(i % 2)) for i, (p, r) in
               enumerate([(3, 30), (2, 4), (5, 9), (4, 50), (3, 3), (2, 7)])]
    real = sum(len(s.tokens) for s in samples)  # 122
    rows = build_microbatches(samples, 0, 0, dp_size=2, dp_rank=0, micro_batch_size=2)
    assert rows.trajectories == 4 and rows.computed_tokens == 4 * 56  # 6 // 4 * 4 kept, each row padded to 56
    for pack_sequences in (False, True):
        step = [build_microbatches(samples, 0, 0, 2, r, 2, max_tokens=64, pack_sequences=pack_sequences)
                for r in range(2)]
        assert step[0].trajectories == step[1].trajectories == 6
        assert step[0].real_tokens == real and step[0].computed_tokens == step[1].computed_tokens
        assert len(step[0].microbatches) == len(step[1].microbatches)
        assert sum(mb["rewards"].numel() for s in step for mb in s.microbatches) == 6
        assert all(mb["tokens"].numel() <= 64 for s in step for mb in s.microbatches)
    with pytest.raises(ValueError, match="too few"):
        build_microbatches(samples[:3], 0, 0, dp_size=2, dp_rank=0, micro_batch_size=2)


def test_fixed_rows_are_dealt_strided_and_indices_name_each_row():
    """DP rank r trains trajectories r, r + DP, ...: each rank gets its share of fresh and of
    replayed samples (replayed ones last in the batch), and `indices` says which row is which."""
    samples = [sample([1, 2], [10 + i] * (1 + i % 3), 1.0) for i in range(10)]
    for r in range(2):
        step = build_microbatches(samples, 0, 0, dp_size=2, dp_rank=r, micro_batch_size=2)
        assert step.trajectories == 8  # 10 // 4 * 4: the last two dropped
        assert step.indices == [[r, r + 2], [r + 4, r + 6]]
        for mb, idx in zip(step.microbatches, step.indices):
            assert [int(row[2]) for row in mb["tokens"]] == [10 + i for i in idx]


def _with_ref(s: Sample, value: float) -> Sample:
    s.ref_logprobs = [value * m for m in s.loss_mask]
    return s


@pytest.mark.parametrize("pack_sequences", [False, True])
def test_reference_logprobs_ride_along_only_when_every_row_has_them(pack_sequences):
    """A micro-batch whose every trajectory carries reference log-probs gets them as
    `ref_logprobs` at the loss positions (the trainer then skips its reference forward); one
    without them anywhere gets none; per_trajectory gives each trajectory's values back."""
    from megatron_tbrm.microbatches import per_trajectory

    cached = [_with_ref(sample([1, 2, 3], [4] * (20 + i), 1.0), -0.5 - i) for i in range(4)]
    fresh = [sample([1, 2], [5] * 3, 0.0) for _ in range(4)]
    kw = dict(max_tokens=56, pack_sequences=True) if pack_sequences else {}
    step = build_microbatches(fresh + cached, 0, 0, dp_size=1, dp_rank=0, micro_batch_size=4, **kw)
    flags = {tuple(idx): "ref_logprobs" in mb for mb, idx in zip(step.microbatches, step.indices)}
    batch = fresh + cached
    for mb, idx in zip(step.microbatches, step.indices):
        has = all(batch[i].ref_logprobs is not None for i in idx)
        assert ("ref_logprobs" in mb) == has, flags
        if has:
            got = per_trajectory(mb["ref_logprobs"], mb, [len(batch[i].tokens) for i in idx])
            assert got == [batch[i].ref_logprobs for i in idx]
            assert torch.equal(mb["ref_logprobs"] != 0, mb["loss_mask"].bool())  # where the loss reads them
    if not pack_sequences:  # fixed rows: fresh first, so the second micro-batch is all replayed
        assert list(flags.values()) == [False, True]
    else:  # the planner mixes lengths: here one packed row holds only cached trajectories
        assert any(flags.values()) and not all(flags.values()), flags
