"""Experience replay for TBRM (`data.replay`): recent trajectories trained on again.

TBRM's residual holds for trajectories from any policy (shared/notes/tbrm.md), so a trajectory
sampled a few updates ago is still valid data: no importance ratio, no correction. The buffer
keeps the last `size` fresh rollouts of trained steps (only the successful ones, reward > 0,
with `successes_only`, as self-imitation learning does: Oh et al. 2018) and adds `per_step` of
them, drawn uniformly without replacement, to every step's batch once it holds that many.
Why: from a weak start (5-8% of rollouts right) a step holds 3-5 successes, too few for the
update to move the policy towards them before the next batch's pull elsewhere; each success
replayed a few times next to different batches is (docs/learning.md, section 2g).

Rank 0 only (it makes the batches); the buffer and its generator go into checkpoints, so a
resumed run draws what the uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from typing import Iterable

from ..rollout.batch import Sample


class ReplayBuffer:
    """The last `size` trajectories added (successes only with `successes_only`); `draw` gives
    `per_step` copies of them, or none while fewer are held. Raises ValueError for size < 1,
    per_step < 1 or per_step > size."""

    def __init__(self, size: int, per_step: int, successes_only: bool = True, seed: int = 0):
        if size < 1 or per_step < 1 or per_step > size:
            raise ValueError(f"replay needs 1 <= per_step <= size (got size={size}, per_step={per_step})")
        self.size, self.per_step, self.successes_only = size, per_step, successes_only
        self.samples: deque[Sample] = deque(maxlen=size)
        self.rng = random.Random(f"replay:{seed}")

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, samples: Iterable[Sample]) -> None:
        """Keep `samples` (a trained step's fresh rollouts; the oldest fall out)."""
        self.samples.extend(s for s in samples if s.reward > 0 or not self.successes_only)

    def draw(self) -> list[Sample]:
        """`per_step` distinct held trajectories as copies ([] while fewer are held)."""
        if len(self.samples) < self.per_step:
            return []
        return [dataclasses.replace(self.samples[i]) for i in self.rng.sample(range(len(self.samples)), self.per_step)]

    def state_dict(self) -> dict:
        """JSON-able: the held trajectories and the generator's state."""
        version, state, gauss = self.rng.getstate()
        return {"samples": [dataclasses.asdict(s) for s in self.samples], "rng": [version, list(state), gauss]}

    def load_state_dict(self, state: dict) -> None:
        self.samples = deque((Sample(**s) for s in state["samples"]), maxlen=self.size)
        version, st, gauss = state["rng"]
        self.rng.setstate((version, tuple(st), gauss))
