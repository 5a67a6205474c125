"""Vocab-parallel per-token log-prob and log-sum-exp, chunked, with its own backward.

Each tensor-parallel rank holds a contiguous vocab shard of the logits: rank r holds global
columns [r * v_local, (r + 1) * v_local). Columns >= `vocab_size` are Megatron's padding and
are excluded from every reduction. The full vocabulary is never gathered: three per-token
reductions (MAX of the max, SUM of the sum-exp, SUM of the target logit) make the result
exact.

Memory: the caller's logits are never written to and never copied whole. The fp32 work is
done `chunk_size` tokens at a time in one reused buffer; backward keeps only the original
(e.g. bf16) logits plus the per-token log-sum-exp and target logit (fp32 [tokens]), and
recomputes the softmax chunk by chunk, so it needs no communication at all. Peak extra memory
is the logits gradient (which autograd needs anyway) plus one fp32 [chunk_size, v_local] buffer.

Labels at positions where `mask` is 0 may be anything (-100, a pad id); those positions
return a log-prob of 0 and receive no log-prob gradient. Their log-sum-exp is still computed,
since it needs no label (TBRM reads V(s_1) at the last prompt position).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

DEFAULT_CHUNK_SIZE = 512  # tokens; the fp32 temporary is chunk_size * v_local * 4 bytes


class VocabShard:
    """Where this rank's shard sits in the vocabulary and how many of its columns are real."""

    def __init__(self, v_local: int, vocab_size: int | None, tp_group: ProcessGroup | None):
        rank = dist.get_rank(tp_group) if tp_group is not None else 0
        world = dist.get_world_size(tp_group) if tp_group is not None else 1
        padded = v_local * world
        self.vocab_size = padded if vocab_size is None else vocab_size
        if not 0 < self.vocab_size <= padded:
            raise ValueError(
                f"vocab_size={vocab_size} must be in (0, {padded}] (v_local={v_local} x tp={world})"
            )
        self.start = rank * v_local
        # A shard may be partly or (with a large TP) entirely padding.
        self.n_valid = max(0, min(v_local, self.vocab_size - self.start))


# --- reduction math: small helpers, separate from the autograd wiring -------------------------


def local_max(logits: torch.Tensor, n_valid: int) -> torch.Tensor:
    """Per-token max over this shard's real columns, fp32 [tokens] (-inf if there are none).

    Computed in the input dtype: the max of bf16 values is exact, so no fp32 copy is needed.
    """
    if n_valid == 0:
        return logits.new_full(logits.shape[:-1], float("-inf"), dtype=torch.float32)
    return logits[:, :n_valid].amax(dim=-1).float()


def fp32_workspace(logits: torch.Tensor, n_valid: int, chunk_size: int) -> torch.Tensor:
    """One fp32 [chunk, n_valid] buffer reused by every chunk.

    Reusing it matters on CPU, where each fresh large allocation is mmap'ed and page-faulted
    again; it is ours, so in-place math on it never touches the caller's logits.
    """
    return logits.new_empty((min(chunk_size, logits.shape[0]), n_valid), dtype=torch.float32)


def shifted_fp32(
    logits: torch.Tensor, n_valid: int, shift: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """work[:rows] = fp32(logits[:, :n_valid]) - shift[:, None], for one chunk of tokens.

    On CUDA one mixed-dtype kernel reads the bf16 logits and writes fp32. On CPU mixed-dtype
    elementwise ops take an unvectorised path (~2x slower here), so convert, then subtract.
    """
    out, x = work[: logits.shape[0]], logits[:, :n_valid]
    if logits.is_cuda:
        return torch.sub(x, shift.unsqueeze(-1), out=out)
    return out.copy_(x).sub_(shift.unsqueeze(-1))


def local_sum_exp(
    logits: torch.Tensor, n_valid: int, shift: torch.Tensor, work: torch.Tensor
) -> torch.Tensor:
    """sum_j exp(logit_j - shift) over this shard's real columns, fp32 [tokens] (one chunk)."""
    return shifted_fp32(logits, n_valid, shift, work).exp_().sum(dim=-1)


def local_target_logit(
    logits: torch.Tensor, labels: torch.Tensor, shard: VocabShard
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logit of the label if this rank owns it, else 0; fp32 [tokens].

    Also returns the label's local column (clamped into range) and the ownership mask, which
    backward reuses.
    """
    local = labels - shard.start
    owned = (local >= 0) & (local < shard.n_valid)
    local = torch.where(owned, local, torch.zeros_like(local))
    picked = logits.gather(-1, local.unsqueeze(-1)).squeeze(-1).float()
    return torch.where(owned, picked, torch.zeros_like(picked)), local, owned


def write_grad_chunk(
    out: torch.Tensor,
    logits: torch.Tensor,
    n_valid: int,
    lse: torch.Tensor,
    coef_softmax: torch.Tensor,
    target_logit: torch.Tensor,
    local_label: torch.Tensor,
    owned_coef: torch.Tensor,
    owned: torch.Tensor,
    work: torch.Tensor,
) -> None:
    """out[:, :n_valid] = coef_softmax * softmax + owned_coef * onehot(label), one chunk.

    softmax = exp(logit - lse) with the global lse, so it is already normalised over the whole
    true vocabulary. Each entry is computed in fp32 and rounded to out's dtype once: the label
    column, where the two terms meet, is recomputed in fp32 from the saved target logit.
    """
    p = shifted_fp32(logits, n_valid, lse, work).exp_()
    if p.is_cuda:  # multiply and round to the logits' dtype in one kernel
        torch.mul(p, coef_softmax.unsqueeze(-1), out=out[:, :n_valid])
    else:  # see shifted_fp32: CPU prefers same-dtype math, then one conversion
        out[:, :n_valid] = p.mul_(coef_softmax.unsqueeze(-1))
    # index_put_, not scatter_: CPU scatter_ on bf16 makes an fp32 copy of all of `out`.
    at = (torch.arange(out.shape[0], device=out.device), local_label)
    at_label = coef_softmax * torch.exp(target_logit - lse) + owned_coef
    out.index_put_(at, torch.where(owned, at_label.to(out.dtype), out[at]))


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp, group: ProcessGroup | None) -> None:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)


# --- autograd wiring ---------------------------------------------------------------------------


class _VocabParallelLogProb(torch.autograd.Function):
    """logits [N, v_local], labels [N] (valid ids), mask [N] bool -> (logprob [N], lse [N]) fp32."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        shard: VocabShard,
        chunk_size: int,
        tp_group: ProcessGroup | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = logits.shape[0]
        token_max = local_max(logits, shard.n_valid)
        _all_reduce(token_max, dist.ReduceOp.MAX, tp_group)

        # Sum-exp and target logit travel in one SUM all-reduce.
        sums = logits.new_zeros((2, n), dtype=torch.float32)
        if shard.n_valid > 0:
            work = fp32_workspace(logits, shard.n_valid, chunk_size)
            for i in range(0, n, chunk_size):
                j = min(i + chunk_size, n)
                sums[0, i:j] = local_sum_exp(logits[i:j], shard.n_valid, token_max[i:j], work)
        target, local_label, owned = local_target_logit(logits, labels, shard)
        sums[1] = target
        _all_reduce(sums, dist.ReduceOp.SUM, tp_group)

        lse = token_max + sums[0].log()
        logprob = torch.where(mask, sums[1] - lse, torch.zeros_like(lse))
        ctx.save_for_backward(logits, lse, sums[1], local_label, owned, mask)
        ctx.n_valid = shard.n_valid
        ctx.chunk_size = chunk_size
        return logprob, lse

    @staticmethod
    def backward(ctx, grad_logprob: torch.Tensor, grad_lse: torch.Tensor):
        logits, lse, target_logit, local_label, owned, mask = ctx.saved_tensors
        n, n_valid, chunk = logits.shape[0], ctx.n_valid, ctx.chunk_size
        # d logprob / d logit = onehot - softmax and d lse / d logit = softmax. A masked
        # position's logprob is the constant 0, so its grad_logprob is dropped.
        grad_lp = torch.where(mask, grad_logprob, torch.zeros_like(grad_logprob))
        coef_softmax = grad_lse - grad_lp
        owned = owned & mask
        owned_coef = torch.where(owned, grad_lp, torch.zeros_like(grad_lp))

        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        grad[:, n_valid:] = 0  # padding columns
        if n_valid > 0:
            work = fp32_workspace(logits, n_valid, chunk)
            for i in range(0, n, chunk):
                j = min(i + chunk, n)
                write_grad_chunk(
                    grad[i:j], logits[i:j], n_valid, lse[i:j], coef_softmax[i:j],
                    target_logit[i:j], local_label[i:j], owned_coef[i:j], owned[i:j], work,
                )
        return grad, None, None, None, None, None


def vocab_parallel_logprob(
    logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int | None = None,
    tp_group: ProcessGroup | None = None,
    mask: torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token log pi(label) and log-sum-exp over the true vocabulary, both fp32.

    logits: [*, v_local], this rank's vocab shard (any float dtype; never modified).
    labels: [*] integer ids in [0, vocab_size) wherever `mask` is true (everywhere if None).
    vocab_size: the unpadded vocabulary; None means v_local * tp (no padding).
    tp_group: the tensor-parallel group the vocab is split over; None = one full-vocab shard.
    mask: [*] bool/0-1, optional; positions where it is 0 get logprob 0 and may hold any label.
    Returns (logprob, lse), each [*] fp32, differentiable w.r.t. logits.
    """
    if logits.dim() < 2 or not logits.is_floating_point():
        raise ValueError(
            f"logits must be a float tensor [..., v_local], got {tuple(logits.shape)} "
            f"{logits.dtype}"
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} != logits shape without the vocab dim "
            f"{tuple(logits.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if mask is None:
        mask = torch.ones_like(labels, dtype=torch.bool)
    elif mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    shard = VocabShard(logits.shape[-1], vocab_size, tp_group)
    mask = mask.to(torch.bool)
    labels = labels.long()
    bad = mask & ((labels < 0) | (labels >= shard.vocab_size))
    if bad.any():
        first = labels[bad][0].item()
        raise ValueError(
            f"labels out of range [0, {shard.vocab_size}) at {int(bad.sum())} unmasked "
            f"position(s), e.g. {first}"
        )
    labels = torch.where(mask, labels, torch.zeros_like(labels))

    # Flatten the token dims without copying: order them by stride first, so a transposed
    # [s, b, v] -> [b, s, v] view still flattens as a view. Autograd maps the grad back.
    order = sorted(range(labels.dim()), key=lambda d: -logits.stride(d))
    inverse = sorted(range(len(order)), key=order.__getitem__)
    permuted_shape = [labels.shape[d] for d in order]
    flat_logits = logits.permute(*order, -1).reshape(-1, logits.shape[-1])
    lp, lse = _VocabParallelLogProb.apply(
        flat_logits,
        labels.permute(*order).reshape(-1),
        mask.permute(*order).reshape(-1),
        shard,
        chunk_size,
        tp_group,
    )
    return (
        lp.view(permuted_shape).permute(*inverse).contiguous(),
        lse.view(permuted_shape).permute(*inverse).contiguous(),
    )
