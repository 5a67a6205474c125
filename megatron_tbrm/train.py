"""The TBRM trainer: data -> rollout -> reward -> loss -> optimizer -> weight sync.

    torchrun --nproc-per-node N -m megatron_tbrm.train --config recipes/tiny_cpu.yaml [key.sub=value ...] [--resume]

Rank 0 owns the vLLM server, the rollouts and the rewards, and broadcasts each step's
trajectories; every rank runs the Megatron update at its TP/PP/DP position; after the
update the policy's weights go through the HF mapping table into the running server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import Config, ConfigError, load_config, validate

PAD_MULTIPLE = 8
# Fault injection (tests, docs/reliability.md): steps whose loss is made NaN, e.g. "2,3".
_INJECT_NAN_STEPS = {int(x) for x in os.environ.get("TBRM_INJECT_NAN_STEPS", "").split(",") if x.strip()}


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the last good state was saved."""


def trajectory_rows(trajs, answers: list[str], rewards: list[float], pad_id: int) -> tuple[list[dict], int]:
    """Token rows for the update: tokens = prompt + response, labels shifted left, the loss mask
    on positions that predict a response token, the sampler's log-probs at those positions.
    Rows with an empty response carry no residual and are dropped (counted)."""
    rows, dropped = [], 0
    for t, r in zip(trajs, rewards):
        p, a = list(t.prompt_token_ids), list(t.response_token_ids)
        if not a:
            dropped += 1
            continue
        tokens = p + a
        labels = tokens[1:] + [pad_id]
        start = len(p) - 1  # the last prompt position predicts a_1: V(s_1) is read here
        mask = [0.0] * len(tokens)
        old = [0.0] * len(tokens)
        for j in range(len(a)):
            mask[start + j] = 1.0
            if j < len(t.response_logprobs):
                old[start + j] = t.response_logprobs[j]
        rows.append({
            "tokens": tokens, "labels": labels, "loss_mask": mask, "old_logprobs": old,
            "rewards": float(r), "prompt_index": t.prompt_index,
        })
    return rows, dropped


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        from . import parallel
        from .data import load_tokenizer
        from .engine import Engine, OptimSettings
        from .hf_mapping import import_hf_weights
        from .model import ModelConfig

        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        par = cfg.parallel
        self.ps = parallel.init_distributed(tp=par.tp, pp=par.pp, vpp=par.vpp, cp=par.cp, seed=par.seed)
        self.is_main = self.ps.rank == 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

        m = cfg.model
        self.model_cfg = ModelConfig.from_hf(
            m.path, dtype=m.dtype, fp8=m.fp8, fp8_recipe=m.fp8_recipe, fp8_amax_history_len=m.fp8_amax_history_len,
            fp8_amax_compute_algo=m.fp8_amax_compute_algo, transformer_impl=m.transformer_impl,
            make_vocab_size_divisible_by=m.make_vocab_size_divisible_by, recompute=m.recompute,
        )
        o = cfg.optim
        self.policy = Engine(self.model_cfg, OptimSettings(
            lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps, decay=o.decay, total_steps=cfg.train.steps,
            weight_decay=o.weight_decay, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, adam_eps=o.adam_eps,
            clip_grad=o.clip_grad, distributed_optimizer=par.distributed_optimizer,
        ), sequence_parallel=par.sequence_parallel, init_weights=False)  # loaded from ref below
        # The frozen reference pi_ref is the initial model, also when resuming.
        self.ref = Engine(self.model_cfg, None, sequence_parallel=par.sequence_parallel, init_weights=False)
        if cfg.checkpoint.load:
            from .checkpoint import load_checkpoint

            load_checkpoint(cfg.checkpoint.load, self.ref.chunks, load_rng=False)
        else:
            import_hf_weights(self.ref.chunks, self.model_cfg, m.path, progress=self.is_main)
        self.policy.load_state_from(self.ref)
        self.policy.optimizer.reload_model_params()
        self.ref.offload(cfg.train.ref_offload)

        self.tokenizer = load_tokenizer(m.path)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        from .rollout.client import end_of_turn_token_ids

        r = cfg.rollout
        self.stop_token_ids = r.stop_token_ids if r.stop_token_ids is not None else end_of_turn_token_ids(self.tokenizer)
        self._load_data()

        self.step = 0
        self.v_offset = 0.0
        self.bad_steps = 0
        self.server_failures = 0
        self._last_server_failure: tuple[int, Optional[str]] | None = None
        if resume:
            self._resume()

        self.server = self.client = self.sync = self.scorer = None
        self.writer = None
        self.metrics_file = None
        self.t_start = time.time()

    # ------------------------------------------------------------------ lifecycle

    def _load_data(self) -> None:
        """Only rank 0 reads, templates and tokenizes the prompts (and the evaluation set): it
        samples every step and broadcasts the step's rows. The other ranks hold a
        MirroredSampler with rank 0's sampler state (sent here, then with every step), so a
        checkpoint records rank 0's position from any rank. A loading error on rank 0 reaches
        every rank (no rank is left waiting in the broadcast)."""
        from .data import MirroredSampler, PromptDataset, PromptSampler, load_eval_items

        cfg, d = self.cfg, self.cfg.data
        self.dataset = None
        self.eval_items = None
        msg: list[Any] = [None]
        if self.is_main:
            try:
                self.dataset = PromptDataset(d.train_path, self.tokenizer, d.prompt_key, d.answer_key, d.system_prompt,
                                             d.max_prompt_tokens, d.strict, strip_instruction=d.strip_instruction,
                                             dedupe=d.dedupe)
                self.sampler = PromptSampler(self.dataset, cfg.train.prompts_per_step, seed=d.seed, shuffle=d.shuffle)
                if cfg.eval.every and (cfg.eval.path or d.eval_path):
                    items = load_eval_items(cfg.eval.path or d.eval_path, self.tokenizer, cfg.eval.prompt_key,
                                            cfg.eval.answer_key, d.system_prompt)
                    fit = [it for it in items if len(it.prompt_ids) <= d.max_prompt_tokens]
                    if len(fit) < len(items):
                        print(f"[train] eval: skipped {len(items) - len(fit)} prompts longer than "
                              f"data.max_prompt_tokens={d.max_prompt_tokens}", file=sys.stderr, flush=True)
                    self.eval_items = fit[: cfg.eval.max_problems]
            except Exception as e:
                dist.broadcast_object_list([("error", f"{type(e).__name__}: {e}")], src=0)
                raise
            st = self.dataset.stats
            stats = {"data_rows": float(st.rows), "data_rows_skipped": float(st.bad),
                     "data_rows_duplicate": float(st.duplicates), "data_prompts_too_long": float(st.too_long),
                     "data_prompts": float(len(self.dataset))}
            print(f"[train] data: {st.rows} rows -> {len(self.dataset)} prompts ({st.duplicates} duplicates dropped, "
                  f"{st.bad} bad rows, {st.too_long} too long, {st.instruction_stripped} instructions stripped)",
                  flush=True)
            msg = [("ok", (self.sampler.state_dict(), stats))]
        dist.broadcast_object_list(msg, src=0)
        status, payload = msg[0]
        if status == "error":
            raise RuntimeError(f"rank 0 could not load the data: {payload}")
        sampler_state, self.data_stats = payload
        if not self.is_main:
            self.sampler = MirroredSampler(sampler_state)

    def _resume(self) -> None:
        from .checkpoint import latest_checkpoint, load_checkpoint

        if latest_checkpoint(self.ckpt_dir) is None:
            if self.is_main:
                print(f"[train] --resume: no checkpoint in {self.ckpt_dir}, starting from step 0", flush=True)
            return
        state = load_checkpoint(self.ckpt_dir, self.policy.chunks, self.policy.optimizer, self.policy.scheduler)
        extra = state["extra"]
        self.step = state["iteration"]
        self.sampler.load_state_dict(extra["sampler"])
        self.v_offset = float(extra.get("v_offset", 0.0))
        if self.is_main:
            print(f"[train] resumed from {state['path']} at step {self.step}", flush=True)

    def _start_rollout(self) -> None:
        """Rank 0: start (or attach to) the vLLM server, the client, the weight sync, the scorer."""
        from .reward import RewardScorer
        from .rollout.client import RolloutClient
        from .rollout.server import VLLMServer
        from .weight_sync import WeightSync

        r = self.cfg.rollout
        if r.server_url:
            self.server = VLLMServer.attach(r.server_url)
        else:
            dtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[r.dtype or self.cfg.model.dtype] \
                if (r.dtype or self.cfg.model.dtype) in ("fp32", "bf16", "fp16") else r.dtype
            extra = list(r.extra_args)
            if torch.cuda.is_available() and r.kv_cache_bytes is None:
                extra += ["--gpu-memory-utilization", str(r.gpu_memory_utilization)]
            self.server = VLLMServer(
                self.cfg.model.path, host=r.host, port=r.port or None, dtype=dtype,
                max_model_len=r.max_model_len, kv_cache_bytes=r.kv_cache_bytes, max_num_seqs=r.max_num_seqs,
                tensor_parallel_size=r.tensor_parallel_size, seed=self.cfg.parallel.seed, extra_args=extra,
                work_dir=self.run_dir / "vllm",
            )
            print(f"[train] starting vLLM server on {self.server.url} (log: {self.server.log_path})", flush=True)
            self.server.start()
            self.server.wait_healthy(r.startup_timeout_s)
        self.client = RolloutClient.for_server(self.server, max_concurrency=r.max_concurrency, timeout=r.request_timeout_s)
        self.sync = WeightSync(self.server, transport=r.weight_sync.transport, bucket_bytes=r.weight_sync.bucket_mb * 2**20)
        self._connect_sync()
        self.scorer = RewardScorer(self.cfg.reward.name, timeout_s=self.cfg.reward.timeout_s, num_workers=self.cfg.reward.workers)

    def _connect_sync(self) -> None:
        """Rank 0, collective transports: (re)make the broadcast group with the server's
        workers; needed once per server process (a restarted server has new workers)."""
        from .weight_sync import COLLECTIVE

        ws = self.cfg.rollout.weight_sync
        if ws.transport not in COLLECTIVE:
            return
        import socket

        address = ws.master_address or ("127.0.0.1" if not self.cfg.rollout.server_url
                                        else socket.gethostbyname(socket.gethostname()))
        self.sync.connect(address, ws.master_port, timeout_s=self.cfg.rollout.startup_timeout_s)

    def _open_logs(self) -> None:
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        if self.cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                print("[train] tensorboard not installed: no TensorBoard scalars", file=sys.stderr)

    def close(self) -> None:
        if self.sync is not None:
            self.sync.close()
        if self.scorer is not None:
            self.scorer.close()
        if self.server is not None:
            self.server.stop()
        if self.writer is not None:
            self.writer.close()
        if self.metrics_file is not None:
            self.metrics_file.close()

    # ------------------------------------------------------------------ one step

    def _rollout(self) -> tuple[list[dict], dict]:
        """Rank 0: prompts -> trajectories -> rewards -> rows."""
        from .reward import no_answer_warning

        r = self.cfg.rollout
        prompts = self.sampler.next_batch()
        t0 = time.perf_counter()
        trajs = self.client.generate(
            [p.prompt_ids for p in prompts], n=r.n, temperature=r.temperature, top_p=r.top_p,
            max_tokens=r.max_tokens, stop=r.stop or None, seed=self.cfg.parallel.seed * 1_000_003 + self.step * 10_007,
            stop_token_ids=self.stop_token_ids, progress=False,
        )
        t_gen = time.perf_counter() - t0
        answers = [prompts[t.prompt_index].answer for t in trajs]
        rewards, rstats = self.scorer.score_batch([t.text for t in trajs], answers)
        rows, dropped = trajectory_rows(trajs, answers, rewards, self.pad_id)
        info = {
            "rollout_s": t_gen,
            "response_tokens": float(sum(len(t.response_token_ids) for t in trajs)),
            "dropped_empty": float(dropped),
            "truncated_frac": sum(t.finish_reason == "length" for t in trajs) / max(len(trajs), 1),
            "reward_timeouts": float(rstats.get("timeouts", 0)),
            "reward_errors": float(rstats.get("errors", 0)),
            # Responses with no final answer the reward can read (they all score 0).
            "no_answer_frac": float(rstats.get("no_answer_frac", float("nan"))),
        }
        warning = no_answer_warning(info["no_answer_frac"], info["truncated_frac"], self.step, r.max_tokens)
        if warning:
            print(f"[train] WARNING: {warning}", file=sys.stderr, flush=True)
        return rows, info

    def _rollout_or_restart(self) -> tuple:
        """Rank 0: ("ok", rows, info, sampler state), or ("restart",) after the server died and
        was restarted (the batch is put back, to be redone). Repeated failures raise with the
        server's log."""
        from .rollout.server import RolloutServerError

        before = self.sampler.state_dict()
        try:
            rows, info = self._rollout()
        except RolloutServerError as e:
            self.server_failures += 1
            limit = self.cfg.rollout.max_restarts
            if self.cfg.rollout.server_url or self.server_failures > limit:
                raise RolloutServerError(f"rollout failed at step {self.step} ({self.server_failures} failure(s) in a row, "
                                         f"rollout.max_restarts={limit}): {e}") from None
            # The batch is redone with the same prompts and seeds: the same error again means
            # it is deterministic and more restarts would only repeat it.
            failure = (self.step, self.server.root_cause())
            if failure[1] is not None and failure == self._last_server_failure:
                raise RolloutServerError(
                    f"rollout failed at step {self.step} again after a restart, with the same error: {failure[1]} "
                    f"(deterministic: the batch is redone with the same prompts and seeds; not restarting again): {e}"
                ) from None
            self._last_server_failure = failure
            print(f"[train] rollout server failed at step {self.step}: {str(e).splitlines()[0]} "
                  f"(root cause in its log: {failure[1] or 'none found'}); restarting it "
                  f"({self.server_failures}/{limit}) and redoing the batch", file=sys.stderr, flush=True)
            self.sampler.load_state_dict(before)
            self.server.stop()
            self.server.start()
            self.server.wait_healthy(self.cfg.rollout.startup_timeout_s)
            self._connect_sync()
            return ("restart",)
        self.server_failures = 0
        if self.cfg.loss.name == "grpo":
            from .loss import grpo_advantages_by_prompt

            rewards = torch.tensor([r["rewards"] for r in rows])
            # Groups are the samples of one prompt, always (published GRPO: per-group mean and
            # std); a dropped empty response only shrinks its own group.
            adv = grpo_advantages_by_prompt(rewards, [r["prompt_index"] for r in rows])
            for r, a in zip(rows, adv.tolist()):
                r["advantages"] = a
        return ("ok", rows, info, self.sampler.state_dict())

    def _shard_rows(self, rows: list[dict]) -> list[dict]:
        """Keep a multiple of DP x micro-batch rows (dropping from the end), take this DP rank's."""
        unit = self.ps.dp_size * self.cfg.train.micro_batch_size
        keep = len(rows) // unit * unit
        if keep == 0:
            return []
        per = keep // self.ps.dp_size
        return rows[self.ps.dp_rank * per : (self.ps.dp_rank + 1) * per]

    def _loss_fn(self):
        from megatron.core import parallel_state as mpu

        from .loss import grpo_loss_sums, tbrm_loss_sums
        from .vocab_parallel import vocab_parallel_logprob

        tp_group = mpu.get_tensor_model_parallel_group() if self.ps.tp_size > 1 else None
        vocab = self.model_cfg.vocab_size
        lc = self.cfg.loss

        def fn(mb, logits):
            if lc.name == "tbrm":
                loss_sum, count, sums = tbrm_loss_sums(
                    logits, mb["labels"], mb["ref_logprobs"], mb["rewards"],
                    mb["loss_mask"], lc.beta, vocab_size=vocab, tp_group=tp_group, v_offset=self.v_offset,
                )
            else:
                loss_sum, count, sums = grpo_loss_sums(
                    logits, mb["labels"], mb["old_logprobs"], mb["ref_logprobs"], mb["advantages"], mb["loss_mask"],
                    clip_eps=lc.clip_eps, kl_coef=lc.kl_coef, aggregation=lc.aggregation, vocab_size=vocab,
                    tp_group=tp_group,
                )
                sums["reward_mean"] = torch.tensor([mb["rewards"].sum().item(), mb["rewards"].numel()], dtype=torch.float64)
            # Train/rollout consistency: |log pi_sampler - log pi_trainer| on the same tokens,
            # before this step's update (the weights the server sampled with).
            with torch.no_grad():
                lp, _ = vocab_parallel_logprob(logits.detach(), mb["labels"], vocab, tp_group, mask=mb["loss_mask"].bool())
            mask = mb["loss_mask"]
            gap = ((lp - mb["old_logprobs"]).abs() * mask).sum()
            sums["logprob_gap"] = torch.stack([gap.double(), mask.sum().double()])
            if self.step + 1 in _INJECT_NAN_STEPS:  # fault injection for the reliability tests
                loss_sum = loss_sum * float("nan")
            sums["loss"] = torch.stack([loss_sum.detach().double(), count.double()])
            return loss_sum, count, sums

        return fn

    def _ref_logprobs(self, microbatches: list[dict]) -> None:
        """Frozen-reference log-probs of the labels, attached to each micro-batch (last stage)."""
        from megatron.core import parallel_state as mpu

        from .vocab_parallel import vocab_parallel_logprob

        tp_group = mpu.get_tensor_model_parallel_group() if self.ps.tp_size > 1 else None
        vocab = self.model_cfg.vocab_size

        def collect(mb, logits):
            lp, _ = vocab_parallel_logprob(logits, mb["labels"], vocab, tp_group, mask=mb["loss_mask"].bool())
            return lp

        self.ref.offload(False)
        out = self.ref.run(microbatches, collect, forward_only=True, collect=True)
        self.ref.offload(self.cfg.train.ref_offload)
        if self.ps.is_last_stage:
            for mb, lp in zip(microbatches, out):
                mb["ref_logprobs"] = lp.float()

    def _calibrate_value_offset(self, microbatches: list[dict]) -> None:
        """model.value_offset: shift V(s_1) by a constant (a uniform output bias: the policy is
        unchanged) so that the base model's mean V(s_1) equals the first batch's mean target
        r/beta. Otherwise the first updates spend themselves moving V by up to r/beta through
        the first response token's logit, which disturbs the policy (shared/notes/tbrm.md saw
        collapses from a V far from r/beta)."""
        from megatron.core import parallel_state as mpu

        from .engine import reduce_metrics
        from .vocab_parallel import vocab_parallel_logprob

        tp_group = mpu.get_tensor_model_parallel_group() if self.ps.tp_size > 1 else None

        def collect(mb, logits):
            _, lse = vocab_parallel_logprob(logits, mb["labels"], self.model_cfg.vocab_size, tp_group,
                                            mask=mb["loss_mask"].bool())
            first = mb["loss_mask"].argmax(dim=1)
            v = lse.gather(1, first.unsqueeze(1)).squeeze(1)
            n = torch.tensor(float(v.numel()), dtype=torch.float64)
            return {"v": torch.stack([v.sum().double(), n]),
                    "target": torch.stack([mb["rewards"].sum().double() / self.cfg.loss.beta, n])}

        out = self.ref.run(microbatches, collect, forward_only=True, collect=True)
        sums = reduce_metrics(out if self.ps.is_last_stage else [])
        v_mean = float(sums["v"][0] / sums["v"][1])
        target = float(sums["target"][0] / sums["target"][1])
        self.v_offset = v_mean - target
        if self.is_main:
            print(f"[train] value offset {self.v_offset:.3f}: base mean V(s_1) {v_mean:.3f} -> mean r/beta "
                  f"{target:.3f} of the first batch", flush=True)

    def train_step(self) -> Optional[dict]:
        from .engine import finite, pad_batch, reduce_metrics, split_microbatches
        from .loss import reduce_metrics as to_means

        cfg = self.cfg
        t0 = time.perf_counter()
        while True:
            payload: list[Any] = [None]
            if self.is_main:
                payload = [self._rollout_or_restart()]
            dist.broadcast_object_list(payload, src=0)
            if payload[0][0] == "ok":
                break
            # The server was restarted from the HF folder: every rank takes part in pushing the
            # current policy back in, then the same batch is rolled out again.
            self.push_weights()
        _, rows, info, sampler_state = payload[0]
        if not self.is_main:
            self.sampler.load_state_dict(sampler_state)
        mine = self._shard_rows(rows)
        if not mine:
            raise TrainingStopped(f"step {self.step}: too few non-empty trajectories ({len(rows)}) for one micro-batch per DP rank")
        for r in mine:
            r.pop("prompt_index")
        batch = pad_batch(mine, self.pad_id, PAD_MULTIPLE)
        # One sequence length for the whole step: pipeline stages exchange fixed shapes.
        seq = max(len(r["tokens"]) for r in rows)
        seq = -(-seq // PAD_MULTIPLE) * PAD_MULTIPLE
        if batch["tokens"].shape[1] < seq:
            pad = seq - batch["tokens"].shape[1]
            batch = {k: torch.nn.functional.pad(v, (0, pad), value=self.pad_id if k in ("tokens", "labels") else 0)
                     if v.dim() == 2 else v for k, v in batch.items()}
            batch["position_ids"] = torch.arange(seq).unsqueeze(0).expand(len(mine), -1).contiguous()
        mbs = split_microbatches(batch, cfg.train.micro_batch_size)

        if cfg.model.value_offset and self.step == 0 and self.v_offset == 0.0:
            self._calibrate_value_offset(mbs)
        t_ref = time.perf_counter()
        self._ref_logprobs(mbs)
        t_train = time.perf_counter()
        out = self.policy.run(mbs, self._loss_fn())
        metrics = to_means(reduce_metrics(out if self.ps.is_last_stage else []))
        n_items = float(sum(mb["loss_mask"].shape[0] for mb in mbs) * self.ps.dp_size)
        if not finite(metrics["loss"]):
            self.policy.discard_grads()
            self.bad_steps += 1
            metrics.update(update_ok=0.0, grad_norm=float("nan"))
            if self.bad_steps >= cfg.train.max_bad_steps:
                self.save()
                raise TrainingStopped(
                    f"{self.bad_steps} non-finite losses in a row (step {self.step}); saved the last good state to {self.ckpt_dir}"
                )
        else:
            self.bad_steps = 0
            metrics.update(self.policy.step())
        t_sync = time.perf_counter()
        sync_metrics = self.push_weights()
        t_end = time.perf_counter()
        self.step += 1
        metrics.update(info)
        metrics.update(
            step=self.step, trajectories=n_items, sync_s=sync_metrics.get("duration_s", t_end - t_sync),
            ref_s=t_train - t_ref, train_s=t_sync - t_train, step_s=t_end - t0,
            tokens_per_s=info["response_tokens"] / max(t_end - t0, 1e-9), wall_time=time.time() - self.t_start,
            bad_steps=float(self.bad_steps), server_restarts_in_a_row=float(self.server_failures),
            **self.data_stats,
        )
        return metrics

    def push_weights(self) -> dict:
        from .hf_mapping import export_hf_weights

        named = export_hf_weights(self.policy.chunks, self.model_cfg)
        if self.is_main:
            from .rollout.server import RolloutServerError

            try:
                return self.sync.push(named)
            except RolloutServerError as e:
                if self.cfg.rollout.server_url or not self.server.dies_within(10.0):
                    raise
                # Our server died during the push: the next rollout finds it dead, restarts it and
                # pushes these weights again. Finish the export: the other ranks are in its gathers.
                print(f"[train] weight push failed, the server is dead: {str(e).splitlines()[0]}",
                      file=sys.stderr, flush=True)
                for _ in named:
                    pass
                return {}
        for _ in named:  # every rank takes part in the gathers
            pass
        return {}

    def save(self) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(
            self.ckpt_dir, self.step, self.policy.chunks, self.policy.optimizer, self.policy.scheduler,
            extra={"sampler": self.sampler.state_dict(), "v_offset": self.v_offset, "step": self.step},
            hf_dir=self.cfg.model.path, keep_last=self.cfg.checkpoint.keep_last,
        )

    def evaluate(self) -> dict:
        from .eval import evaluate

        e = self.cfg.eval
        res = evaluate(self.client, self.eval_items, self.scorer, k=1, temperature=e.temperature,
                       max_tokens=e.max_tokens, seed=self.cfg.parallel.seed, progress=False,
                       stop_token_ids=self.stop_token_ids)
        return {"eval_accuracy": res["avg_at_k"], "eval_response_tokens": res["mean_response_tokens"]}

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        if self.is_main:
            self._start_rollout()
            self._open_logs()
        # A server we started holds model.path's weights; after a resume, a loaded checkpoint, or
        # when attached to someone's server, give it the current policy first.
        attached = bool(cfg.rollout.server_url)
        if self.step > 0 or cfg.checkpoint.load or attached:
            self.push_weights()
        bar = tqdm(total=cfg.train.steps, initial=self.step, desc="tbrm" if cfg.loss.name == "tbrm" else "grpo",
                   disable=not (self.is_main and cfg.run.progress), dynamic_ncols=True)
        last: dict = {}
        if self.eval_items and self.step == 0 and self.is_main:
            self._log({"step": 0, "wall_time": 0.0, **self.evaluate()})
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            if self.eval_items and self.is_main and self.step % cfg.eval.every == 0:
                metrics.update(self.evaluate())
            if self.is_main:
                self._log(metrics)
                bar.set_postfix(reward=f"{metrics.get('reward_mean', float('nan')):.3f}",
                                loss=f"{metrics['loss']:.4g}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                bar.update(1)
            last = metrics
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0 and self.step < cfg.train.steps:
                self.save()
        bar.close()
        self.save()
        if self.is_main:
            self.metrics_file.flush()
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")
        return last

    def _log(self, metrics: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        self.metrics_file.write(json.dumps(clean) + "\n")
        self.metrics_file.flush()
        if self.writer is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self.writer.add_scalar(k, v, metrics["step"])


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    """Reward, loss (and eval accuracy when logged) against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    panels = [k for k in ("reward_mean", "loss", "eval_accuracy") if any(r.get(k) is not None for r in rows)]
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5))
    for ax, key in zip(axes if len(panels) > 1 else [axes], panels):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key == "eval_accuracy" else None, ms=3)
        ax.set_xlabel("step")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m megatron_tbrm.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of checkpoint.dir")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg)  # before any process-group work
    except (ConfigError, ValueError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from .parallel import destroy_distributed

    trainer = None
    ok = False
    try:
        trainer = Trainer(cfg, resume=args.resume)
        trainer.fit()
        ok = True
    except BaseException:
        rank = os.environ.get("RANK", "0")
        print(f"[train] rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed(barrier=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
