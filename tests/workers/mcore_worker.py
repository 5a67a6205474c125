"""torchrun worker for the foundation tests: the tiny GPT at any TP/PP/VPP/DP over gloo.

The loss is TBRM's (delta^2 per trajectory, vocab-parallel, padded vocabulary). Weights come
from a deterministic full (TP=1, unpadded-by-layout) state built here from the
parameter's global name, then sliced for this rank by the test's own sharding rules, so every
layout starts from the same model. Gradients are gathered back to the full layout and written
out for the test process to compare.

    torchrun --nproc-per-node W mcore_worker.py --tp T --pp P [--vpp V] [--save CKPT | --load CKPT] --out F
"""

from __future__ import annotations

import argparse
import dataclasses
import re

import torch
import torch.distributed as dist

from megatron_tbrm.checkpoint import load_checkpoint, save_checkpoint
from megatron_tbrm.engine import Engine, OptimSettings, allreduce_metric_sums, split_microbatches
from megatron_tbrm.model import ModelConfig, unwrap
from megatron_tbrm.parallel import destroy_distributed, init_distributed

VOCAB = 512  # a multiple of 128 x TP for TP <= 4: same padded vocab for every layout
HF = dict(
    architectures=["Qwen2ForCausalLM"],
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)


def global_name(chunk, name: str) -> str:
    m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
    if not m:
        return name
    layer = unwrap(chunk).decoder.layers[int(m.group(1))]
    return f"decoder.layers.{layer.layer_number - 1}.{m.group(2)}"


def full_shape(gname: str, local: torch.Size, tp: int) -> list[int]:
    shape = list(local)
    if any(k in gname for k in ("linear_qkv", "linear_fc1", "word_embeddings", "output_layer")):
        shape[0] *= tp
    elif any(k in gname for k in ("linear_proj", "linear_fc2")):
        shape[1] *= tp
    return shape


def shard(gname: str, full: torch.Tensor, tp: int, r: int) -> torch.Tensor:
    if "linear_fc1" in gname:  # per rank: [gate_r; up_r]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]])
    if any(k in gname for k in ("linear_qkv", "word_embeddings", "output_layer")):
        return full.chunk(tp, dim=0)[r]
    if any(k in gname for k in ("linear_proj", "linear_fc2")):
        return full.chunk(tp, dim=1)[r]
    return full


def unshard(gname: str, parts: list[torch.Tensor]) -> torch.Tensor:
    if "linear_fc1" in gname:
        halves = [p.chunk(2, dim=0) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    if any(k in gname for k in ("linear_qkv", "word_embeddings", "output_layer")):
        return torch.cat(parts, dim=0)
    if any(k in gname for k in ("linear_proj", "linear_fc2")):
        return torch.cat(parts, dim=1)
    return parts[0]


def init_weights(chunks, tp: int, tp_rank: int, salt: str = "") -> None:
    """Deterministic full weights from each parameter's global name (+ salt: another model of
    the same shape), sliced for this TP rank."""
    for c in chunks:
        for name, p in unwrap(c).named_parameters():
            g = global_name(c, name)
            gen = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(g + salt)) % 2**31)
            full = torch.randn(full_shape(g, p.shape, tp), generator=gen) * (0.02 if p.dim() > 1 else 1.0)
            if p.dim() == 1 and "bias" not in g:
                full = 1.0 + 0.1 * full  # norms near 1
            with torch.no_grad():
                p.copy_(shard(g, full, tp, tp_rank))


def gather_full(chunks, attr: str) -> dict[str, torch.Tensor]:
    """Full-layout tensors of this pipeline stage (param values or grads), gathered over TP."""
    from megatron.core import parallel_state as mpu

    tp_group = mpu.get_tensor_model_parallel_group()
    tp = mpu.get_tensor_model_parallel_world_size()
    out = {}
    for c in chunks:
        for name, p in unwrap(c).named_parameters():
            g = global_name(c, name)
            t = p.detach() if attr == "data" else p.main_grad.detach()
            t = t.float().contiguous()
            parts = [torch.empty_like(t) for _ in range(tp)]
            dist.all_gather(parts, t, group=tp_group)
            out[g] = unshard(g, parts)
    return out


def batch(n: int, seq: int = 24, step: int = 1) -> dict[str, torch.Tensor]:
    """Rows whose responses start and end at different positions, with rewards and ref log-probs."""
    gen = torch.Generator().manual_seed(7 + 1000 * (step - 1))
    tokens = torch.randint(0, VOCAB, (n, seq + 1), generator=gen)
    mask = torch.zeros(n, seq)
    for i in range(n):
        start = 4 + (3 * i) % 9
        mask[i, start : start + 6 + i % 5] = 1.0
    return {
        "tokens": tokens[:, :-1].contiguous(),
        "labels": tokens[:, 1:].contiguous(),
        "loss_mask": mask,
        "ref_logprobs": -4.0 - torch.rand(n, seq, generator=gen),
        "rewards": (torch.arange(n) % 3 == 0).float(),
        "position_ids": torch.arange(seq).unsqueeze(0).expand(n, -1).contiguous(),
    }


def tbrm_loss(mb, logits):
    """The TBRM objective (mean of delta^2 over trajectories, per-token-loss convention)."""
    from megatron.core import parallel_state as mpu

    from megatron_tbrm.loss import tbrm_loss_sums

    tp = mpu.get_tensor_model_parallel_world_size()
    loss_sum, count, _ = tbrm_loss_sums(
        logits, mb["labels"], mb["ref_logprobs"], mb["rewards"], mb["loss_mask"], 0.5,
        vocab_size=VOCAB - 5,  # the last columns are padding: excluded at every layout
        tp_group=mpu.get_tensor_model_parallel_group() if tp > 1 else None,
    )
    return loss_sum, count, {"loss_sum": loss_sum.item(), "count": count.item()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--vpp", type=int, default=None)
    ap.add_argument("--mbs", type=int, default=2)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1, help="optimizer steps, each on its own batch")
    ap.add_argument("--save", default=None, help="save a checkpoint here after step --save-at")
    ap.add_argument("--save-at", type=int, default=None, help="default: the last step")
    ap.add_argument("--load", default=None, help="only load this checkpoint and report the weights")
    ap.add_argument("--resume", default=None, help="load weights+optimizer+scheduler, then run the remaining steps")
    ap.add_argument("--adam-eps", type=float, default=1e-8)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    ps = init_distributed(tp=a.tp, pp=a.pp, vpp=a.vpp, seed=1)
    cfg = dataclasses.replace(ModelConfig.from_hf(HF), dtype=a.dtype)
    # Warmup, decay and weight decay so a resume must restore the schedule and Adam state exactly.
    eng = Engine(cfg, OptimSettings(lr=1e-2, clip_grad=0.0, distributed_optimizer=True, total_steps=10,
                                    warmup_steps=2, decay="cosine", weight_decay=0.1,
                                    adam_eps=a.adam_eps))
    init_weights(eng.chunks, ps.tp_size, ps.tp_rank)
    eng.optimizer.reload_model_params()  # fp32 main copies follow the re-initialised weights

    result: dict = {"dtypes": sorted({str(p.dtype) for c in eng.chunks for p in c.parameters()})}
    if a.load:
        load_checkpoint(a.load, eng.chunks)
        result["params"] = gather_full(eng.chunks, "data")
        first = a.steps + 1  # nothing to run
    elif a.resume:
        first = load_checkpoint(a.resume, eng.chunks, eng.optimizer, eng.scheduler)["iteration"] + 1
    else:
        first = 1
        result["init"] = gather_full(eng.chunks, "data")
    save_at = a.save_at or a.steps
    for step in range(first, a.steps + 1):
        rows = batch(a.rows, step=step)
        per_dp = a.rows // ps.dp_size
        mine = {k: v[ps.dp_rank * per_dp : (ps.dp_rank + 1) * per_dp] for k, v in rows.items()}
        m = allreduce_metric_sums(eng.run(split_microbatches(mine, a.mbs), tbrm_loss))
        result["loss"] = m["loss_sum"] / m["count"]
        if ps.dp_size == 1:  # the distributed optimizer leaves each DP rank only its grad shard
            result["grads"] = gather_full(eng.chunks, "grad")
        eng.step()
        result["params"] = gather_full(eng.chunks, "data")
        if a.save and step == save_at:
            save_checkpoint(a.save, step, eng.chunks, eng.optimizer, eng.scheduler)

    # Collect every pipeline stage's tensors on rank 0.
    gathered: list = [None] * ps.world_size
    dist.all_gather_object(gathered, result if ps.dp_rank == 0 and ps.tp_rank == 0 else None)
    if ps.rank == 0:
        merged: dict = {}
        for g in filter(None, gathered):
            for k, v in g.items():
                if isinstance(v, dict):
                    merged.setdefault(k, {}).update(v)
                else:
                    merged[k] = v
        torch.save(merged, a.out)
    destroy_distributed()


if __name__ == "__main__":
    main()
