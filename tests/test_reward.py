"""Math reward verdicts on hand-graded tables (boxed and DAPO "Answer:" responses), the
in-process path that must never raise, and the hard per-sample time limit."""
from __future__ import annotations

import time

import pytest

from megatron_tbrm.reward import (FinalAnswer, RewardScorer, extract_boxed, extract_final_answer,
                                  get_reward, math_fast_path, math_reward, no_answer_warning,
                                  register_reward, score_batch)


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
    # What LaTeX accepts without braces: one token is the argument (TeX's rule for an
    # undelimited macro argument), after any spaces.
    ("so \\boxed 5.", "5"),
    ("\\boxed\n  7", "7"),
    ("\\boxed 12", "1"),  # LaTeX renders a box around "1", then "2"
    ("\\boxed\\pi", "\\pi"),
    ("\\boxed \\%", "\\%"),
    ("\\fbox 3", "3"),
    ("\\boxedx{3}", None),  # another control word, not \boxed
    ("\\fboxsep{3}", None),
    ("{\\boxed}", None),
    ("\\boxed{\\}}", "\\}"),  # an escaped brace does not close the group
    ("\\boxed{a \\{b\\} c}", "a \\{b\\} c"),
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
    # Exact rationals are compared exactly, never with a numeric tolerance (issue 13.4:
    # Math-Verify's evalf(chop=True) called these two equal).
    ("\\boxed{\\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", 0.0),
    ("\\boxed{x = \\frac{1}{2^{98}}}", "\\frac{1}{2^{99}}", 0.0),
    ("\\boxed{\\frac{1}{2^{99}}}", "\\frac{1}{2^{99}}", 1.0),
    ("\\boxed{2^{-99}}", "\\frac{1}{2^{99}}", 1.0),
    ("\\boxed{10^{-30}}", "0", 0.0),
    ("\\boxed{10^{18}+1}", "1000000000000000000", 0.0),
    ("\\boxed{\\frac{6}{4}}", "\\frac{3}{2}", 1.0),
    ("\\boxed{\\frac{1}{2^{2^{5}}}}", "\\frac{1}{2^{33}}", 0.0),  # exponents evaluated exactly too
    ("\\boxed{\\frac{1}{2^{2^{5}}}}", "\\frac{1}{2^{32}}", 1.0),
    ("\\boxed{(-2)^{3}}", "-8", 1.0),
    ("\\boxed{5!}", "120", 1.0),  # not +, *, ^ of rationals: Math-Verify decides
    ("\\boxed{50\\%}", "50", 1.0),  # Math-Verify's percentage rule is kept
    # Boxed without braces, as LaTeX accepts it.
    ("so \\boxed 5", "5", 1.0),
    ("\\boxed {5}", "5", 1.0),
    ("\\fbox{5}", "5", 1.0),
    ("\\boxed 12", "12", 0.0),  # LaTeX boxes "1" only
    ("\\boxed\\pi", "\\pi", 1.0),
    # Integers beyond Python's 4,300-digit int() limit (issue 13.3).
    ("\\boxed{" + "7" * 4400 + "}", "7" * 4400, 1.0),
    ("\\boxed{" + "7" * 4400 + "}", "7" * 4399 + "8", 0.0),
    ("\\boxed{-" + "0" * 5000 + "}", "0", 1.0),
]

# DAPO-Math-17k's prompt asks for a last line "Answer: $Answer"; DAPO's verifier reads the last
# "Answer:" match (verl math_dapo.py). Hand-graded responses in both forms.
DAPO_CASES = [
    ("We add them: 12 + 22 = 34.\nAnswer: 34", "34", 1.0),
    ("We add them: 12 + 23 = 35.\nAnswer: 35", "34", 0.0),
    ("Answer: $34$", "34", 1.0),
    ("So the answer follows.\nAnswer:\n34", "34", 1.0),  # on its own line after "Answer:"
    ("answer: 34.", "34", 1.0),
    ("ANSWER : 34", "34", 1.0),
    ("Answer: 12\nWait, I dropped a carry.\nAnswer: 34", "34", 1.0),  # the last one counts
    ("Answer: 34\nHmm, no.\nAnswer: 12", "34", 0.0),
    ("Answer: x = 34", "34", 1.0),
    ("Answer: 1,000", "1000", 1.0),
    ("Answer: \\frac{1}{2}", "\\frac{1}{2}", 1.0),
    ("Final Answer: The final answer is $34$. I hope it is correct.", "34", 1.0),
    ("The answer is \\boxed{34}.\nAnswer: 12", "34", 1.0),  # a boxed answer comes first
    ("The answer is \\boxed{12}.\nAnswer: 34", "34", 0.0),
    ("I am fairly sure the answer is 34", "34", 0.0),  # neither form: no answer
    ("Answer:", "34", 0.0),
    ("Answer: " + "9" * 4400, "9" * 4400, 1.0),
]


@pytest.mark.parametrize("response, answer, expected", CASES + DAPO_CASES,
                         ids=[f"{r[:40]!r}-{a[:12]!r}" for r, a, _ in CASES + DAPO_CASES])
def test_math_reward_table(response, answer, expected):
    assert math_reward(response, answer) == expected
    fast = math_fast_path(response, answer)
    assert fast is None or fast == expected  # the fast path never disagrees


@pytest.mark.parametrize("text, expected", [
    ("\\boxed{3}", FinalAnswer("3", "boxed")),
    ("Answer: 3\nthen \\boxed{4}", FinalAnswer("4", "boxed")),
    ("\\boxed{4}\nAnswer: 3", FinalAnswer("4", "boxed")),
    ("Step 1...\nAnswer: $3$  ", FinalAnswer("$3$", "answer_line")),
    ("Answer:\n\n 17\n", FinalAnswer("17", "answer_line")),
    ("Answer: 1\nAnswer: 2\nok", FinalAnswer("2", "answer_line")),
    ("the answer is 3", None),
    ("Answer:   ", None),
    ("", None),
])
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_score_batch_matches_table_and_uses_fast_path():
    responses, answers, expected = zip(*(CASES + DAPO_CASES))
    with RewardScorer("math", timeout_s=20.0, num_workers=1) as scorer:
        scores, stats = scorer.score_batch(list(responses), list(answers))
    assert scores == list(expected)
    n = len(responses)
    assert stats["n"] == n and stats["fast"] + stats["pooled"] == n
    assert stats["fast"] >= 20 and stats["timeouts"] == stats["errors"] == 0
    assert stats["mean"] == pytest.approx(sum(expected) / len(expected))
    # Hand count: the responses with neither a \boxed argument nor an "Answer:" line.
    assert stats["no_answer"] == 3 and stats["no_answer_frac"] == pytest.approx(3 / n)


def test_long_number_is_scored_and_the_batch_goes_on():
    """Issue 13.3: `\\boxed{<4,400 digits>}` made the fast path call int(), which raises past
    4,300 digits, and the whole step failed. Now: exact verdicts, the others scored."""
    long = "3" * 4400
    responses = ["\\boxed{95}", "\\boxed{" + long + "}", "\\boxed{" + long + "}", "\\boxed{" + long + "}",
                 "\\boxed{\\frac{1}{2}}", "Answer: 7"]
    answers = ["95", long, "5", "\\frac{1}{3}", "0.5", "7"]
    scores, stats = score_batch(responses, answers, timeout_s=20.0, num_workers=1)
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    assert stats["n"] == 6 and stats["timeouts"] == 0


@register_reward("test_raising_fast", fast=lambda response, answer: 1.0 / int(response))
def raising_fast_reward(response: str, answer: str) -> float:
    return 0.5


def test_an_exception_in_the_fast_path_scores_zero_and_is_counted():
    """The kind behind issue 13.3: whatever the in-process path raises stays inside score_batch."""
    with RewardScorer("test_raising_fast", timeout_s=20.0, num_workers=1) as scorer:
        scores, stats = scorer.score_batch(["1", "0", "x", "4"], ["a", "b", "c", "d"])
        assert scores == [1.0, 0.0, 0.0, 0.25]
        assert stats["errors"] == 2 and stats["fast"] == 2 and stats["pooled"] == 0
        assert any("sample 1: in-process ZeroDivisionError" in e for e in scorer.errors)
        assert any("sample 2: in-process ValueError" in e for e in scorer.errors)
        assert "no_answer" not in stats  # this reward has no extractor


def test_no_answer_warning_names_the_likely_cause():
    assert no_answer_warning(0.5, 0.0, step=0, max_tokens=2048) is None  # not "most"
    assert no_answer_warning(0.9, 0.0, step=5, max_tokens=2048) is None  # only the first steps
    fmt = no_answer_warning(0.9, 0.05, step=0, max_tokens=2048)
    assert "90% of the responses" in fmt and "data.strip_instruction" in fmt and "max_tokens" not in fmt
    cut = no_answer_warning(0.9, 0.8, step=1, max_tokens=2048)
    assert "80% were cut at rollout.max_tokens=2048" in cut


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
