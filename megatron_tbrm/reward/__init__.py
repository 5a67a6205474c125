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
from .answers import FinalAnswer, extract_answer_line, extract_boxed, extract_final_answer
from .math_reward import math_fast_path, math_reward, no_answer_warning
from .registry import Extractor, FastPath, Reward, RewardFunc, get_reward, register_reward
from .scorer import RewardScorer, score_batch

__all__ = ["Extractor", "FastPath", "FinalAnswer", "Reward", "RewardFunc", "RewardScorer", "extract_answer_line",
           "extract_boxed", "extract_final_answer", "get_reward", "math_fast_path", "math_reward",
           "no_answer_warning", "register_reward", "score_batch"]
