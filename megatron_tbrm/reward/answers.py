"""Reading a response's final answer: the last \\boxed{} (or \\fbox{}), else DAPO's last
`Answer:` line."""
from __future__ import annotations

import dataclasses
import re
from typing import Literal, Optional

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
