"""Rule rewards (0/1), the paper's Math-Verify reward first, with a hard per-sample time limit.

A reward is `fn(response, answer) -> float`, registered by name:

    @register_reward("my_rule")
    def my_rule(response: str, answer: str) -> float: ...

    scores, stats = score_batch(responses, answers, reward="math", timeout_s=5.0)

Why a process pool: sympy can spin for minutes on a pathological expression, and
Math-Verify's own timeout uses `signal.alarm`, which only works in a process's main thread.
So anything that may reach sympy runs in worker processes; a worker that exceeds the limit
is killed and replaced, and the sample scores 0 (counted in `stats["timeouts"]`). A reward
may also register a cheap in-process `fast` path that returns a verdict or None; the math
reward settles plain integers and exact matches there, so a typical step never pays for IPC.
Workers are spawned (forking a trainer that holds torch/gloo threads is unsafe), so a
script that scores must keep its entry point under `if __name__ == "__main__":`; a killed
worker's replacement costs a fresh interpreter + Math-Verify import (~1 s).
"""
from __future__ import annotations

import atexit
import dataclasses
import multiprocessing as mp
import re
import signal
import threading
import time
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Callable, Optional, Sequence

RewardFunc = Callable[[str, str], float]
FastPath = Callable[[str, str], Optional[float]]


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFunc  # must be a module-level function: workers receive it by reference
    fast: Optional[FastPath] = None  # in-process verdict or None ("ask fn")


_REGISTRY: dict[str, Reward] = {}


def register_reward(name: str, fast: Optional[FastPath] = None) -> Callable[[RewardFunc], RewardFunc]:
    def deco(fn: RewardFunc) -> RewardFunc:
        _REGISTRY[name] = Reward(name, fn, fast)
        return fn
    return deco


def get_reward(name: str) -> Reward:
    if name not in _REGISTRY:
        raise KeyError(f"reward {name!r} is not registered; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------
# The math reward


def extract_boxed(text: str) -> Optional[str]:
    r"""Content of the LAST \boxed{...} (or \fbox{...}) in `text`, nested braces included.
    None if there is none or the last one is unclosed (a truncated response has no answer)."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    # Only whitespace may separate the command from its brace ("\boxed {5}").
    if i < 0 or text[start:i].rstrip() not in ("\\boxed", "\\fbox"):
        return None
    depth = 0
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


_INT = re.compile(r"[+-]?\d+")
_INT_COMMAS = re.compile(r"[+-]?\d{1,3}(,\d{3})+")  # thousands separators: 1,000


def _as_int(s: str) -> Optional[int]:
    s = s.strip().strip("$").strip()
    if _INT.fullmatch(s):
        return int(s)
    if _INT_COMMAS.fullmatch(s):
        return int(s.replace(",", ""))
    return None


def math_fast_path(response: str, answer: str) -> Optional[float]:
    """Verdicts that need no sympy and always agree with Math-Verify: no boxed answer (0),
    identical strings (1), and two plain integers (compared exactly). Else None."""
    pred = extract_boxed(response)
    if pred is None:
        return 0.0
    if pred == answer.strip():
        return 1.0
    p, g = _as_int(pred), _as_int(answer)
    if p is not None and g is not None:
        return float(p == g)
    return None


def _parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Timeouts off: Math-Verify's alarm-based timeout fails outside the main thread; the
    # scorer's process pool enforces the limit instead.
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)


@register_reward("math", fast=math_fast_path)
def math_reward(response: str, answer: str) -> float:
    r"""1.0 if the last \boxed{} of `response` is mathematically equal to `answer`
    (Math-Verify: 0.5 = \frac{1}{2} = 1/2, 1,000 = 1000, ...), else 0.0."""
    from math_verify import verify

    pred = extract_boxed(response)
    if pred is None:
        return 0.0
    gold_text = answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"
    gold = _parse(gold_text)
    if not gold:
        raise ValueError(f"reference answer {answer!r} cannot be parsed by Math-Verify")
    return float(verify(gold, _parse(f"\\boxed{{{pred}}}"), timeout_seconds=None))


# ---------------------------------------------------------------------------------------
# Worker pool with per-task kill


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
            conn.send(("error", f"{type(e).__name__}: {e}"))


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
        if len(responses) != len(answers):
            raise ValueError(f"{len(responses)} responses but {len(answers)} answers")
        with self._lock:
            t0 = time.perf_counter()
            scores = [0.0] * len(responses)
            slow: list[int] = []
            for i, (r, a) in enumerate(zip(responses, answers)):
                v = self.reward.fast(r, a) if self.reward.fast else None
                if v is None:
                    slow.append(i)
                else:
                    scores[i] = v
            stats = {"n": len(responses), "fast": len(responses) - len(slow), "pooled": len(slow),
                     "timeouts": 0, "errors": 0}
            self.errors = []
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
    Returns (scores, stats) with stats n, fast, pooled, timeouts, errors, mean, seconds."""
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
