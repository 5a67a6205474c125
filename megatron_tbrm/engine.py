"""The Megatron side of training: model chunks, optimizer, LR schedule, pipeline schedules.

A step is `run(microbatches, loss_fn)` then `step()`. Loss functions follow megatron-core's
per-token-loss convention: `loss_fn(microbatch, logits) -> (loss_sum, count, metric_sums)`;
the schedule and `finalize_model_grads` divide the summed gradient by the global count, so
the result is the mean over every item of the global batch whatever the micro-batch size,
DP, TP and PP.

Micro-batches may differ in shape (token-budget and packed layouts, microbatches.py): with
PP > 1 the schedule then exchanges each activation's shape before it (megatron-core's
`variable_seq_lengths`). A packed micro-batch ([1, T] with `cu_seqlens`) goes to the model
with THD `PackedSeqParams`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from .microbatches import packed_seq_params
from .model import ModelConfig, build_model, unwrap

Microbatch = dict[str, torch.Tensor]
LossFn = Callable[[Microbatch, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict[str, float]]]


@dataclass
class OptimSettings:
    lr: float
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: str = "constant"
    total_steps: int = 1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    distributed_optimizer: bool = True

    @classmethod
    def from_section(cls, section, **extra) -> "OptimSettings":
        """From the config's `optim` section, every field by name (a field this class does not
        know is a TypeError, not a setting silently dropped), plus `extra` (total_steps, ...)."""
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(section)}, **extra)


INT_KEYS = ("tokens", "labels")  # padded with pad_id, int64; every other row key: 0, fp32


def pad_batch(rows: list[dict], pad_id: int, multiple: int = 8, seq_len: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad variable-length rows into tensors (causal attention needs no mask).

    List values become [B, S] with S = max(longest row, seq_len) rounded up to `multiple`:
    `tokens`/`labels` int64 padded with pad_id, any other key fp32 padded with 0. Scalar
    values become [B] fp32. Adds `position_ids` [B, S]."""
    seq = max(max(len(r["tokens"]) for r in rows), seq_len)
    seq = -(-seq // multiple) * multiple
    out: dict[str, torch.Tensor] = {}
    for key, value in rows[0].items():
        if not isinstance(value, (list, tuple)):
            out[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
            continue
        fill, dtype = (pad_id, torch.long) if key in INT_KEYS else (0.0, torch.float32)
        t = torch.full((len(rows), seq), fill, dtype=dtype)
        for i, r in enumerate(rows):
            t[i, : len(r[key])] = torch.as_tensor(r[key], dtype=dtype)
        out[key] = t
    out["position_ids"] = torch.arange(seq).unsqueeze(0).expand(len(rows), -1).contiguous()
    return out


def split_microbatches(batch: dict[str, torch.Tensor], micro_batch_size: int) -> list[Microbatch]:
    n = next(iter(batch.values())).shape[0]
    if n % micro_batch_size:
        raise ValueError(f"batch of {n} rows does not split into micro-batches of {micro_batch_size}")
    return [{k: v[i : i + micro_batch_size] for k, v in batch.items()} for i in range(0, n, micro_batch_size)]


class Engine:
    """Model chunks of this rank (+ optimizer and scheduler when trainable)."""

    def __init__(self, model_cfg: ModelConfig, optim: Optional[OptimSettings] = None, sequence_parallel: bool = False,
                 init_weights: bool = True):
        """`init_weights=False`: skip the random initialisation (build_model's) because every
        weight is loaded next (import_hf_weights, load_checkpoint or load_state_from); call
        `optimizer.reload_model_params()` after loading, as for any load."""
        from megatron.core.distributed import DistributedDataParallelConfig, finalize_model_grads

        self.model_cfg = model_cfg
        self.trainable = optim is not None
        ddp = None
        if self.trainable:
            ddp = DistributedDataParallelConfig(
                grad_reduce_in_fp32=True,
                use_distributed_optimizer=optim.distributed_optimizer,
                overlap_grad_reduce=False,
            )
        self.chunks = build_model(model_cfg, sequence_parallel=sequence_parallel, wrap_ddp=self.trainable, ddp_config=ddp,
                                  init_weights=init_weights)
        self.config = unwrap(self.chunks[0]).config
        self.optimizer = self.scheduler = None
        if self.trainable:
            self.config.finalize_model_grads_func = finalize_model_grads
            self.config.no_sync_func = [c.no_sync for c in self.chunks]
            if len(self.chunks) == 1:
                self.config.no_sync_func = self.config.no_sync_func[0]
            self.optimizer, self.scheduler = self._build_optimizer(optim)
        else:
            for c in self.chunks:
                c.requires_grad_(False)
                c.eval()

    def _build_optimizer(self, o: OptimSettings):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        ocfg = OptimizerConfig(
            optimizer="adam",
            # the settings megatron-core's OptimizerConfig names as we do
            **{k: getattr(o, k) for k in ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                                          "clip_grad")},
            bf16=self.model_cfg.dtype == "bf16",
            fp16=self.model_cfg.dtype == "fp16",
            params_dtype=self.config.params_dtype,
            use_distributed_optimizer=o.distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(ocfg, self.chunks)
        decay_steps = max(o.total_steps, o.warmup_steps + 1)
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0 if o.warmup_steps else o.lr,
            max_lr=o.lr,
            min_lr=o.min_lr if o.decay != "constant" else o.lr,
            lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=decay_steps,
            lr_decay_style=o.decay,
            start_wd=o.weight_decay,
            end_wd=o.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )
        if o.warmup_steps:
            # mcore's schedule gives lr=init_lr=0 at step 0; Megatron-LM steps it after each
            # update, which would make the first update a no-op. Start at warmup step 1.
            scheduler.step(increment=1)
        return optimizer, scheduler

    # ------------------------------------------------------------------ schedules

    @staticmethod
    def _forward_step(loss_fn: LossFn, data_iterator, model):
        mb = next(data_iterator)
        packed = packed_seq_params(mb)  # None for padded rows; built on the host (max_seqlen)
        if torch.cuda.is_available():  # batches are built on the host
            mb = {k: v.cuda(non_blocking=True) for k, v in mb.items()}
            if packed is not None:
                packed.cu_seqlens_q = packed.cu_seqlens_kv = mb["cu_seqlens"].int()
        output = model(mb["tokens"], mb["position_ids"], attention_mask=None, packed_seq_params=packed)
        # The schedule calls this on the last stage only; `non_loss_data` marks collect mode.
        return output, lambda logits, non_loss_data=False: loss_fn(mb, logits)

    def run(
        self,
        microbatches: list[Microbatch],
        loss_fn: LossFn,
        forward_only: bool = False,
        collect: bool = False,
    ) -> list:
        """Run the pipeline schedule over this DP rank's micro-batches.

        Training (forward_only False): accumulates gradients for a following `step()` and returns
        the list of per-micro-batch metric dicts (last stage only; [] elsewhere).
        collect=True with forward_only: `loss_fn(mb, logits)` returns any per-micro-batch data
        (e.g. log-probs), collected on the last stage in order.
        """
        from megatron.core.pipeline_parallel import get_forward_backward_func

        if not microbatches:
            raise ValueError("no micro-batches to run")
        if not forward_only:
            for c in self.chunks:
                c.train()
                c.zero_grad_buffer()
            self.optimizer.zero_grad()
        else:
            for c in self.chunks:
                c.eval()
        shapes = {tuple(mb["tokens"].shape) for mb in microbatches}
        mbs, seq = max(shapes)
        # Shapes that differ within the step: send each activation's shape ahead of it (PP > 1)
        self.config.variable_seq_lengths = len(shapes) > 1
        iters = [iter(microbatches) for _ in self.chunks]
        fb = get_forward_backward_func()
        with torch.no_grad() if forward_only else contextlib.nullcontext():
            out = fb(
                forward_step_func=partial(self._forward_step, loss_fn),
                data_iterator=iters if len(iters) > 1 else iters[0],
                model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
                num_microbatches=len(microbatches),
                seq_length=seq,
                micro_batch_size=mbs,
                forward_only=forward_only,
                collect_non_loss_data=collect,
            )
        return out

    def step(self) -> dict[str, float]:
        """Optimizer step (+ LR schedule). Skips the update when the gradient is not finite."""
        ok, grad_norm, _ = self.optimizer.step()
        grad_norm = float(grad_norm) if grad_norm is not None else float("nan")
        if ok:
            self.scheduler.step(increment=1)
        return {"grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"], "update_ok": float(bool(ok))}

    def discard_grads(self) -> None:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()

    # ------------------------------------------------------------------ weights

    def load_state_from(self, other: "Engine") -> None:
        """Copy weights from another engine of the same layout (the frozen reference's start).

        Every parameter and buffer must come across (this engine may have skipped its
        initialisation): raises RuntimeError naming the missing or unexpected keys.
        """
        if len(self.chunks) != len(other.chunks):
            raise RuntimeError(f"load_state_from: {len(other.chunks)} model chunks into {len(self.chunks)}")
        for mine, theirs in zip(self.chunks, other.chunks):
            src = unwrap(theirs).state_dict()
            result = unwrap(mine).load_state_dict({k: v for k, v in src.items() if not k.endswith("_extra_state")},
                                                  strict=False)
            missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
            if missing or result.unexpected_keys:
                raise RuntimeError(f"load_state_from: missing keys {missing}, unexpected keys {result.unexpected_keys}")

    def offload(self, to_cpu: bool) -> None:
        """Move weights to CPU between uses (the frozen reference on GPU); a no-op on CPU."""
        if not torch.cuda.is_available():
            return
        device = "cpu" if to_cpu else torch.device("cuda", torch.cuda.current_device())
        for c in self.chunks:
            c.to(device)


def allreduce_metric_sums(per_microbatch: Iterable[dict]) -> dict:
    """Sum metric values (floats, or tensors such as [sum, count] pairs) over micro-batches,
    then over the whole world (only the last stage's TP rank 0 of each DP replica contributes),
    so every rank holds the global sums."""
    from megatron.core import parallel_state as mpu

    local: dict = {}
    for m in per_microbatch:
        for k, v in m.items():
            v = v.detach().double().cpu() if torch.is_tensor(v) else float(v)
            local[k] = local[k] + v if k in local else v
    contributes = mpu.is_pipeline_last_stage() and mpu.get_tensor_model_parallel_rank() == 0
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local if contributes else {})
    total: dict = {}
    for g in gathered:
        for k, v in g.items():
            total[k] = total[k] + v if k in total else v
    return total


def finite(x: float) -> bool:
    return not (math.isnan(x) or math.isinf(x))
