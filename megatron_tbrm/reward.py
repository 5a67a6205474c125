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
Nothing a model writes can raise out of `score_batch`: an exception in the in-process path
scores that sample 0 and is counted in `stats["errors"]` like one in a worker.
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
from typing import Any, Callable, Literal, Optional, Sequence

RewardFunc = Callable[[str, str], float]
FastPath = Callable[[str, str], Optional[float]]
Extractor = Callable[[str], Optional[Any]]


@dataclasses.dataclass(frozen=True)
class Reward:
    name: str
    fn: RewardFunc  # must be a module-level function: workers receive it by reference
    fast: Optional[FastPath] = None  # in-process verdict or None ("ask fn")
    # The final answer the reward reads from a response, None when there is none: feeds
    # stats["no_answer"] (responses the reward cannot grade at all).
    extract: Optional[Extractor] = None


_REGISTRY: dict[str, Reward] = {}


def register_reward(name: str, fast: Optional[FastPath] = None,
                    extract: Optional[Extractor] = None) -> Callable[[RewardFunc], RewardFunc]:
    def deco(fn: RewardFunc) -> RewardFunc:
        _REGISTRY[name] = Reward(name, fn, fast, extract)
        return fn
    return deco


def get_reward(name: str) -> Reward:
    if name not in _REGISTRY:
        raise KeyError(f"reward {name!r} is not registered; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


# ---------------------------------------------------------------------------------------
# Final-answer extraction


# A control word ends at the first non-letter: "\boxedx" and "\fboxsep" are other commands.
_BOX_CMD = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def _tex_argument(text: str, i: int) -> Optional[str]:
    r"""The undelimited macro argument starting at text[i], as TeX reads it: spaces are
    skipped, then a {...} group (its content; `\{` and `\}` are escaped characters, not
    braces), or else one token: a control word (`\pi`), a control symbol (`\%`) or a single
    character (`\boxed 12` boxes "1": LaTeX's rule, not a guess at intent). None when the
    text ends first or the group is never closed (a truncated response)."""
    n = len(text)
    while i < n and text[i].isspace():
        i += 1
    if i >= n:
        return None
    c = text[i]
    if c == "{":
        depth, j = 0, i
        while j < n:
            c = text[j]
            if c == "\\":
                j += 2  # an escaped character, e.g. \{ or \}
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1:j].strip()
            j += 1
        return None
    if c == "}":
        return None  # "{\boxed}": the group ends, there is no argument
    if c == "\\":
        j = i + 1
        while j < n and text[j].isalpha() and text[j].isascii():
            j += 1
        if j == i + 1:  # a control symbol: backslash + one non-letter
            j = min(i + 2, n)
        return text[i:j] if j > i + 1 else None
    return c


def extract_boxed(text: str) -> Optional[str]:
    r"""Argument of the LAST `\boxed` (or `\fbox`) command of `text`, in every form LaTeX
    accepts: `\boxed{5}`, `\boxed {5}`, `\boxed 5`, `\boxed\pi`, nested braces included.

    Returns the argument text (stripped), or None if there is no such command or the last
    one has no complete argument (a response truncated inside it has no answer). Never raises.
    """
    last = None
    for m in _BOX_CMD.finditer(text):
        last = m
    if last is None:
        return None
    return _tex_argument(text, last.end())


# DAPO's own verifier reads the last match of this pattern (verl, utils/reward_score/
# math_dapo.py: `(?i)Answer\s*:\s*([^\n]+)`), the form DAPO-Math-17k's prompts ask for.
_ANSWER_LINE = re.compile(r"(?i)answer\s*:\s*([^\n]+)")


def extract_answer_line(text: str) -> Optional[str]:
    r"""The text after the LAST "Answer:" (case-insensitive, up to the end of its line; the
    answer may start on the next line), as DAPO's verifier reads it. None if there is none."""
    last = None
    for m in _ANSWER_LINE.finditer(text):
        last = m
    if last is None:
        return None
    value = last.group(1).strip()
    return value or None


@dataclasses.dataclass(frozen=True)
class FinalAnswer:
    text: str  # the answer as written (argument of \boxed, or the rest of the Answer: line)
    source: Literal["boxed", "answer_line"]


def extract_final_answer(text: str) -> Optional[FinalAnswer]:
    r"""The answer a response gives: its last \boxed{} (the paper's prompt) or, without one,
    its last "Answer: ..." line (DAPO-Math-17k's prompt). None if it gives neither."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return FinalAnswer(boxed, "boxed")
    line = extract_answer_line(text)
    if line is not None:
        return FinalAnswer(line, "answer_line")
    return None


# ---------------------------------------------------------------------------------------
# The math reward


_INT = re.compile(r"([+-]?)([0-9]+)")
_INT_COMMAS = re.compile(r"([+-]?)([0-9]{1,3}(?:,[0-9]{3})+)")  # thousands separators: 1,000


def _int_key(s: str) -> Optional[str]:
    """A plain integer (optional sign, optional thousands commas, optional $...$) as its
    canonical decimal string ("-0012" -> "-12", "1,000" -> "1000"), else None. Compared as
    strings: int() refuses more than 4,300 digits (Python's int_max_str_digits)."""
    s = s.strip().strip("$").strip()
    m = _INT.fullmatch(s) or _INT_COMMAS.fullmatch(s)
    if m is None:
        return None
    digits = m.group(2).replace(",", "").lstrip("0") or "0"
    return ("-" if m.group(1) == "-" and digits != "0" else "") + digits


def math_fast_path(response: str, answer: str) -> Optional[float]:
    """Verdicts that need no sympy and always agree with `math_reward`: no final answer (0),
    identical strings (1), and two plain integers of any length (compared exactly). Else None."""
    ans = extract_final_answer(response)
    if ans is None:
        return 0.0
    pred = ans.text
    if ans.source == "answer_line":
        pred = pred.rstrip(".").strip()  # "Answer: 42." is a sentence's full stop
    if pred == answer.strip():
        return 1.0
    p, g = _int_key(pred), _int_key(answer)
    if p is not None and g is not None:
        return float(p == g)
    return None


def _parse(text: str):
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    # Timeouts off: Math-Verify's alarm-based timeout fails outside the main thread; the
    # scorer's process pool enforces the limit instead.
    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=None)


_MAX_EXACT_BITS = 1 << 20  # a power whose exact value needs more bits is left to Math-Verify


def _rational_value(e):
    """Exact value of `e` built from rationals with +, *, and integer powers (evaluated
    bottom-up, each power bounded by _MAX_EXACT_BITS), else None."""
    import sympy

    if isinstance(e, sympy.Rational):
        return e
    if isinstance(e, (sympy.Add, sympy.Mul)):
        vals = [_rational_value(a) for a in e.args]
        if any(v is None for v in vals):
            return None
        return sympy.Add(*vals) if isinstance(e, sympy.Add) else sympy.Mul(*vals)
    if isinstance(e, sympy.Pow):
        base, exp = _rational_value(e.base), _rational_value(e.exp)
        if base is None or exp is None or not exp.is_Integer:
            return None
        if base == 0 and exp < 0:
            return None  # 1/0
        if max(abs(base.p), base.q).bit_length() * abs(int(exp)) > _MAX_EXACT_BITS:
            return None
        return base ** exp
    return None  # symbols, decimals (Float), constants (pi), functions (5!), sets, ...


def _exact_rational(parsed: list, written: str):
    """The exact rational value of a Math-Verify parse (`x = value` unwrapped), or None when
    it is not an exact rational built from +, *, integer powers: a decimal (Float), a
    percentage (Math-Verify gives 50% = 50 on purpose), symbols, sets, irrationals, 5!, ..."""
    import sympy

    if not parsed or "%" in written:
        return None
    e = parsed[0]
    try:
        if isinstance(e, sympy.Eq) and isinstance(e.lhs, sympy.Symbol):
            e = e.rhs
        v = _rational_value(e)
    except Exception:  # noqa: BLE001 - not a plain number after all: Math-Verify decides
        return None
    return v if v is not None and v.is_Rational else None


@register_reward("math", fast=math_fast_path, extract=extract_final_answer)
def math_reward(response: str, answer: str) -> float:
    r"""1.0 if the response's final answer (`extract_final_answer`: last \boxed{}, else last
    "Answer:" line) equals `answer`, else 0.0.

    When both sides are exact rationals (integers, fractions, powers of them) they are compared
    exactly: Math-Verify's numeric tolerance (evalf with chop) calls 1/2^98 = 1/2^99. Otherwise
    Math-Verify decides: 0.5 = \frac{1}{2} = 1/2, 1,000 = 1000, x = 2 = 2, 3.0 = 3, ...
    Raises ValueError when `answer` cannot be parsed (the scorer counts it as an error)."""
    from math_verify import verify

    ans = extract_final_answer(response)
    if ans is None:
        return 0.0
    gold_text = answer if "\\boxed" in answer else f"\\boxed{{{answer}}}"
    gold = _parse(gold_text)
    if not gold:
        raise ValueError(f"reference answer {answer!r} cannot be parsed by Math-Verify")
    if ans.source == "boxed":
        pred = _parse(f"\\boxed{{{ans.text}}}")
    else:  # an answer line may be "$\frac{1}{2}$", "x = 5", "The final answer is $5$."
        pred = _parse(ans.text) or _parse(f"\\boxed{{{ans.text}}}")
    g, p = _exact_rational(gold, answer), _exact_rational(pred, ans.text)
    if g is not None and p is not None:
        return float(g == p)
    return float(verify(gold, pred, timeout_seconds=None))


def no_answer_warning(no_answer_frac: float, truncated_frac: float, step: int, max_tokens: int,
                      first_steps: int = 5, threshold: float = 0.5) -> Optional[str]:
    """A warning for the first `first_steps` training steps when more than `threshold` of the
    responses give no final answer the reward can read, naming the likely cause; else None.
    Mostly truncated responses point at rollout.max_tokens, otherwise at the prompt format."""
    if step >= first_steps or not no_answer_frac > threshold:
        return None
    head = (f"step {step}: {no_answer_frac:.0%} of the responses have no final answer the reward can read "
            f"(no \\boxed{{}}, no 'Answer:' line); they all score 0.")
    if truncated_frac >= no_answer_frac / 2:
        return (f"{head} {truncated_frac:.0%} were cut at rollout.max_tokens={max_tokens}: "
                f"raise rollout.max_tokens, or check that the server stops at the chat template's "
                f"end-of-turn token (rollout.stop).")
    return (f"{head} Few were truncated ({truncated_frac:.0%}), so the prompt likely asks for a format the "
            f"reward does not read: check data.system_prompt, and data.strip_instruction for "
            f"DAPO-style prompts that ask for their own answer format.")


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
