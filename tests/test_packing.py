"""Token-budget and packed micro-batches (megatron_tbrm/microbatches.py) give the padded
batch's TBRM and GRPO (token_mean, seq_mean) loss and gradients, fp32 on CPU, at TP=2, PP=2
(1F1B and interleaved: micro-batches of different shapes), and DP=2, and train every
trajectory of the step.

Real processes over gloo (tests/workers/packing_worker.py: the tiny GPT, a frozen reference of
other weights for the reference forward). The reference is the padded batch in fixed rows of 2,
single process (TP=1, PP=1, DP=1), the established path (test_foundation.py checks it at every
layout). A packed row whose attention is NOT confined to each trajectory (one segment per row)
must give other gradients: the check that confinement is what makes the match.
"""

from __future__ import annotations

import functools

import pytest
import torch

from _torchrun import torchrun

LOSSES = ("tbrm", "grpo_token", "grpo_seq")
N = 10  # the worker's trajectories


@functools.cache
def run(nproc: int, *args: str) -> dict:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.pt"
        torchrun("packing_worker.py", nproc, *args, "--out", out)
        return torch.load(out, weights_only=False)


def reference() -> dict:
    return run(1, "--layouts", "rows,packed_unconfined")


def _grad_error(got: dict, want: dict) -> float:
    """Largest |difference| over each tensor's largest |gradient|, over all parameters."""
    assert set(got) == set(want)
    return max(((got[k] - g).abs().max() / g.abs().max().clamp(min=1e-12)).item() for k, g in want.items())


def _assert_matches(got: dict, want: dict) -> None:
    assert got["trajectories"] == want["trajectories"] == N  # every trajectory of the step, once
    assert got["count"] == want["count"]
    for key in ("loss", "v_s1_mean", "log_ratio_sum_mean", "delta_success_mean", "pg_loss_mean", "kl_mean",
                "advantage_mean", "response_length_mean", "reward_mean"):
        if key in want["metrics"]:
            assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=1e-6, abs=1e-6), key
    # fp32 in other shapes and orders: ~1e-6 of a tensor's scale; attention leaking between
    # trajectories is O(1) (the unconfined check below)
    assert _grad_error(got["grads"], want["grads"]) < 1e-5


LAYOUTS = {
    "tp2": (2, "--tp", "2"),
    "pp2": (2, "--pp", "2"),
    "pp2-vpp2": (2, "--pp", "2", "--vpp", "2"),
    "dp2": (2,),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("micro_batches", ["budget", "packed"])
def test_budget_and_packed_match_the_padded_batch(layout: str, loss: str, micro_batches: str) -> None:
    nproc, *args = LAYOUTS[layout]
    got = run(nproc, *args, "--layouts", "budget,packed")[(micro_batches, loss)]
    _assert_matches(got, reference()[("rows", loss)])
    if layout.startswith("pp2"):  # the schedule sent activations of several shapes
        assert got["shapes"] > 1
    if micro_batches == "packed":
        assert got["real_token_fraction"] > 0.95


def test_unconfined_packing_differs() -> None:
    """The same packed rows with attention across trajectories: the check can fail."""
    ref = reference()
    for loss in LOSSES:
        assert _grad_error(ref[("packed_unconfined", loss)]["grads"], ref[("rows", loss)]["grads"]) > 0.1, loss
