"""The worker pool that scores batches with a hard per-sample time limit (see the package
docstring for why processes)."""
from __future__ import annotations

import atexit
import multiprocessing as mp
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Optional, Sequence

from .registry import RewardFunc, get_reward

def _worker_main(conn: Connection, fn: RewardFunc) -> None:
    # `fn` arrives with the process arguments, so importing its module (and Math-Verify) is
    # paid before "ready", never by a task's time limit.
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when workers stop
    import math_verify  # noqa: F401
    conn.send("ready")
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        response, answer = msg
        try:
            conn.send(("ok", float(fn(response, answer))))
        except Exception as e:  # noqa: BLE001 - any failure scores 0 and is counted
            conn.send(("error", f"{type(e).__name__}: {str(e)[:200]}"))


class _Worker:
    def __init__(self, ctx, fn: RewardFunc) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, fn), daemon=True)
        self.proc.start()
        child.close()
        self.ready = False
        self.task: Optional[int] = None
        self.deadline = 0.0

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self.conn.close()


class RewardScorer:
    """Scores batches with one registered reward; owns a small pool of worker processes
    (started on first use, reused across batches). `close()` or use as a context manager."""

    def __init__(self, reward: str = "math", timeout_s: float = 5.0, num_workers: int = 2,
                 mp_context: str = "spawn") -> None:
        if timeout_s <= 0 or num_workers < 1:
            raise ValueError(f"timeout_s={timeout_s} must be > 0 and num_workers={num_workers} >= 1")
        self.reward = get_reward(reward)
        self.timeout_s = timeout_s
        self.num_workers = num_workers
        self._ctx = mp.get_context(mp_context)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self.errors: list[str] = []  # the last batch's error messages, for logging

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.kill()
        self._workers = []

    def score_batch(self, responses: Sequence[str], answers: Sequence[str]) -> tuple[list[float], dict]:
        """Scores in [0, 1], one per response, and stats: n, fast (verdicts of the fast path), pooled
        (sent to a worker), timeouts, errors, mean, seconds, and, for a reward with an
        extractor, no_answer / no_answer_frac (responses with no final answer to grade).
        A sample whose scoring raises or times out scores 0 and is counted, with its message
        in `self.errors`; nothing a response contains makes this raise. Raises ValueError only
        when the two lists differ in length, RuntimeError when no worker can start."""
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        with self._lock:
            t0 = time.perf_counter()
            self.errors = []
            n = len(responses)
            scores = [0.0] * n
            slow: list[int] = []
            errors = no_answer = 0
            for i, (r, a) in enumerate(zip(responses, answers)):
                try:
                    if self.reward.extract is not None and self.reward.extract(r) is None:
                        no_answer += 1
                    v = self.reward.fast(r, a) if self.reward.fast else None
                except Exception as e:  # noqa: BLE001 - a bug in our own fast path must not stop the step
                    errors += 1
                    self.errors.append(f"sample {i}: in-process {type(e).__name__}: {str(e)[:200]}")
                    continue  # scores 0
                if v is None:
                    slow.append(i)
                else:
                    scores[i] = v
            stats = {"n": n, "fast": n - len(slow) - errors, "pooled": len(slow), "timeouts": 0, "errors": errors}
            if self.reward.extract is not None:
                stats["no_answer"] = no_answer
                stats["no_answer_frac"] = no_answer / n if n else 0.0
            if slow:
                self._run(slow, responses, answers, scores, stats)
            stats["mean"] = sum(scores) / len(scores) if scores else 0.0
            stats["seconds"] = time.perf_counter() - t0
            return scores, stats

    def _run(self, todo: list[int], responses, answers, scores: list[float], stats: dict) -> None:
        pending = deque(todo)
        while len(self._workers) < self.num_workers:
            self._workers.append(_Worker(self._ctx, self.reward.fn))
        while pending or any(w.task is not None for w in self._workers):
            now = time.monotonic()
            for w in self._workers:
                if w.ready and w.task is None and pending:
                    i = pending.popleft()
                    w.conn.send((responses[i], answers[i]))
                    w.task, w.deadline = i, now + self.timeout_s
            busy = [w for w in self._workers if w.task is not None]
            wait_s = min((w.deadline for w in busy), default=now + 60.0) - now
            ready = set(wait([w.conn for w in self._workers], timeout=max(wait_s, 0.0)))
            for k, w in enumerate(self._workers):
                if w.conn in ready:
                    try:
                        msg = w.conn.recv()
                    except (EOFError, OSError):  # the worker died (crash, OOM kill)
                        if not w.ready:
                            raise RuntimeError(f"reward worker failed to start (exit code {w.proc.exitcode})")
                        self._fail(w, "errors", f"worker died (exit code {w.proc.exitcode})", stats)
                        self._workers[k] = _Worker(self._ctx, self.reward.fn)
                        continue
                    if msg == "ready":
                        w.ready = True
                        continue
                    status, value = msg
                    if status == "ok":
                        scores[w.task] = value
                    else:
                        stats["errors"] += 1
                        self.errors.append(f"sample {w.task}: {value}")
                    w.task = None
                elif w.task is not None and time.monotonic() >= w.deadline:
                    self._fail(w, "timeouts", f"exceeded {self.timeout_s}s", stats)
                    w.kill()
                    self._workers[k] = _Worker(self._ctx, self.reward.fn)

    def _fail(self, w: _Worker, kind: str, why: str, stats: dict) -> None:
        stats[kind] += 1
        self.errors.append(f"sample {w.task}: {why}")  # its score stays 0.0
        w.task = None


_SCORERS: dict[tuple, RewardScorer] = {}


def score_batch(responses: Sequence[str], answers: Sequence[str], reward: str = "math",
                timeout_s: float = 5.0, num_workers: int = 2) -> tuple[list[float], dict]:
    """Score with a process-wide scorer per (reward, num_workers), kept alive between calls.
    Returns (scores, stats) as `RewardScorer.score_batch` does."""
    key = (reward, num_workers)
    if key not in _SCORERS:
        _SCORERS[key] = RewardScorer(reward, timeout_s, num_workers)
    scorer = _SCORERS[key]
    scorer.timeout_s = timeout_s
    return scorer.score_batch(responses, answers)


@atexit.register
def _close_scorers() -> None:
    for s in _SCORERS.values():
        s.close()
