"""Rank 0's side of the rollout: the vLLM server (started here or attached), the client, the
weight sync into it, the reward scorer, and what happens when the server dies.

`RolloutManager.rollout(sampler, step)` returns a scored `RolloutBatch`, or `ServerRestarted`
after the server died and was restarted (the step's prompts are put back). Repeated or
deterministic failures raise `RolloutServerError` with the root cause from the server's log.
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


class RolloutManager:
    def __init__(self, cfg: "Config", run_dir: Path, pad_id: int, stop_token_ids: list[int]):
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.pad_id = pad_id
        self.stop_token_ids = stop_token_ids
        self.server = self.client = self.sync = self.scorer = None
        self.eval_scorer = None  # its own pool: evaluation may run while a rollout scores (overlap)
        self.version = 0  # optimizer steps in the weights the server holds (set after each push)
        r = cfg.rollout
        # sleep after each rollout, wake before each push (rollout.sleep_mode)
        self.sleep_mode = r.sleep_mode == "always" or (
            r.sleep_mode == "auto" and torch.cuda.is_available() and not r.server_url and not cfg.train.max_staleness)
        self.failures = 0  # server failures in a row
        self._last_failure: Optional[tuple[int, Optional[str]]] = None

    @property
    def attached(self) -> bool:
        return bool(self.cfg.rollout.server_url)

    def start(self) -> None:
        """Start (or attach to) the vLLM server; connect the client, the weight sync, the scorer."""
        from ..reward import RewardScorer
        from ..weight_sync import WeightSync
        from .client import RolloutClient
        from .server import VLLMServer

        r = self.cfg.rollout
        if self.attached:
            self.server = VLLMServer.attach(r.server_url)
        else:
            dtype = r.dtype or self.cfg.model.dtype
            extra = list(r.extra_args)
            if torch.cuda.is_available() and r.kv_cache_bytes is None:
                extra += ["--gpu-memory-utilization", str(r.gpu_memory_utilization)]
            self.server = VLLMServer(
                self.cfg.model.path, host=r.host, port=r.port or None, dtype=VLLM_DTYPES.get(dtype, dtype),
                max_model_len=r.max_model_len, kv_cache_bytes=r.kv_cache_bytes, max_num_seqs=r.max_num_seqs,
                tensor_parallel_size=r.tensor_parallel_size, seed=self.cfg.parallel.seed, extra_args=extra,
                enable_sleep_mode=self.sleep_mode and torch.cuda.is_available(),
                work_dir=self.run_dir / "vllm",
            )
            log.info(f"starting vLLM server on {self.server.url} (log: {self.server.log_path})")
            self.server.start()
            self.server.wait_healthy(r.startup_timeout_s)
        self.client = RolloutClient.for_server(self.server, max_concurrency=r.max_concurrency, timeout=r.request_timeout_s)
        self.sync = WeightSync(self.server, transport=r.weight_sync.transport, bucket_bytes=r.weight_sync.bucket_mb * 2**20,
                               pause_mode=r.weight_sync.pause_mode)
        self._connect_sync()
        c = self.cfg.reward
        self.scorer = RewardScorer(c.name, timeout_s=c.timeout_s, num_workers=c.workers)
        self.eval_scorer = RewardScorer(c.name, timeout_s=c.timeout_s, num_workers=1) if self.cfg.train.max_staleness \
            else self.scorer

    def _connect_sync(self) -> None:
        """Collective transports: (re)make the broadcast group with the server's workers; needed
        once per server process (a restarted server has new workers)."""
        from ..weight_sync import COLLECTIVE

        ws = self.cfg.rollout.weight_sync
        if ws.transport not in COLLECTIVE:
            return
        address = ws.master_address or ("127.0.0.1" if not self.attached else socket.gethostbyname(socket.gethostname()))
        self.sync.connect(address, ws.master_port, timeout_s=self.cfg.rollout.startup_timeout_s)

    def close(self) -> None:
        for part in (self.sync, self.scorer, self.eval_scorer):
            if part is not None:
                part.close()
        if self.server is not None:
            self.server.stop()

    # ------------------------------------------------------------------ a step's rollout

    def generate(self, sampler: "PromptSampler", step: int) -> RolloutBatch:
        """Prompts -> trajectories -> rewards -> samples, with the rollout's metrics."""
        from ..reward import no_answer_warning

        r = self.cfg.rollout
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
        """A prepared batch, or ServerRestarted after the server died and was restarted (the
        prompts are put back, to be redone). Raises RolloutServerError when the restarts are
        used up, when attached to someone else's server, or when the redone batch fails again
        with the same root cause (it is deterministic: more restarts would only repeat it)."""
        before = sampler.state_dict()
        try:
            batch = self.generate(sampler, step)
        except RolloutServerError as e:
            self.failures += 1
            limit = self.cfg.rollout.max_restarts
            if self.attached or self.failures > limit:
                raise RolloutServerError(f"rollout failed at step {step} ({self.failures} failure(s) in a row, "
                                         f"rollout.max_restarts={limit}): {e}") from None
            failure = (step, self.server.root_cause())
            if failure[1] is not None and failure == self._last_failure:
                raise RolloutServerError(
                    f"rollout failed at step {step} again after a restart, with the same error: {failure[1]} "
                    f"(deterministic: the batch is redone with the same prompts and seeds; not restarting again): {e}"
                ) from None
            self._last_failure = failure
            log.warning(f"rollout server failed at step {step}: {str(e).splitlines()[0]} (root cause in its log: "
                        f"{failure[1] or 'none found'}); restarting it ({self.failures}/{limit}) and redoing the batch")
            sampler.load_state_dict(before)
            self.server.stop()
            self.server.start()
            self.server.wait_healthy(self.cfg.rollout.startup_timeout_s)
            self._connect_sync()
            return ServerRestarted(step, failure[1])
        self.failures = 0
        algorithm.prepare(batch)
        if self.sleep_mode:
            self.server.sleep(level=1)  # until the push: the update gets the GPU memory
        return batch

    def push(self, named: Iterable) -> dict:
        """Push the exported policy (name, tensor) pairs into the server. A push that fails
        because our own server died leaves it to the next rollout to restart the server and
        push again; the export is still drained (the other ranks are in its gathers)."""
        try:
            if self.sleep_mode:
                self.server.wake_up()
            return self.sync.push(named)
        except RolloutServerError as e:
            if self.attached or not self.server.dies_within(10.0):
                raise
            log.warning(f"weight push failed, the server is dead: {str(e).splitlines()[0]}")
            for _ in named:
                pass
            return {}

    def evaluate(self, items) -> dict:
        from ..eval import evaluate

        e = self.cfg.eval
        res = evaluate(self.client, items, self.eval_scorer, k=1, temperature=e.temperature, max_tokens=e.max_tokens,
                       seed=self.cfg.parallel.seed, progress=False, stop_token_ids=self.stop_token_ids)
        return {"eval_accuracy": res["avg_at_k"], "eval_response_tokens": res["mean_response_tokens"]}
