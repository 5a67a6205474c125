"""tbrm_loss and grpo_loss against fp64, full-vocabulary, single-process references written
from the formulas (one trajectory at a time), at TP=1 (in process), 2 and 4 (gloo processes).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torch.distributed as dist
from _dist import run_distributed

from megatron_tbrm.loss import (
    grpo_advantages,
    grpo_loss,
    grpo_loss_sums,
    metric_means,
    tbrm_loss,
    tbrm_loss_sums,
    tbrm_residuals,
)

VOCAB = 37
B, S = 4, 9
BETA = 0.05  # r / beta = 20, well above V(s_1) ~ 4: residuals of both signs
# Responses start and end at different positions (right padding after the end).
SPANS = [(2, 9), (4, 8), (1, 5), (6, 9)]

# name, logits dtype, padded vocab, chunk size, extra loss kwargs
CASES = [
    ("tbrm", torch.float32, 40, 7, {}),
    ("tbrm", torch.bfloat16, 48, 5, {}),
    ("grpo", torch.float32, 40, 7, {"aggregation": "token_mean", "kl_coef": 0.1}),
    ("grpo", torch.bfloat16, 48, 5, {"aggregation": "seq_mean", "kl_coef": 0.0}),
]


def make_inputs(dtype: torch.dtype, padded: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, S, padded, generator=g, dtype=torch.float64) * 2
    logits[..., VOCAB:] = 1.0e4  # garbage in the padding: must not leak
    logits = logits.to(dtype)
    mask = torch.zeros(B, S, dtype=torch.int64)
    for i, (a, e) in enumerate(SPANS):
        mask[i, a:e] = 1
    labels = torch.randint(0, VOCAB, (B, S), generator=g)
    labels = torch.where(mask.bool(), labels, torch.full_like(labels, -100))
    # Reference and old log-probs near the current ones (theta near theta_ref), so residuals
    # take both signs and some ratios fall outside the clip range. Off-response they are nan:
    # they must never be read.
    cur = torch.log_softmax(logits.double()[..., :VOCAB], -1)
    cur = cur.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1).float()
    nan = torch.full((B, S), float("nan"))
    ref = torch.where(mask.bool(), cur + 0.5 * torch.randn(B, S, generator=g), nan)
    old = torch.where(mask.bool(), cur + 0.3 * torch.randn(B, S, generator=g), nan)
    return {
        "logits": logits,
        "labels": labels,
        "loss_mask": mask,
        "ref_logprobs": ref,
        "rollout_logprobs": old,
        "rewards": torch.tensor([1.0, 0.0, 1.0, 0.0]),
        "advantages": torch.randn(B, generator=g),
    }


def tbrm_reference(inp: dict) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    x = inp["logits"].double()[..., :VOCAB].requires_grad_()
    deltas, v_s1s, ratio_sums = [], [], []
    for i in range(B):
        t_idx = inp["loss_mask"][i].nonzero().flatten().tolist()
        v_s1 = torch.logsumexp(x[i, t_idx[0]], -1)
        log_ratio = sum(
            torch.log_softmax(x[i, t], -1)[inp["labels"][i, t]]
            - inp["ref_logprobs"][i, t].double()
            for t in t_idx
        )
        deltas.append(v_s1 + log_ratio - inp["rewards"][i].double() / BETA)
        v_s1s.append(v_s1.item())
        ratio_sums.append(log_ratio.item())
    delta = torch.stack(deltas)
    loss = (delta**2).mean()
    loss.backward()
    d = delta.detach()
    success = inp["rewards"] > 0
    metrics = {
        "delta_mean": d.mean().item(),
        "delta_std": d.std(unbiased=False).item(),
        "v_s1_mean": sum(v_s1s) / B,
        "log_ratio_sum_mean": sum(ratio_sums) / B,
        "reward_mean": inp["rewards"].mean().item(),
        "delta_success_mean": d[success].mean().item(),
        "delta_failure_mean": d[~success].mean().item(),
    }
    return loss.detach(), _full_grad(x.grad, inp), metrics


def grpo_reference(inp: dict, aggregation: str, kl_coef: float, clip_eps: float = 0.2):
    x = inp["logits"].double()[..., :VOCAB].requires_grad_()
    per_seq, n_tok, n_clipped, kls = [], 0, 0, []
    for i in range(B):
        terms = []
        for t in inp["loss_mask"][i].nonzero().flatten().tolist():
            logp = torch.log_softmax(x[i, t], -1)[inp["labels"][i, t]]
            ratio = torch.exp(logp - inp["rollout_logprobs"][i, t].double())
            a = inp["advantages"][i].double()
            unclipped, clipped = -ratio * a, -torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * a
            log_r = inp["ref_logprobs"][i, t].double() - logp
            kl = torch.exp(log_r) - log_r - 1
            terms.append(torch.maximum(unclipped, clipped) + kl_coef * kl)
            n_clipped += int(clipped > unclipped)
            kls.append(kl.item())
        n_tok += len(terms)
        per_seq.append(torch.stack(terms))
    if aggregation == "token_mean":
        loss = torch.cat(per_seq).sum() / n_tok
    else:
        loss = torch.stack([t.mean() for t in per_seq]).mean()
    loss.backward()
    metrics = {"clip_fraction": n_clipped / n_tok, "kl_mean": sum(kls) / n_tok}
    return loss.detach(), _full_grad(x.grad, inp), metrics


def _full_grad(grad_true_vocab: torch.Tensor, inp: dict) -> torch.Tensor:
    grad = torch.zeros(inp["logits"].shape, dtype=torch.float64)
    grad[..., :VOCAB] = grad_true_vocab
    return grad


def run_case(rank: int, tp: int, case: tuple, group, device: str = "cpu") -> dict:
    name, dtype, padded, chunk, kwargs = case
    inp = {k: v.to(device) for k, v in make_inputs(dtype, padded).items()}
    v_local = padded // tp
    shard = inp["logits"][..., rank * v_local : (rank + 1) * v_local].clone().requires_grad_()
    before = shard.detach().clone()
    common = dict(vocab_size=VOCAB, tp_group=group, chunk_size=chunk)
    if name == "tbrm":
        loss, metrics = tbrm_loss(
            shard, inp["labels"], inp["ref_logprobs"], inp["rewards"], inp["loss_mask"], BETA,
            **common,
        )
    else:
        loss, metrics = grpo_loss(
            shard, inp["labels"], inp["rollout_logprobs"], inp["ref_logprobs"], inp["advantages"],
            inp["loss_mask"], **kwargs, **common,
        )
    loss.backward()
    return {
        "loss": loss.detach().cpu(),
        "metrics": metrics,
        "grad": shard.grad.cpu(),
        "unchanged": torch.equal(shard.detach(), before),
    }


def _worker(rank: int, world_size: int) -> list[dict]:
    return [run_case(rank, world_size, case, dist.group.WORLD) for case in CASES]


@functools.cache
def results(tp: int | str) -> list[list[dict]]:
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
    "case", range(len(CASES)), ids=lambda i: f"{CASES[i][0]}-{CASES[i][1]}-pad{CASES[i][2]}"
)
def test_matches_fp64_reference(tp: int | str, case: int) -> None:
    name, dtype, padded, _, kwargs = CASES[case]
    inp = make_inputs(dtype, padded)
    if name == "tbrm":
        loss_ref, grad_ref, metrics_ref = tbrm_reference(inp)
    else:
        loss_ref, grad_ref, metrics_ref = grpo_reference(
            inp, kwargs["aggregation"], kwargs["kl_coef"]
        )
    ranks = results(tp)[case]
    for r in ranks:
        assert r["loss"].dtype == torch.float32
        torch.testing.assert_close(r["loss"].double(), loss_ref, rtol=2e-6, atol=1e-6)
        for key, want in metrics_ref.items():
            assert r["metrics"][key] == pytest.approx(want, rel=1e-5, abs=1e-5), key
        assert r["unchanged"], "the caller's logits were modified"
    grad = torch.cat([r["grad"] for r in ranks], dim=-1)
    assert grad.dtype == dtype
    assert torch.all(grad[..., VOCAB:] == 0), "padding columns got a gradient"
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), grad_ref, **tol)


def _split(inp: dict, rows: slice) -> dict:
    return {k: v[rows] for k, v in inp.items()}


def test_tbrm_micro_batch_sums_give_the_global_mean() -> None:
    """Summing (loss_sum, n, metric pairs) over micro-batches of 1 and 3 rows = whole batch."""
    inp = make_inputs(torch.float32, 40)
    def args(d: dict) -> tuple:
        return d["logits"], d["labels"], d["ref_logprobs"], d["rewards"], d["loss_mask"], BETA

    parts = [
        tbrm_loss_sums(*args(_split(inp, s)), vocab_size=VOCAB) for s in (slice(0, 1), slice(1, 4))
    ]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    pairs = {k: sum(p[2][k] for p in parts) for k in parts[0][2]}
    loss, metrics = tbrm_loss(*args(inp), vocab_size=VOCAB)
    torch.testing.assert_close(total, loss)
    assert metric_means(pairs) == pytest.approx(metrics, rel=1e-6)
    # The first micro-batch (one success) has no failure: that mean is nan, not an error.
    assert math.isnan(metric_means(parts[0][2])["delta_failure_mean"])
    d = tbrm_residuals(*args(inp), vocab_size=VOCAB)
    torch.testing.assert_close((d**2).mean(), loss)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_grpo_micro_batch_sums_give_the_global_mean(aggregation: str) -> None:
    inp = make_inputs(torch.float32, 40)
    def args(d: dict) -> tuple:
        keys = ("logits", "labels", "rollout_logprobs", "ref_logprobs", "advantages", "loss_mask")
        return tuple(d[k] for k in keys)

    kw = dict(aggregation=aggregation, kl_coef=0.1, vocab_size=VOCAB)
    parts = [grpo_loss_sums(*args(_split(inp, s)), **kw) for s in (slice(0, 1), slice(1, 4))]
    total = sum(p[0] for p in parts) / sum(p[1] for p in parts)
    loss, _ = grpo_loss(*args(inp), **kw)
    torch.testing.assert_close(total, loss)
    want = int(inp["loss_mask"].sum()) if aggregation == "token_mean" else B
    assert int(sum(p[1] for p in parts)) == want


def test_grpo_advantages() -> None:
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(r, group_size=4)
    g0 = torch.tensor([1.0, 0.0, 0.0, 0.0])
    want0 = (g0 - 0.25) / (math.sqrt(((g0 - 0.25) ** 2).sum().item() / 3) + 1e-6)
    torch.testing.assert_close(adv[:4], want0)
    assert torch.all(adv[4:] == 0)  # all-correct group: no signal
    torch.testing.assert_close(grpo_advantages(r, 4, normalize_std=False)[:4], g0 - 0.25)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(ref_logprobs=d["ref_logprobs"][:, 1:]), "ref_logprobs has shape"),
        (lambda d: d.update(rewards=d["rewards"][:3]), "rewards has shape"),
        (lambda d: d.update(labels=d["labels"][:3]), "labels has shape"),
        (lambda d: d.update(loss_mask=d["loss_mask"][:, :4]), "loss_mask has shape"),
        (lambda d: d["loss_mask"].__setitem__(2, 0), r"no response token in row\(s\) \[2\]"),
        (lambda d: d["loss_mask"].__setitem__((0, 0), 2), "only 0 and 1"),
        (lambda d: d["labels"].__setitem__((0, 4), VOCAB), "labels out of range"),
        (lambda d: d["rewards"].__setitem__(1, float("nan")), "rewards has 1 non-finite"),
        (lambda d: d["rewards"].__setitem__(1, float("inf")), "rewards has 1 non-finite"),
        (lambda d: d["ref_logprobs"].__setitem__((0, 3), float("nan")), "ref_logprobs has 1"),
        (lambda d: d.update(beta=0.0), "beta"),
        (lambda d: d["logits"].__setitem__((1, 5, 3), float("inf")), "logits"),
    ],
)
def test_tbrm_bad_input(change, match: str) -> None:
    d = make_inputs(torch.float32, 40) | {"beta": BETA}
    change(d)
    with pytest.raises(ValueError, match=match):
        tbrm_loss(
            d["logits"], d["labels"], d["ref_logprobs"], d["rewards"], d["loss_mask"], d["beta"],
            vocab_size=VOCAB,
        )


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(aggregation="sum"), "aggregation"),
        (lambda d: d.update(ref_logprobs=None, kl_coef=0.1), "kl_coef"),
        (lambda d: d["advantages"].__setitem__(0, float("nan")), "advantages"),
        (lambda d: d["rollout_logprobs"].__setitem__((0, 2), float("nan")), "rollout_logprobs"),
        (lambda d: d.update(advantages=d["advantages"][:2]), "advantages has shape"),
        (lambda d: d["loss_mask"].__setitem__(0, 0), "no response token"),
    ],
)
def test_grpo_bad_input(change, match: str) -> None:
    d = make_inputs(torch.float32, 40) | {"aggregation": "token_mean", "kl_coef": 0.0}
    change(d)
    with pytest.raises(ValueError, match=match):
        grpo_loss(
            d["logits"], d["labels"], d["rollout_logprobs"], d["ref_logprobs"], d["advantages"],
            d["loss_mask"], kl_coef=d["kl_coef"], aggregation=d["aggregation"], vocab_size=VOCAB,
        )


def test_grpo_advantages_bad_input() -> None:
    with pytest.raises(ValueError, match="group_size"):
        grpo_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="rewards"):
        grpo_advantages(torch.tensor([0.0, float("nan")]), group_size=2)


def test_tbrm_value_offset_is_a_uniform_output_bias() -> None:
    """v_offset = c equals running the plain loss on logits - c (a uniform output bias: the
    policy is unchanged, V(s_1) drops by c), checked against the fp64 reference."""
    c = 3.25
    inp = make_inputs(torch.float32, 40)
    shifted = dict(inp, logits=torch.cat([inp["logits"][..., :VOCAB] - c, inp["logits"][..., VOCAB:]], -1))
    ref_loss, ref_grad, ref_m = tbrm_reference(shifted)
    logits = inp["logits"].clone().requires_grad_()
    loss, m = tbrm_loss(logits, inp["labels"], inp["ref_logprobs"], inp["rewards"], inp["loss_mask"], BETA,
                        vocab_size=VOCAB, v_offset=c)
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-4, atol=1e-4)
    assert m["v_s1_mean"] == pytest.approx(ref_m["v_s1_mean"], abs=1e-4)
    assert m["log_ratio_sum_mean"] == pytest.approx(ref_m["log_ratio_sum_mean"], abs=1e-4)


def _packed(inp: dict, order: list[int]) -> dict:
    """The rows of `inp` end to end in one row [1, B*S], in `order` (a packed micro-batch with
    every row a segment), sequence_ids naming each position's trajectory."""
    rows = {k: torch.cat([inp[k][i] for i in order]).unsqueeze(0)
            for k in ("logits", "labels", "loss_mask", "ref_logprobs", "rollout_logprobs")}
    rows["sequence_ids"] = torch.tensor([i for i in order for _ in range(S)]).unsqueeze(0)
    return rows | {"rewards": inp["rewards"], "advantages": inp["advantages"]}


@pytest.mark.parametrize("case", range(len(CASES)), ids=lambda i: f"{CASES[i][0]}-{CASES[i][1]}-{CASES[i][4]}")
def test_packed_rows_match_the_fp64_reference(case: int) -> None:
    """Trajectories packed into one row, in another order than their index: V(s_1), the summed
    log-ratio, GRPO's per-sequence mean and every metric stay per trajectory."""
    name, dtype, padded, chunk, kwargs = CASES[case]
    inp = make_inputs(dtype, padded)
    order = [2, 0, 3, 1]
    p = _packed(inp, order)
    logits = p["logits"].clone().requires_grad_()
    common = dict(vocab_size=VOCAB, chunk_size=chunk, sequence_ids=p["sequence_ids"])
    if name == "tbrm":
        want_loss, want_grad, want_m = tbrm_reference(inp)
        loss, m = tbrm_loss(logits, p["labels"], p["ref_logprobs"], p["rewards"], p["loss_mask"], BETA, **common)
    else:
        want_loss, want_grad, want_m = grpo_reference(inp, kwargs["aggregation"], kwargs["kl_coef"])
        loss, m = grpo_loss(logits, p["labels"], p["rollout_logprobs"], p["ref_logprobs"], p["advantages"],
                            p["loss_mask"], **kwargs, **common)
    loss.backward()
    torch.testing.assert_close(loss.double(), want_loss, rtol=2e-6, atol=1e-6)
    for key, want in want_m.items():
        assert m[key] == pytest.approx(want, rel=1e-5, abs=1e-5), key
    grad = logits.grad.view(B, S, -1)[torch.argsort(torch.tensor(order))]  # back to trajectory order
    tol = dict(rtol=1e-2, atol=1e-4) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, **tol)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda p: p["sequence_ids"].__setitem__((0, 3), 4), r"sequence_ids on response positions must lie in \[0, 4\)"),
        (lambda p: p["sequence_ids"].masked_fill_(p["sequence_ids"] == 1, 0), r"no response token in trajectory\(ies\) \[1\]"),
        (lambda p: p.update(rewards=p["rewards"][:3]), "sequence_ids on response positions"),
    ],
)
def test_packed_bad_input(change, match: str) -> None:
    p = _packed(make_inputs(torch.float32, 40), [0, 1, 2, 3])
    change(p)
    with pytest.raises(ValueError, match=match):
        tbrm_loss(p["logits"], p["labels"], p["ref_logprobs"], p["rewards"], p["loss_mask"], BETA, vocab_size=VOCAB,
                  sequence_ids=p["sequence_ids"])
