"""Time and peak memory of the TBRM loss (forward + backward): ours vs a naive version.

    python bench/loss.py                         # CPU, TP=1 and TP=2 (gloo), 1 x 2048 tokens
    python bench/loss.py --device cuda --tp 1    # one GPU; TP=k needs k GPUs (NCCL)

ours:  megatron_tbrm.loss.tbrm_loss on this rank's bf16 vocab shard (chunked vocab-parallel op).
naive: all-gather the full-vocab bf16 logits, log_softmax in fp32, gather the label
       log-probs (lse = logit - logprob of column 0), the same residual formula.

Both see the same inputs: bf16 logits [batch, seq, vocab/tp] (vocab 152,064 padded, 151,665
real: Qwen2.5), a 10 % prompt then the response, 0/1 rewards, beta = 0.002.

Method. Each (variant, TP) runs in fresh processes (spawned), so no allocator state is shared.
Inputs are created in place in bf16, one warm-up forward+backward runs, then the peak is
reset and `--repeats` timed iterations run (the median is reported).
- CPU: peak extra = VmHWM - VmRSS at the reset, from /proc/self/status; writing "5" to
  /proc/self/clear_refs resets VmHWM (Linux >= 4.0). Large tensors are mmap'ed by glibc and
  returned on free, so VmHWM tracks the live tensors' peak.
- CUDA: torch.cuda.max_memory_allocated() - memory_allocated() after reset_peak_memory_stats.
"Extra" includes the logits gradient (bf16, one shard), which any implementation must
produce; the table also shows the extra without it. For TP=2 the worst rank is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from megatron_tbrm.loss import tbrm_loss  # noqa: E402

PADDED_VOCAB, TRUE_VOCAB, BETA = 152_064, 151_665, 0.002


class _GatherVocab(torch.autograd.Function):
    """All-gather the vocab shards; backward keeps this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, shard: torch.Tensor, group) -> torch.Tensor:
        ctx.rank, ctx.v = dist.get_rank(group), shard.shape[-1]
        parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, shard.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[..., ctx.rank * ctx.v : (ctx.rank + 1) * ctx.v], None


def naive_tbrm_loss(logits, labels, ref_logprobs, rewards, loss_mask, beta, vocab_size, group):
    full = logits if group is None else _GatherVocab.apply(logits, group)
    logits32 = full[..., :vocab_size].float()
    logp = torch.log_softmax(logits32, dim=-1)
    lp = logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    lse = logits32[..., 0] - logp[..., 0]
    mask = loss_mask.bool()
    first = mask.int().argmax(dim=1)
    v_s1 = lse.gather(1, first.unsqueeze(1)).squeeze(1)
    delta = v_s1 + ((lp - ref_logprobs) * mask).sum(1) - rewards / beta
    return (delta**2).mean()


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMemory:
    def __init__(self, device: torch.device):
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss_kib("VmRSS") * 1024

    def peak_extra(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated() - self.base
        return _rss_kib("VmHWM") * 1024 - self.base


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def worker(rank: int, tp: int, store: str, variant: str, a: argparse.Namespace, queue) -> None:
    device = torch.device("cuda", rank) if a.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // tp))
    group = None
    if tp > 1:
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo",
            init_method=f"file://{store}", rank=rank, world_size=tp,
        )
        group = dist.group.WORLD
    b, s, v_local = a.batch, a.seq, PADDED_VOCAB // tp
    g = torch.Generator(device).manual_seed(rank)
    # Filled in place in bf16: no fp32 staging copy raises the memory baseline.
    logits = torch.empty(b, s, v_local, dtype=torch.bfloat16, device=device)
    logits.normal_(generator=g).mul_(2)
    if (rank + 1) * v_local > TRUE_VOCAB:
        logits[..., max(0, TRUE_VOCAB - rank * v_local) :] = 1e4  # padding: must be ignored
    logits.requires_grad_()
    gl = torch.Generator().manual_seed(0)  # identical on every rank
    labels = torch.randint(0, TRUE_VOCAB, (b, s), generator=gl).to(device)
    ref_logprobs = (-4 * torch.rand(b, s, generator=gl)).to(device)
    rewards = (torch.rand(b, generator=gl) > 0.5).float().to(device)
    loss_mask = (torch.arange(s) >= s // 10).long().expand(b, s).contiguous().to(device)
    inputs = (logits, labels, ref_logprobs, rewards, loss_mask, BETA)

    def step() -> torch.Tensor:
        logits.grad = None
        if variant == "ours":
            loss, _ = tbrm_loss(*inputs, vocab_size=TRUE_VOCAB, tp_group=group, chunk_size=a.chunk_size)
        else:
            loss = naive_tbrm_loss(*inputs, TRUE_VOCAB, group)
        loss.backward()
        return loss.detach()

    mem = PeakMemory(device)
    step()  # warm-up
    logits.grad = None
    _sync(device)
    mem.reset()
    times = []
    for _ in range(a.repeats):
        t0 = time.perf_counter()
        loss = step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    queue.put(
        {
            "rank": rank,
            "time": statistics.median(times),
            "peak_extra": mem.peak_extra(),
            "shard_bytes": logits.numel() * logits.element_size(),
            "loss": loss.item(),
        }
    )
    if group is not None:
        dist.destroy_process_group()


def run(variant: str, tp: int, a: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as tmp:  # a file store: no port picked ahead for rank 0
        mp.start_processes(
            worker, args=(tp, f"{tmp}/store", variant, a, queue), nprocs=tp, join=True, start_method="spawn"
        )
    per_rank = [queue.get() for _ in range(tp)]
    return {
        "time": max(r["time"] for r in per_rank),
        "peak_extra": max(r["peak_extra"] for r in per_rank),
        "shard_bytes": per_rank[0]["shard_bytes"],
        "loss": per_rank[0]["loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    mib = 2**20
    print(
        f"device={a.device} batch={a.batch} seq={a.seq} vocab={PADDED_VOCAB} (real {TRUE_VOCAB}) "
        f"bf16 chunk={a.chunk_size} repeats={a.repeats}"
    )
    header = (
        f"{'tp':>3} {'variant':>7} {'fwd+bwd s':>10} {'shard MiB':>10} {'peak extra MiB':>15} "
        f"{'/shard':>7} {'w/o grad /shard':>16} {'loss':>14}"
    )
    print(header)
    ratios = []
    for tp in a.tp:
        if a.device == "cuda" and torch.cuda.device_count() < tp:
            print(f"{tp:>3} skipped: needs {tp} GPUs, {torch.cuda.device_count()} present")
            continue
        res = {v: run(v, tp, a) for v in ("naive", "ours")}
        for v, r in res.items():
            shard = r["shard_bytes"]
            print(
                f"{tp:>3} {v:>7} {r['time']:>10.3f} {shard / mib:>10.0f} "
                f"{r['peak_extra'] / mib:>15.0f} {r['peak_extra'] / shard:>7.2f} "
                f"{(r['peak_extra'] - shard) / shard:>16.2f} {r['loss']:>14.6e}"
            )
        ratios.append(
            (
                tp,
                res["ours"]["time"] / res["naive"]["time"],
                res["ours"]["peak_extra"] / res["naive"]["peak_extra"],
                abs(res["ours"]["loss"] - res["naive"]["loss"]) / abs(res["naive"]["loss"]),
            )
        )
    for tp, t, m, d in ratios:
        print(
            f"tp={tp}: ours/naive time {t:.2f}x, peak extra memory {m:.2f}x, "
            f"loss rel diff {d:.1e}"
        )


if __name__ == "__main__":
    main()
