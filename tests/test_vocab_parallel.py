"""vocab_parallel_logprob against an independent fp64, full-vocabulary, single-process reference.

TP=2 and TP=4 run in real gloo processes; TP=1 runs in this process with tp_group=None.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_tbrm.vocab_parallel import vocab_parallel_logprob

VOCAB = 37
B, S = 3, 7
GARBAGE = 1.0e4  # in padded columns: any leak into a max/LSE/softmax is obvious

# (dtype, padded vocab, chunk size). B*S = 21 tokens, so chunks of 5 and 8 leave a ragged
# last chunk. Padded 64 at TP=4 leaves rank 3 with no real column at all.
CASES = [
    (torch.float32, 40, 5),
    (torch.float32, 48, 8),
    (torch.float32, 64, 1024),
    (torch.bfloat16, 40, 8),
    (torch.bfloat16, 48, 5),
    (torch.bfloat16, 64, 5),
]


def make_inputs(dtype: torch.dtype, padded: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, padded, generator=g, dtype=torch.float64) * 3
    logits[..., VOCAB:] = GARBAGE
    # Responses start at different positions; prompt positions hold a pad label (-100).
    starts = torch.tensor([0, 2, 5])
    mask = torch.arange(S).unsqueeze(0) >= starts.unsqueeze(1)
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    return {
        "logits": logits.to(dtype),
        "labels": labels,
        "mask": mask,
        "g_lp": torch.randn(B, S, generator=g),
        "g_lse": torch.randn(B, S, generator=g),
    }


def reference(inp: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax / logsumexp in fp64 over the true vocabulary; autograd for the gradient."""
    x = inp["logits"].double()[..., :VOCAB].requires_grad_()
    mask = inp["mask"]
    labels = torch.where(mask, inp["labels"], 0)
    lp = torch.log_softmax(x, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lp = torch.where(mask, lp, 0.0)
    lse = torch.logsumexp(x, -1)
    (lp * inp["g_lp"].double() + lse * inp["g_lse"].double()).sum().backward()
    grad = torch.zeros(inp["logits"].shape, dtype=torch.float64)
    grad[..., :VOCAB] = x.grad
    return lp.detach(), lse.detach(), grad


def run_case(
    rank: int, tp: int, case: tuple, group, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    dtype, padded, chunk = case
    inp = {k: v.to(device) for k, v in make_inputs(dtype, padded).items()}
    v_local = padded // tp
    shard = inp["logits"][..., rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    before = shard.detach().clone()
    lp, lse = vocab_parallel_logprob(
        shard, inp["labels"], VOCAB, group, mask=inp["mask"], chunk_size=chunk
    )
    (lp * inp["g_lp"] + lse * inp["g_lse"]).sum().backward()
    return {
        "lp": lp.detach().cpu(),
        "lse": lse.detach().cpu(),
        "grad": shard.grad.cpu(),
        "unchanged": torch.equal(shard.detach(), before),
    }


def _worker(rank: int, world_size: int) -> list[dict[str, torch.Tensor]]:
    return [run_case(rank, world_size, case, dist.group.WORLD) for case in CASES]


@functools.cache
def results(tp: int | str) -> list[list[dict[str, torch.Tensor]]]:
    """results(tp)[case][rank]; one spawn per TP size serves every case. "cuda": TP=1 on a GPU."""
    if tp in (1, "cuda"):
        device = "cuda" if tp == "cuda" else "cpu"
        return [[run_case(0, 1, case, None, device)] for case in CASES]
    per_rank = run_distributed(_worker, tp)
    return [[per_rank[r][c] for r in range(tp)] for c in range(len(CASES))]


CUDA = pytest.param(
    "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
)


@pytest.mark.parametrize("tp", [1, 2, 4, CUDA])
@pytest.mark.parametrize(
    "case", range(len(CASES)), ids=lambda i: f"{CASES[i][0]}-pad{CASES[i][1]}-chunk{CASES[i][2]}"
)
def test_matches_fp64_reference(tp: int | str, case: int) -> None:
    dtype, padded, _ = CASES[case]
    lp_ref, lse_ref, grad_ref = reference(make_inputs(dtype, padded))
    ranks = results(tp)[case]
    for r in ranks:
        # Every rank returns the same replicated values.
        torch.testing.assert_close(r["lp"].double(), lp_ref, rtol=0, atol=2e-5)
        torch.testing.assert_close(r["lse"].double(), lse_ref, rtol=0, atol=2e-5)
        assert r["lp"].dtype == r["lse"].dtype == torch.float32
        assert r["unchanged"], "the caller's logits were modified"
    grad = torch.cat([r["grad"] for r in ranks], dim=-1)
    assert grad.dtype == dtype
    assert torch.all(grad[..., VOCAB:] == 0), "padding columns got a gradient"
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad_ref, **tol)


def test_transposed_logits_view() -> None:
    """A [s, b, v] tensor viewed as [b, s, v] (Megatron's layout) gives the same values/grads."""
    inp = make_inputs(torch.float32, 40)
    sbv = inp["logits"].transpose(0, 1).contiguous().requires_grad_()
    bsv = sbv.transpose(0, 1)
    lp, lse = vocab_parallel_logprob(bsv, inp["labels"], VOCAB, mask=inp["mask"], chunk_size=4)
    (lp * inp["g_lp"] + lse * inp["g_lse"]).sum().backward()
    lp_ref, lse_ref, grad_ref = reference(inp)
    torch.testing.assert_close(lp.double(), lp_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(sbv.grad.transpose(0, 1).double(), grad_ref, rtol=1e-5, atol=1e-6)


def test_without_mask_every_label_counts() -> None:
    inp = make_inputs(torch.float32, 40)
    labels = torch.where(inp["mask"], inp["labels"], 3)
    lp, _ = vocab_parallel_logprob(inp["logits"], labels, VOCAB)
    ref = torch.log_softmax(inp["logits"].double()[..., :VOCAB], -1)
    ref = ref.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(lp.double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda i: i.update(labels=i["labels"][:, :-1]), "labels shape"),
        (lambda i: i.update(mask=i["mask"][:1]), "mask shape"),
        (lambda i: i["labels"].__setitem__((2, 6), VOCAB), "labels out of range"),
        (lambda i: i["labels"].__setitem__((1, 3), -1), "labels out of range"),
        (lambda i: i.update(labels=i["labels"].float()), "integer"),
        (lambda i: i.update(vocab_size=41), "vocab_size"),
        (lambda i: i.update(chunk_size=0), "chunk_size"),
    ],
)
def test_bad_input(change, match: str) -> None:
    inp = make_inputs(torch.float32, 40)
    args = {"labels": inp["labels"], "mask": inp["mask"], "vocab_size": VOCAB, "chunk_size": 4}
    change(args)
    with pytest.raises(ValueError, match=match):
        vocab_parallel_logprob(inp["logits"], **args)
