"""Math reward verdicts on a table of answer pairs, and the hard per-sample time limit."""
from __future__ import annotations

import time

import pytest

from megatron_tbrm.reward import (RewardScorer, extract_boxed, get_reward, math_fast_path,
                                  math_reward, register_reward, score_batch)


@register_reward("test_sleepy")
def sleepy_reward(response: str, answer: str) -> float:
    """A verifier that hangs on answer 'hang' and fails on 'boom'."""
    if answer == "hang":
        time.sleep(3600)
    if answer == "boom":
        raise ValueError("boom")
    return 1.0


@pytest.mark.parametrize("text, boxed", [
    ("so \\boxed{95}.", "95"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{\\sqrt{3}}{\\{2\\}}} end", "\\frac{\\sqrt{3}}{\\{2\\}}"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\fbox{7}", "7"),
    ("\\boxed {8}", "8"),
    ("no answer here: 95", None),
    ("\\boxed{1} truncated \\boxed{12", None),
    ("\\boxed", None),
])
def test_extract_boxed(text, boxed):
    assert extract_boxed(text) == boxed


CASES = [  # (response, reference, expected reward)
    ("37 + 58 = 95. The answer is \\boxed{95}.", "95", 1.0),
    ("The answer is \\boxed{96}.", "95", 0.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{1/2}", "\\frac{1}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "1/2", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.5", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{1000}", "1,000", 1.0),
    ("\\boxed{1,001}", "1000", 0.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt3}{2}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{2}}{2}", 0.0),
    ("The answer is 95.", "95", 0.0),  # no boxed answer
    ("\\boxed{95} no wait, \\boxed{94}", "95", 0.0),  # the last box counts
    ("\\boxed{94} no wait, \\boxed{95}", "95", 1.0),
    ("\\boxed{x = 2}", "2", 1.0),
    ("\\boxed{-7}", "-7", 1.0),
    ("\\boxed{3.0}", "3", 1.0),
    ("\\boxed{\\text{banana}}", "3", 0.0),
]


@pytest.mark.parametrize("response, answer, expected", CASES)
def test_math_reward_table(response, answer, expected):
    assert math_reward(response, answer) == expected
    fast = math_fast_path(response, answer)
    assert fast is None or fast == expected  # the fast path never disagrees


def test_score_batch_matches_table_and_uses_fast_path():
    responses, answers, expected = zip(*CASES)
    with RewardScorer("math", timeout_s=20.0, num_workers=1) as scorer:
        scores, stats = scorer.score_batch(list(responses), list(answers))
    assert scores == list(expected)
    assert stats["n"] == len(CASES) and stats["fast"] + stats["pooled"] == len(CASES)
    assert stats["fast"] >= 6 and stats["timeouts"] == stats["errors"] == 0
    assert stats["mean"] == pytest.approx(sum(expected) / len(expected))


def test_hanging_verifier_costs_at_most_its_limit_and_scores_zero():
    with RewardScorer("test_sleepy", timeout_s=1.0, num_workers=2) as scorer:
        scorer.score_batch(["warm"], ["x"])  # worker start-up is not part of the limit
        t0 = time.perf_counter()
        scores, stats = scorer.score_batch(["a", "b", "c", "d", "e"], ["x", "hang", "boom", "x", "hang"])
        elapsed = time.perf_counter() - t0
        assert scores == [1.0, 0.0, 0.0, 1.0, 0.0]
        assert stats["timeouts"] == 2 and stats["errors"] == 1
        assert any("ValueError: boom" in e for e in scorer.errors)
        # Both hangs overlap on the two workers, so ~1 s; the slack covers kill/respawn on a
        # loaded 2-core machine. The point: a verifier that sleeps for an hour costs seconds.
        assert elapsed < 8.0
        # The killed workers were replaced: the scorer keeps working.
        assert scorer.score_batch(["a"], ["x"])[0] == [1.0]


def test_module_level_score_batch_and_registry():
    scores, stats = score_batch(["\\boxed{95}", "\\boxed{9}", "nothing"], ["95", "95", "95"])
    assert scores == [1.0, 0.0, 0.0] and stats["pooled"] == 0  # all settled in-process
    assert get_reward("math").fn is math_reward
    with pytest.raises(KeyError, match="'nope' is not registered"):
        get_reward("nope")
    with pytest.raises(ValueError, match="2 responses but 1 answers"):
        score_batch(["a", "b"], ["a"])
