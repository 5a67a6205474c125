"""The trainer: data -> rollout -> reward -> reference -> update -> weight sync.

    torchrun --nproc-per-node N -m megatron_tbrm.train --config recipes/tiny_cpu.yaml [key.sub=value ...] [--resume]

Rank 0 owns the vLLM server, the rollouts and the rewards (rollout/manager.py) and
broadcasts each step's `RolloutBatch`; every rank runs the reference forward and the Megatron
update at its TP/PP/DP position with the objective named by `loss.name` (algorithms.py);
after the update the policy's weights go through the HF mapping table into the running server.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from .config import Config, ConfigError, load_config, validate
from .log import get_logger, progress_bar, setup_logging

log = get_logger(__name__)


class TrainingStopped(RuntimeError):
    """The run cannot continue (e.g. repeated non-finite losses); the last good state was saved."""


class Trainer:
    def __init__(self, cfg: Config, resume: bool = False):
        from megatron.core import parallel_state as mpu

        from . import parallel
        from .algorithms import make_algorithm
        from .data import load_tokenizer
        from .engine import Engine, OptimSettings
        from .hf_mapping import import_hf_weights
        from .model import ModelConfig
        from .rollout.client import end_of_turn_token_ids

        self.cfg = cfg
        self.run_dir = Path(cfg.run.dir)
        self.ckpt_dir = Path(cfg.checkpoint.dir or self.run_dir / "checkpoints")
        par, m = cfg.parallel, cfg.model
        self.ps = parallel.init_distributed(tp=par.tp, pp=par.pp, vpp=par.vpp, cp=par.cp, seed=par.seed)
        self.is_main = self.ps.rank == 0
        if self.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))

        self.model_cfg = ModelConfig.from_section(m)
        optim = OptimSettings.from_section(cfg.optim, total_steps=cfg.train.steps,
                                           distributed_optimizer=par.distributed_optimizer)
        # Both engines skip the random init: the reference is loaded next, the policy copies it.
        self.policy = Engine(self.model_cfg, optim, sequence_parallel=par.sequence_parallel, init_weights=False)
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

        tp_group = mpu.get_tensor_model_parallel_group() if self.ps.tp_size > 1 else None
        self.tp_group = tp_group
        self.algorithm = make_algorithm(cfg.loss, self.model_cfg.vocab_size, tp_group, value_offset=m.value_offset)
        self.tokenizer = load_tokenizer(m.path)
        tok = self.tokenizer
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        r = cfg.rollout
        eot = end_of_turn_token_ids(tok)
        self.stop_token_ids = r.stop_token_ids if r.stop_token_ids is not None else eot
        self.eot_id = eot[0] if eot else tok.eos_token_id
        self._load_data()

        self.step = 0
        self.bad_steps = 0
        if resume:
            self._resume()
        self.rollout = None  # RolloutManager, rank 0, from fit() (None: trajectory files only)
        self.ahead = None  # RolloutsAhead, rank 0, with train.max_staleness > 0
        self.tracking = None
        self.t_start = time.time()

    # ------------------------------------------------------------------ lifecycle

    def _load_data(self) -> None:
        """Rank 0 loads the data and samples every step (data.load_on_rank0); the other ranks
        mirror its sampler state, so a checkpoint records rank 0's position from any rank."""
        from .data import MirroredSampler, load_on_rank0

        self.data, loaded = load_on_rank0(self.cfg, self.tokenizer, self.pad_id, self.eot_id, self.is_main)
        self.data_stats = loaded.stats
        self.sampler = self.data.sampler if self.is_main and self.data.sampler else MirroredSampler(loaded.sampler_state or None)
        self.eval_items = self.data.eval_items if self.is_main else None
        self.replay = None  # data.replay's buffer, rank 0
        self.replay_pending: list = []  # rank 0: this step's fresh samples, kept once its update went through
        r = self.cfg.data.replay
        if self.is_main and r.per_step:
            from .data.replay import ReplayBuffer

            self.replay = ReplayBuffer(r.size, r.per_step, r.successes_only, seed=self.cfg.data.seed)
        # The data position of the last TRAINED batch, saved in checkpoints (rank 0's samplers
        # run ahead of it with overlapped rollouts).
        self.position = {"sampler": loaded.sampler_state, "trajectory_sampler": loaded.trajectory_sampler_state}

    def _resume(self) -> None:
        from .checkpoint import latest_checkpoint, load_checkpoint

        if latest_checkpoint(self.ckpt_dir) is None:
            log.info(f"--resume: no checkpoint in {self.ckpt_dir}, starting from step 0")
            return
        state = load_checkpoint(self.ckpt_dir, self.policy.chunks, self.policy.optimizer, self.policy.scheduler)
        extra = state["extra"]
        self.step = state["iteration"]
        if extra["sampler"]:
            self.sampler.load_state_dict(extra["sampler"])
        self.position = {"sampler": extra["sampler"], "trajectory_sampler": extra.get("trajectory_sampler")}
        if self.is_main and self.data.trajectory_sampler is not None and extra.get("trajectory_sampler"):
            self.data.trajectory_sampler.load_state_dict(extra["trajectory_sampler"])
        self.algorithm.load_state_dict(extra)
        if self.is_main:
            self._resume_replay(state["path"])
        log.info(f"resumed from {state['path']} at step {self.step}")

    def _resume_replay(self, path: str) -> None:
        """Rank 0: the replay buffer and its generator from the checkpoint; a checkpoint saved
        with replay off, or replay off now, is said (the run goes on)."""
        from .checkpoint import load_rank0_file

        saved = load_rank0_file(path, "replay")
        if self.replay is not None and saved is not None:
            self.replay.load_state_dict(saved)
        elif self.replay is not None:
            log.warning(f"data.replay is on but {path} holds no replay buffer (saved with replay off): "
                        "the buffer starts empty")
        elif saved is not None:
            log.warning(f"{path} holds a replay buffer of {len(saved['samples'])} trajectories but "
                        "data.replay.per_step=0: it is not used")

    def close(self) -> None:
        if self.ahead is not None:
            self.ahead.close()
        if self.rollout is not None:
            self.rollout.close()
        if self.tracking is not None:
            self.tracking.close()

    # ------------------------------------------------------------------ one step

    def train_step(self) -> dict:
        """One step: rollout + reward (rank 0, broadcast) -> reference log-probs -> update ->
        weight push. Returns the step's metrics (global means)."""
        from .rollout.batch import ServerRestarted

        t0 = time.perf_counter()
        batch = self._broadcast_rollout()
        while isinstance(batch, ServerRestarted):  # give the restarted server the policy, redo
            self.push_weights(self.step)
            batch = self._broadcast_rollout()
        if not self.is_main and batch.sampler_state:
            self.sampler.load_state_dict(batch.sampler_state)
        self.position = {"sampler": batch.sampler_state, "trajectory_sampler": batch.trajectory_sampler_state}
        step_mbs = self._microbatches(batch)
        mbs = step_mbs.microbatches
        if self.step == 0:
            self.algorithm.on_first_batch(self.ref, mbs, self.ps)
        t_ref = time.perf_counter()
        computed = self._attach_ref_logprobs(mbs)
        ref_reused = self._share_ref_logprobs(step_mbs, computed, batch.samples)
        t_train = time.perf_counter()
        metrics = self._update(mbs)
        t_sync = time.perf_counter()
        sync = self.push_weights(self.step + 1)
        t_end = time.perf_counter()
        metrics.update(batch.metrics)
        if ref_reused is not None:
            metrics["ref_reused"] = ref_reused
        if "replay_samples" in batch.metrics:  # trained ones: replayed samples are last, dropped first
            dropped = len(batch.samples) - step_mbs.trajectories
            metrics["replay_samples"] = max(0.0, batch.metrics["replay_samples"] - dropped)
        if self.replay is not None and metrics.get("update_ok") == 1.0:  # rank 0; updated steps only
            self.replay.add(self.replay_pending)
            metrics["replay_buffer"] = float(len(self.replay))
        self.step += 1
        rollout_failures = float(self.rollout.failures) if self.rollout is not None else 0.0
        metrics.update(
            step=self.step, trajectories=float(step_mbs.trajectories), real_token_fraction=step_mbs.real_token_fraction,
            sync_s=sync.get("duration_s", t_end - t_sync), ref_s=t_train - t_ref, train_s=t_sync - t_train,
            step_s=t_end - t0, tokens_per_s=batch.metrics["response_tokens"] / max(t_end - t0, 1e-9),
            wall_time=time.time() - self.t_start, bad_steps=float(self.bad_steps),
            server_restarts_in_a_row=rollout_failures, **self.data_stats,
        )
        return metrics

    def _broadcast_rollout(self):
        payload: list[Any] = [None]
        if self.is_main:
            payload = [self._next_batch()]
        dist.broadcast_object_list(payload, src=0)
        return payload[0]

    def _next_batch(self):
        """Rank 0: this step's fresh rollouts (synchronous or made ahead), plus its share of
        trajectory-file samples (data.trajectories) and its replayed ones (data.replay, drawn
        from earlier steps); or ServerRestarted."""
        from .rollout.batch import RolloutBatch

        if self.ahead is not None:
            batch, waited, idle = self.ahead.get(self.step)
            if isinstance(batch, RolloutBatch):
                batch.metrics.update(trainer_idle_s=waited, rollout_idle_s=idle)
        elif self.rollout is not None:
            batch = self.rollout.rollout(self.sampler, self.step, self.algorithm)
        else:
            batch = RolloutBatch([], {"rollout_s": 0.0, "response_tokens": 0.0}, sampler_state=self.position["sampler"])
        if not isinstance(batch, RolloutBatch):
            return batch
        fresh = list(batch.samples)
        if fresh:
            # The policy's own reward: `reward_mean` (from the loss) is over every trained sample,
            # trajectory-file and replayed samples included.
            batch.metrics["rollout_reward_mean"] = sum(s.reward for s in fresh) / len(fresh)
            batch.metrics.update(self._staleness(fresh))
        ts = self.data.trajectory_sampler
        if ts is not None:
            drawn = [dataclasses.replace(s) for s in ts.next_batch()]
            batch.samples += drawn
            batch.trajectory_sampler_state = ts.state_dict()
            batch.metrics.update(trajectory_samples=float(len(drawn)),
                                 trajectory_reward_mean=sum(s.reward for s in drawn) / len(drawn))
        if self.replay is not None:  # from earlier steps; this step's join after its update
            # more than per_step where that fills the last micro-batch (an empty response dropped)
            replayed = self.replay.draw(extra=(-(len(batch.samples) + self.replay.per_step)) % self._row_unit())
            batch.samples += replayed
            batch.metrics["replay_samples"] = float(len(replayed))
            if replayed:
                batch.metrics.update({f"replay_{k}": v for k, v in self._staleness(replayed).items()})
            self.replay_pending = fresh
        return batch

    def _row_unit(self) -> int:
        """Trajectories per step are trained in multiples of this (microbatches.py: fixed rows
        drop the rest; 1 under a token budget, which keeps every trajectory)."""
        t, par = self.cfg.train, self.cfg.parallel
        if t.max_tokens_per_microbatch is not None:
            return 1
        return self.ps.dp_size * t.micro_batch_size * (par.pp if par.vpp else 1)

    def _staleness(self, samples: list) -> dict:
        """How many updates older than the policy this step trains the samples' weights are."""
        versions = [s.policy_version for s in samples if s.policy_version >= 0]
        if not versions:
            return {}
        return {"staleness_mean": self.step - sum(versions) / len(versions),
                "staleness_max": float(self.step - min(versions))}

    def _microbatches(self, batch):
        """This DP rank's micro-batches of the step (microbatches.py: fixed rows, or under
        train.max_tokens_per_microbatch, packed with train.pack_sequences)."""
        from .microbatches import build_microbatches

        t, par = self.cfg.train, self.cfg.parallel
        try:
            return build_microbatches(batch.samples, self.pad_id, self.step, self.ps.dp_size, self.ps.dp_rank,
                                      t.micro_batch_size, t.max_tokens_per_microbatch, t.pack_sequences,
                                      multiple=par.pp if par.vpp else 1)
        except ValueError as e:
            raise TrainingStopped(f"step {self.step}: too few non-empty trajectories: {e}") from None

    def _attach_ref_logprobs(self, microbatches: list[dict]) -> list[int]:
        """Frozen-reference log-probs of the labels, as mb["ref_logprobs"] (last stage), for the
        micro-batches that do not carry them yet (those whose every trajectory is a replayed one
        with its reference log-probs from an earlier step: rollout.batch.collate). Returns the
        positions of the micro-batches it computed."""
        from .vocab_parallel import vocab_parallel_logprob

        def collect(mb, logits):
            lp, _ = vocab_parallel_logprob(logits, mb["labels"], self.model_cfg.vocab_size, self.tp_group,
                                           mask=mb["loss_mask"].bool())
            return lp

        todo = [j for j, mb in enumerate(microbatches) if "ref_logprobs" not in mb]  # the same on every stage
        if not todo:
            return todo
        self.ref.offload(False)
        out = self.ref.run([microbatches[j] for j in todo], collect, forward_only=True, collect=True)
        self.ref.offload(self.cfg.train.ref_offload)
        if self.ps.is_last_stage:
            for j, lp in zip(todo, out):
                microbatches[j]["ref_logprobs"] = lp.float()
        return todo

    def _share_ref_logprobs(self, step_mbs, computed: list[int], samples: list) -> Optional[float]:
        """With data.replay: the reference log-probs computed this step go to rank 0, which keeps
        them on its samples (replay.add stores them with this step's fresh ones), so a replayed
        trajectory needs no reference forward again (exact: pi_ref is frozen). Returns, on rank
        0, the fraction of the step's trained trajectories that reused them (None elsewhere and
        without replay). Every rank takes part (one gather_object of lists of floats)."""
        if not self.cfg.data.replay.per_step or self.ps.cp_size > 1:  # (context parallel: partial rows)
            return None
        from .microbatches import per_trajectory

        mine: dict[int, list[float]] = {}
        if self.ps.is_last_stage and self.ps.tp_rank == 0:
            for j in computed:
                mb, idx = step_mbs.microbatches[j], step_mbs.indices[j]
                values = per_trajectory(mb["ref_logprobs"] * mb["loss_mask"], mb, [len(samples[i].tokens) for i in idx])
                mine.update(zip(idx, values))
        gathered: list = [None] * self.ps.world_size if self.is_main else []
        dist.gather_object(mine, gathered if self.is_main else None, dst=0)
        if not self.is_main:
            return None
        for part in gathered:
            for i, lp in part.items():
                samples[i].ref_logprobs = lp
        return 1.0 - sum(len(part) for part in gathered) / step_mbs.trajectories

    def loss_fn(self):
        """The algorithm's loss plus the train/rollout consistency metric `logprob_gap`:
        mean |log pi_sampler - log pi_trainer| on the sampled tokens, before this step's
        update (the weights the server sampled with)."""
        from .loss import trajectories
        from .vocab_parallel import vocab_parallel_logprob

        def fn(mb, logits):
            loss_sum, count, sums = self.algorithm.loss_sums(mb, logits)
            with torch.no_grad():
                lp, _ = vocab_parallel_logprob(logits.detach(), mb["labels"], self.model_cfg.vocab_size,
                                               self.tp_group, mask=mb["loss_mask"].bool())
            on_policy = mb["on_policy"]  # per trajectory: stale or file samples came from other weights
            mask = trajectories(mb["loss_mask"], mb.get("sequence_ids"), on_policy.numel()).per_token(on_policy)
            gap = ((lp - mb["rollout_logprobs"]).abs() * mask).sum()
            sums["logprob_gap"] = torch.stack([gap.double(), mask.sum().double()])
            sums["loss"] = torch.stack([loss_sum.detach().double(), count.double()])
            return loss_sum, count, sums

        return fn

    def _update(self, microbatches: list[dict]) -> dict:
        """Forward/backward over the micro-batches, then the optimizer step unless the loss is
        not finite (then the gradients are dropped; train.max_bad_steps in a row stop the run)."""
        from .engine import allreduce_metric_sums, finite
        from .loss import metric_means

        out = self.policy.run(microbatches, self.loss_fn())
        metrics = metric_means(allreduce_metric_sums(out if self.ps.is_last_stage else []))
        if finite(metrics["loss"]):
            self.bad_steps = 0
            metrics.update(self.policy.step())
            return metrics
        self.policy.discard_grads()
        self.bad_steps += 1
        metrics.update(update_ok=0.0, grad_norm=float("nan"))
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            self.save()
            raise TrainingStopped(f"{self.bad_steps} non-finite losses in a row (step {self.step}); "
                                  f"saved the last good state to {self.ckpt_dir}")
        return metrics

    def push_weights(self, version: int) -> dict:
        """The policy after `version` optimizer steps into the server: every rank takes part in
        the export's gathers; rank 0 pushes. Nothing without a server (trajectory files only)."""
        from .hf_mapping import export_hf_weights

        if not self.cfg.fresh_rollouts:
            return {}
        named = export_hf_weights(self.policy.chunks, self.model_cfg)
        if not self.is_main:
            for _ in named:
                pass
            return {}
        out = self.rollout.push(named)
        if self.ahead is not None:
            self.ahead.pushed(version)
        else:
            self.rollout.version = version
        return out

    def save(self) -> None:
        from .checkpoint import save_checkpoint

        save_checkpoint(
            self.ckpt_dir, self.step, self.policy.chunks, self.policy.optimizer, self.policy.scheduler,
            extra={"sampler": self.position["sampler"], "trajectory_sampler": self.position["trajectory_sampler"],
                   "step": self.step, **self.algorithm.state_dict()},
            hf_dir=self.cfg.model.path, keep_last=self.cfg.checkpoint.keep_last,
            rank0_files={"replay": self.replay.state_dict()} if self.replay is not None else None,
        )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> dict:
        from .rollout.manager import RolloutManager
        from .tracking import Tracking

        cfg = self.cfg
        if self.is_main:
            if cfg.fresh_rollouts:
                self.rollout = RolloutManager(cfg, self.run_dir, self.pad_id, self.stop_token_ids)
                self.rollout.start()
                self.rollout.version = self.step
            r = cfg.run
            self.tracking = Tracking(self.run_dir, r.tensorboard, r.wandb_project, r.wandb_mode, r.wandb_name,
                                     config=cfg.to_dict())
        # Engines we started hold model.path's weights; after a resume, a loaded checkpoint, or
        # when attached to someone's servers, give them the current policy first.
        if self.step > 0 or cfg.checkpoint.load or cfg.rollout.attach_urls:
            self.push_weights(self.step)
        if self.is_main and self.rollout is not None and cfg.train.max_staleness:
            from .rollout.overlap import RolloutsAhead

            self.ahead = RolloutsAhead(self.rollout, self.sampler, self.algorithm, cfg.train.max_staleness,
                                       first_step=self.step, last_step=cfg.train.steps)
        bar = progress_bar(cfg.train.steps, cfg.loss.name, enabled=self.is_main and cfg.run.progress, initial=self.step)
        evaluating = self.is_main and self.eval_items
        if evaluating and self.step == 0:
            self.tracking.log({"step": 0, "wall_time": 0.0, **self.rollout.evaluate(self.eval_items)})
        metrics: dict = {}
        while self.step < cfg.train.steps:
            metrics = self.train_step()
            last = self.step == cfg.train.steps or self._exit_duration_reached()
            # The last step too: the run's final accuracy is what users read (steps=320, every=25).
            if evaluating and (self.step % cfg.eval.every == 0 or last):
                metrics.update(self.rollout.evaluate(self.eval_items))
            if self.is_main:
                self.tracking.log(metrics)
                self._report(metrics, bar)
            if last:
                break
            if cfg.checkpoint.save_every and self.step % cfg.checkpoint.save_every == 0:
                self.save()
        if bar is not None:
            bar.close()
        self.save()
        if self.is_main:
            from .compare_runs import load_runs, plot

            plot(load_runs([self.run_dir]), self.run_dir / "curves.png")
        return metrics

    def _exit_duration_reached(self) -> bool:
        """train.exit_duration_in_mins: rank 0's elapsed time decides, broadcast so that every
        rank leaves the loop after the same step."""
        limit = self.cfg.train.exit_duration_in_mins
        if limit is None:
            return False
        flag = [self.is_main and time.time() - self.t_start >= 60.0 * limit]
        dist.broadcast_object_list(flag, src=0)
        if flag[0] and self.is_main:
            log.info(f"train.exit_duration_in_mins={limit:g} reached after step {self.step} of {self.cfg.train.steps} "
                     f"({(time.time() - self.t_start) / 60:.1f} min): final evaluation and checkpoint, then exit")
        return bool(flag[0])

    def _report(self, m: dict, bar) -> None:
        parts = {"reward": f"{m.get('rollout_reward_mean', m.get('reward_mean', float('nan'))):.3f}", "loss": f"{m['loss']:.4g}",
                 "tok_s": f"{m['tokens_per_s']:.0f}"}
        if "eval_accuracy" in m:
            parts["eval"] = f"{m['eval_accuracy']:.3f}"
        if bar is not None:
            bar.set_postfix(parts)
            bar.update(1)
        elif self.cfg.run.progress:
            log.info(f"step {self.step}/{self.cfg.train.steps} " + " ".join(f"{k}={v}" for k, v in parts.items()))


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="megatron-tbrm-train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="YAML recipe")
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of checkpoint.dir")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    return ap.parse_args(argv)


def main(argv: Optional[list[str]] = None, trainer_cls: type[Trainer] = Trainer) -> int:
    """`trainer_cls`: a Trainer subclass (the reliability tests inject faults through one)."""
    setup_logging()
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
        trainer = trainer_cls(cfg, resume=args.resume)
        trainer.fit()
        ok = True
    except BaseException:
        log.critical("failed", exc_info=True)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        destroy_distributed(barrier=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
