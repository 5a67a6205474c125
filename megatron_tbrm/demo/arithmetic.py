"""The demo's verifiable task: 2-digit arithmetic with \\boxed{} answers, in the published
prompt/answer format (JSONL rows {"prompt", "answer"}), and its worked solutions for the
supervised warm start. Deterministic in the seed; disjoint splits never share a problem."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Union

PathLike = Union[str, Path]

_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_PROBLEM = re.compile(r"What is (-?\d+) ([-+*]) (-?\d+)\?")


def arithmetic_problems(n: int, seed: int = 0, digits: int = 2, ops: str = "+-",
                        allow_negative: bool = False) -> list[tuple[int, str, int]]:
    """n distinct problems (a, op, b), operands in [0, 10**digits), in a seeded order.
    The first n problems for a given seed do not depend on n, so disjoint slices of one
    draw (see make_arithmetic_dataset's `skip`) never share a problem."""
    bad = set(ops) - set(_OPS)
    if bad or not ops:
        raise ValueError(f"ops={ops!r}: allowed characters are {''.join(_OPS)!r}")
    m = 10 ** digits
    space = sum(m * (m + 1) // 2 if (o == "-" and not allow_negative) else m * m for o in set(ops))
    if n > space:
        raise ValueError(f"n={n} exceeds the {space} distinct problems for digits={digits}, ops={ops!r}")
    rng = random.Random(f"arith:{seed}")
    seen: set[tuple[int, str, int]] = set()
    out = []
    ops_list = sorted(set(ops))
    while len(out) < n:
        a, op, b = rng.randrange(m), rng.choice(ops_list), rng.randrange(m)
        if op == "-" and not allow_negative and a < b:
            a, b = b, a
        if (a, op, b) not in seen:
            seen.add((a, op, b))
            out.append((a, op, b))
    return out


def arithmetic_row(a: int, op: str, b: int) -> dict:
    return {"prompt": f"What is {a} {op} {b}?", "answer": str(_OPS[op](a, b))}


def arithmetic_solution(prompt: str) -> str:
    r"""The SFT target for an arithmetic prompt: "37 + 58 = 95. The answer is \boxed{95}." """
    m = _PROBLEM.search(prompt)
    if not m:
        raise ValueError(f"not an arithmetic prompt 'What is A op B?': {prompt!r}")
    a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
    c = _OPS[op](a, b)
    return f"{a} {op} {b} = {c}. The answer is \\boxed{{{c}}}."


def make_arithmetic_dataset(path: PathLike, n: int, seed: int = 0, digits: int = 2, ops: str = "+-",
                            allow_negative: bool = False, skip: int = 0) -> Path:
    """Write n rows {"prompt": "What is 37 + 58?", "answer": "95"} as JSONL, deterministic.
    Problems are positions [skip, skip + n) of the seeded draw: with one seed, files from
    disjoint ranges never overlap (that is how train and held-out sets are made)."""
    probs = arithmetic_problems(skip + n, seed, digits, ops, allow_negative)[skip:]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for a, op, b in probs:
            f.write(json.dumps(arithmetic_row(a, op, b)) + "\n")
    return path


def make_arithmetic_splits(out_dir: PathLike, n_train: int, n_test: int, seed: int = 0,
                           **kw: Any) -> tuple[Path, Path]:
    """train.jsonl and test.jsonl in out_dir, disjoint by construction."""
    out_dir = Path(out_dir)
    train = make_arithmetic_dataset(out_dir / "train.jsonl", n_train, seed, skip=0, **kw)
    test = make_arithmetic_dataset(out_dir / "test.jsonl", n_test, seed, skip=n_train, **kw)
    return train, test
