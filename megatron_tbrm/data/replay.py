"""Experience replay for TBRM (`data.replay`): recent trajectories trained on again.

TBRM's residual holds for trajectories from any policy (shared/notes/tbrm.md): transitions are
deterministic, so the residual of the optimal Q is zero on every trajectory and, in the
realizable case, any mixture of trajectories has the same minimiser. A trajectory sampled some
updates ago is still valid data, with no importance ratio and no correction. The buffer keeps
the last `size` fresh rollouts of successfully updated steps (only the successful ones, reward > 0,
with `successes_only`, as self-imitation learning does: Oh et al. 2018) and adds `per_step` of
them, drawn uniformly without replacement, to every step's batch once it holds that many.
Why: from a weak start (5-8% of rollouts right) a step holds 3-5 successes, too few for the
update to move the policy towards them before the next batches pull elsewhere; each success
replayed several times next to different batches does (docs/learning.md, section 2g).

A held trajectory keeps the frozen reference's log-probs the trainer computed for it in its
first step (train.py: `_share_ref_logprobs`), so replaying it costs no reference forward.

Rank 0 only (it makes the batches); the buffer and its generator go into checkpoints
(`state_dict`: a file of rank 0's, not extra.json), so a resumed run draws what the
uninterrupted one would have.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from typing import Iterable, Optional

import torch

from ..rollout.batch import Sample


class ReplayBuffer:
    """The last `size` trajectories added (successes only with `successes_only`). Raises
    ValueError for size < 1, per_step < 1 or per_step > size."""

    def __init__(self, size: int, per_step: int, successes_only: bool = True, seed: int = 0):
        if size < 1 or per_step < 1 or per_step > size:
            raise ValueError(f"replay needs 1 <= per_step <= size (got size={size}, per_step={per_step})")
        self.size, self.per_step, self.successes_only = size, per_step, successes_only
        self.samples: deque[Sample] = deque(maxlen=size)
        self.rng = random.Random(f"replay:{seed}")

    def __len__(self) -> int:
        return len(self.samples)

    def add(self, samples: Iterable[Sample]) -> None:
        """Keep `samples` (a step's fresh rollouts, built by Sample.from_ids; the oldest fall out)."""
        self.samples.extend(s for s in samples if s.reward > 0 or not self.successes_only)

    def draw(self, extra: int = 0) -> list[Sample]:
        """`per_step` distinct held trajectories, plus up to `extra` more while the buffer holds
        them ([] while it holds fewer than per_step). Shallow copies: per-step fields (advantage)
        may be set on them; their token lists are the held ones, never mutated."""
        if len(self.samples) < self.per_step:
            return []
        n = min(self.per_step + max(extra, 0), len(self.samples))
        return [dataclasses.replace(self.samples[i]) for i in self.rng.sample(range(len(self.samples)), n)]

    def state_dict(self) -> dict:
        """The held trajectories, compact (prompt and response ids, the sampler's and the
        reference's log-probs of the response, reward, prompt index, versions: what
        Sample.from_ids rebuilds the rest from) and the generator's state; for torch.save."""
        rows = []
        for s in self.samples:
            start = s.loss_mask.index(1.0)  # the last prompt position
            end = start + int(sum(s.loss_mask))
            rows.append({"tokens": torch.tensor(s.tokens, dtype=torch.int64), "prompt_len": start + 1,
                         "logprobs": torch.tensor(s.rollout_logprobs[start:end], dtype=torch.float64),
                         "ref_logprobs": (None if s.ref_logprobs is None
                                          else torch.tensor(s.ref_logprobs[start:end], dtype=torch.float32)),
                         "reward": s.reward, "prompt_index": s.prompt_index, "pad_id": s.labels[-1],
                         "policy_version": s.policy_version, "policy_version_end": s.policy_version_end})
        return {"samples": rows, "rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        self.samples = deque((_sample(r) for r in state["samples"]), maxlen=self.size)
        self.rng.setstate(state["rng"])


def _sample(row: dict) -> Sample:
    tokens, n = row["tokens"].tolist(), row["prompt_len"]
    sample: Optional[Sample] = Sample.from_ids(tokens[:n], tokens[n:], row["logprobs"].tolist(), row["reward"],
                                               row["prompt_index"], row["pad_id"], row["policy_version"],
                                               row["policy_version_end"])
    assert sample is not None  # a held sample has a response
    if row.get("ref_logprobs") is not None:  # (absent in buffers saved before they were kept)
        sample.ref_logprobs = [0.0] * len(tokens)
        sample.ref_logprobs[n - 1:n - 1 + len(row["ref_logprobs"])] = row["ref_logprobs"].tolist()
    return sample
