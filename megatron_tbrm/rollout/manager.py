"""Rank 0's side of the rollout: the vLLM engines (rollout.engines started here, or attached
by URL), the client that spreads requests over them, the weight sync into all of them, the
reward scorer, and what happens when an engine dies.

`RolloutManager.rollout(sampler, step)` returns a scored `RolloutBatch`, or `ServerRestarted`
after an engine died and was restarted (the others keep running; the step's prompts are put
back and the whole batch is redone once the trainer has pushed its weights into every
engine: the same prompts and seeds give the same samples on any engine). One engine is the
case N=1 of the same code. Repeated or deterministic failures raise `RolloutServerError` with
the root cause from the failed engine's log.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Optional, Union

import torch

from ..log import get_logger
from .batch import RolloutBatch, ServerRestarted
from .server import RolloutServerError

if TYPE_CHECKING:
    from ..algorithms import Algorithm
    from ..config import Config
    from ..data import PromptSampler

log = get_logger(__name__)
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _devices(server) -> str:
    env = server.env or {}
    if env.get("CUDA_VISIBLE_DEVICES"):
        return f" (GPUs {env['CUDA_VISIBLE_DEVICES']})"
    return f" (cores {env['VLLM_CPU_OMP_THREADS_BIND']})" if env.get("VLLM_CPU_OMP_THREADS_BIND") else ""


class RolloutManager:
    def __init__(self, cfg: "Config", run_dir: Path, pad_id: int, stop_token_ids: list[int]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.pad_id = pad_id
        self.stop_token_ids = stop_token_ids
        self.servers: list = []  # VLLMServer per engine
        self.client = self.sync = self.scorer = None
        self.eval_scorer = None  # its own pool: evaluation may run while a rollout scores (overlap)
        self.version = 0  # optimizer steps in the weights the engines hold (set after each push)
        # sleep after each rollout, wake before each push (rollout.sleep_mode)
        self.sleep_mode = cfg.engines_sleep(torch.cuda.is_available())
        self.failures = 0  # engine failures in a row
        self._last_failure: Optional[tuple[int, Optional[str]]] = None

    @property
    def attached(self) -> bool:
        return bool(self.cfg.rollout.attach_urls)

    def start(self) -> None:
        """Start (or attach to) the vLLM engines; connect the client, the weight sync, the scorer."""
        from ..reward import RewardScorer
        from ..weight_sync import WeightSync
        from .client import RolloutClient
        from .engines import start_all
        from .server import VLLMServer

        r = self.cfg.rollout
        if self.attached:
            self.servers = [VLLMServer.attach(url) for url in r.attach_urls]
        else:
            self.servers = self._owned_engines()
            for i, s in enumerate(self.servers):
                log.info(f"starting vLLM engine {i}{_devices(s)} (log: {s.log_path})")
            start_all(self.servers, r.startup_timeout_s)
            for i, s in enumerate(self.servers):
                log.info(f"vLLM engine {i} serves {s.url}")
        self.client = RolloutClient(self.servers, max_concurrency=r.max_concurrency, timeout=r.request_timeout_s)
        self.sync = WeightSync(self.servers, transport=r.weight_sync.transport,
                               bucket_bytes=r.weight_sync.bucket_mb * 2**20, pause_mode=r.weight_sync.pause_mode)
        self._connect_sync()
        c = self.cfg.reward
        self.scorer = RewardScorer(c.name, timeout_s=c.timeout_s, num_workers=c.workers)
        self.eval_scorer = RewardScorer(c.name, timeout_s=c.timeout_s, num_workers=1) if self.cfg.train.max_staleness \
            else self.scorer

    def _owned_engines(self) -> list:
        """The VLLMServer of each engine this process starts: engine i on its own
        tensor_parallel_size GPUs (CUDA_VISIBLE_DEVICES) or, on CPU, its own cores
        (VLLM_CPU_OMP_THREADS_BIND), port rollout.port + i (or a free one),
        its log in RUN/vllm/server.log (one engine) or RUN/vllm/engine<i>/server.log."""
        from .engines import engine_cpu_binds, engine_devices
        from .server import VLLMServer

        r = self.cfg.rollout
        cuda = torch.cuda.is_available()
        count = r.engine_count(torch.cuda.device_count() if cuda else 0)
        # GPUs: CUDA_VISIBLE_DEVICES per engine; CPU: each engine's workers on their own cores
        if cuda:
            env = [{"CUDA_VISIBLE_DEVICES": d} for d in engine_devices(count, r.tensor_parallel_size)]
        else:
            env = [{"VLLM_CPU_OMP_THREADS_BIND": b} if b else None
                   for b in engine_cpu_binds(count, r.tensor_parallel_size)]
        dtype = r.dtype or self.cfg.model.dtype
        extra = list(r.extra_args)
        if cuda and r.kv_cache_bytes is None:
            extra += ["--gpu-memory-utilization", str(r.gpu_memory_utilization)]
        return [VLLMServer(
            self.cfg.model.path, host=r.host, port=r.port + i if r.port else None, dtype=VLLM_DTYPES.get(dtype, dtype),
            max_model_len=r.max_model_len, kv_cache_bytes=r.kv_cache_bytes, max_num_seqs=r.max_num_seqs,
            tensor_parallel_size=r.tensor_parallel_size, seed=self.cfg.parallel.seed, extra_args=extra,
            enable_sleep_mode=self.sleep_mode and cuda,
            work_dir=self.run_dir / "vllm" / (f"engine{i}" if count > 1 else ""),
            env=env[i], shm_busy_loop_s=None if cuda else r.shm_busy_loop_s,
        ) for i in range(count)]

    def _connect_sync(self, engines: Optional[list[int]] = None) -> None:
        """Collective transports: (re)make the broadcast group with the workers of `engines`
        (default all); needed once per server process (a restarted engine has new workers)."""
        from ..weight_sync import COLLECTIVE

        ws = self.cfg.rollout.weight_sync
        if ws.transport not in COLLECTIVE:
            return
        address = ws.master_address or ("127.0.0.1" if not self.attached else socket.gethostbyname(socket.gethostname()))
        self.sync.connect(address, ws.master_port, timeout_s=self.cfg.rollout.startup_timeout_s, engines=engines)

    def close(self) -> None:
        for part in (self.sync, self.scorer, self.eval_scorer):
            if part is not None:
                part.close()
        self._each(lambda s: s.stop())

    def _each(self, fn) -> list:
        from .engines import each

        return each(self.servers, fn)

    # ------------------------------------------------------------------ a step's rollout

    def generate(self, sampler: "PromptSampler", step: int) -> RolloutBatch:
        """Prompts -> trajectories -> rewards -> samples, with the rollout's metrics."""
        from ..reward import no_answer_warning

        r = self.cfg.rollout
        for server in self.servers if not self.attached else ():
            if not server.alive():  # e.g. died during the last push: restart it before sampling
                raise server.error("is dead (found before the rollout)")
        prompts = sampler.next_batch()
        version = self.version
        t0 = time.perf_counter()
        trajs = self.client.generate(
            [p.prompt_ids for p in prompts], n=r.n, temperature=r.temperature, top_p=r.top_p,
            max_tokens=r.max_tokens, stop=r.stop or None, seed=self.cfg.parallel.seed * 1_000_003 + step * 10_007,
            stop_token_ids=self.stop_token_ids, progress=False,
        )
        t_gen = time.perf_counter() - t0
        version_end = self.version
        answers = [prompts[t.prompt_index].answer for t in trajs]
        rewards, rstats = self.scorer.score_batch([t.text for t in trajs], answers)
        if r.save:
            self._save(step, prompts, trajs, answers, rewards, version, version_end)
        batch = RolloutBatch.from_trajectories(trajs, rewards, self.pad_id, version, version_end,
                                               sampler_state=sampler.state_dict())
        batch.metrics.update(
            rollout_s=t_gen,
            response_tokens=float(sum(len(t.response_token_ids) for t in trajs)),
            truncated_frac=sum(t.finish_reason == "length" for t in trajs) / max(len(trajs), 1),
            reward_timeouts=float(rstats.get("timeouts", 0)),
            reward_errors=float(rstats.get("errors", 0)),
            # Responses with no final answer the reward can read (they all score 0).
            no_answer_frac=float(rstats.get("no_answer_frac", float("nan"))),
        )
        warning = no_answer_warning(batch.metrics["no_answer_frac"], batch.metrics["truncated_frac"], step, r.max_tokens)
        if warning:
            log.warning(warning)
        return batch

    def _save(self, step: int, prompts, trajs, answers, rewards, version: int, version_end: int) -> None:
        """RUN/rollouts/step_N.jsonl (N = the step that trains on them, 1-based): one row per
        trajectory, in data/trajectories.py's token-id form (written to a temporary name, then
        renamed: a crash never leaves half a file)."""
        import json
        import os

        out = self.run_dir / "rollouts"
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"step_{step + 1}.jsonl"
        tmp = path.with_suffix(".jsonl.tmp")
        with open(tmp, "w") as f:
            for t, answer, reward in zip(trajs, answers, rewards):
                f.write(json.dumps({
                    "step": step + 1, "prompt_index": t.prompt_index, "sample_index": t.sample_index,
                    "prompt": prompts[t.prompt_index].prompt, "response": t.text, "answer": answer,
                    "reward": float(reward), "finish_reason": t.finish_reason,
                    "prompt_token_ids": list(t.prompt_token_ids), "response_token_ids": list(t.response_token_ids),
                    "rollout_logprobs": list(t.response_logprobs),
                    "policy_version": version, "policy_version_end": version_end,
                }) + "\n")
        os.replace(tmp, path)

    def rollout(self, sampler: "PromptSampler", step: int, algorithm: "Algorithm") -> Union[RolloutBatch, ServerRestarted]:
        """A prepared batch, or ServerRestarted after an engine died and was restarted (the
        prompts are put back, to be redone on every engine). Raises RolloutServerError when the
        restarts are used up, when attached to someone else's servers, or when the redone batch
        fails again with the same root cause (it is deterministic: more restarts would only
        repeat it)."""
        before = sampler.state_dict()
        try:
            batch = self.generate(sampler, step)
        except RolloutServerError as e:
            self.failures += 1
            limit = self.cfg.rollout.max_restarts
            if self.attached or self.failures > limit:
                raise RolloutServerError(f"rollout failed at step {step} ({self.failures} failure(s) in a row, "
                                         f"rollout.max_restarts={limit}): {e}") from None
            failed = self._failed_engines(e)
            failure = (step, self.servers[failed[0]].root_cause())
            if failure[1] is not None and failure == self._last_failure:
                raise RolloutServerError(
                    f"rollout failed at step {step} again after a restart, with the same error: {failure[1]} "
                    f"(deterministic: the batch is redone with the same prompts and seeds; not restarting again): {e}"
                ) from None
            self._last_failure = failure
            which = "server" if len(self.servers) == 1 else f"engine(s) {', '.join(map(str, failed))}"
            log.warning(f"rollout {which} failed at step {step}: {str(e).splitlines()[0]} (root cause in its log: "
                        f"{failure[1] or 'none found'}); restarting it ({self.failures}/{limit}) and redoing the batch")
            sampler.load_state_dict(before)
            self._restart(failed)
            return ServerRestarted(step, failure[1])
        self.failures = 0
        algorithm.prepare(batch)
        if self.sleep_mode:
            self._each(lambda s: s.sleep(level=1))  # until the push: the update gets the GPU memory
        return batch

    def _failed_engines(self, error: RolloutServerError) -> list[int]:
        """The engines to restart after `error`: the one that raised it and any that are dead
        (all of them when neither is known)."""
        failed = [i for i, s in enumerate(self.servers) if s is error.server or not s.alive()]
        return failed or list(range(len(self.servers)))

    def _restart(self, engines: list[int]) -> None:
        """Stop and start these engines (same GPUs; same ports unless a picked one was taken),
        reconnect their weight sync; the others keep running. The trainer pushes its weights
        next (ServerRestarted). A server dies with the thread that starts it
        (rollout/process.py): call from one that lives as long as the run (the trainer's, or
        the rollouts-ahead thread)."""
        from .engines import start_all

        servers = [self.servers[i] for i in engines]
        for s in servers:
            s.stop()
        start_all(servers, self.cfg.rollout.startup_timeout_s)
        self._connect_sync(engines)

    def push(self, named: Iterable) -> dict:
        """Push the exported policy (name, tensor) pairs into every engine. A push that fails
        because one of our own engines died leaves it to the next rollout to restart that
        engine and push again; the export is still drained (the other ranks are in its gathers)."""
        try:
            if self.sleep_mode:
                self._each(lambda s: s.wake_up())
            return self.sync.push(named)
        except RolloutServerError as e:
            dead = e.server if e.server is not None else self.servers[0]
            if self.attached or not dead.dies_within(10.0):
                raise
            log.warning(f"weight push failed, {dead.describe()} is dead: {str(e).splitlines()[0]}")
            for _ in named:
                pass
            return {}

    def evaluate(self, items) -> dict:
        from ..eval import evaluate

        e = self.cfg.eval
        res = evaluate(self.client, items, self.eval_scorer, k=1, temperature=e.temperature, max_tokens=e.max_tokens,
                       seed=self.cfg.parallel.seed, progress=False, stop_token_ids=self.stop_token_ids)
        return {"eval_accuracy": res["avg_at_k"], "eval_response_tokens": res["mean_response_tokens"]}
