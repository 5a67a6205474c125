"""The paper's reward: 0/1 by Math-Verify against the reference answer, with exact integer
and rational comparison first; and the early warning when responses carry no readable answer."""
from __future__ import annotations

import re
from typing import Optional

from .answers import extract_final_answer
from .registry import register_reward

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
