"""The reward registry: a reward is `fn(response, answer) -> float`, registered by name, with
an optional in-process fast path and final-answer extractor."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

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
