"""A resumable prompt sampler (seeded per epoch) and its mirror on the ranks that do not sample."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Iterator, Optional, Sequence

if TYPE_CHECKING:
    from .prompts import PromptItem

# ---------------------------------------------------------------------------------------
# Sampler


class PromptSampler:
    """Endless (or `num_epochs`-long) stream of fixed-size batches over a dataset, reshuffled
    every epoch from (seed, epoch); a batch that reaches the end of an epoch continues into
    the next, so no prompt is dropped. `state_dict()` after a batch + `load_state_dict()`
    resumes with exactly the batches that would have followed."""

    def __init__(self, dataset: Sequence[PromptItem], batch_size: int, seed: int = 0,
                 shuffle: bool = True, num_epochs: Optional[int] = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if len(dataset) == 0:
            raise ValueError("PromptSampler: the dataset is empty")
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.shuffle, self.num_epochs = shuffle, num_epochs
        self.epoch, self.index = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.dataset)))
        if self.shuffle:
            # String seeds hash with SHA-512: stable across Python versions and processes.
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[list[PromptItem]]:
        while True:
            try:
                yield self.next_batch()
            except StopIteration:
                return

    def next_batch(self) -> list[PromptItem]:
        if self.num_epochs is not None and self.epoch >= self.num_epochs:
            raise StopIteration
        batch = []
        while len(batch) < self.batch_size:
            if self.num_epochs is not None and self.epoch >= self.num_epochs:
                break  # the last batch of the last epoch may be short
            batch.append(self.dataset[self._order[self.index]])
            self.index += 1
            if self.index == len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed,
                "size": len(self.dataset), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != len(self.dataset):
            raise ValueError(f"sampler state is for a dataset of {state['size']} prompts, "
                             f"this one has {len(self.dataset)} (same file and data.* settings? data.dedupe "
                             f"and data.strip_instruction change the count)")
        if not 0 <= state["index"] < state["size"]:
            raise ValueError(f"sampler state index={state['index']} out of range [0, {state['size']})")
        self.epoch, self.index, self.seed = state["epoch"], state["index"], state["seed"]
        self.shuffle = state.get("shuffle", self.shuffle)
        self._order = self._permutation(self.epoch)


class MirroredSampler:
    """What a rank that does not sample holds in a sampler's place: the sampling rank's
    sampler state as last received (`load_state_dict`, every step in the trainer), so any
    rank reports rank 0's position. It has no dataset and draws no batch."""

    def __init__(self, state: Optional[dict] = None) -> None:
        self._state: Optional[dict] = None
        if state is not None:
            self.load_state_dict(state)

    def load_state_dict(self, state: dict) -> None:
        """Raises ValueError if `state` is not a PromptSampler.state_dict()."""
        need = {"epoch", "index", "seed", "size"}
        if not isinstance(state, dict) or not need <= set(state):
            raise ValueError(f"MirroredSampler: expected a PromptSampler state with keys {sorted(need)}, got {state!r}")
        self._state = dict(state)

    def state_dict(self) -> dict:
        """Raises RuntimeError before any state was received."""
        if self._state is None:
            raise RuntimeError("MirroredSampler: no sampler state received from the sampling rank yet")
        return dict(self._state)

    def next_batch(self) -> list[PromptItem]:
        raise RuntimeError("MirroredSampler: only the sampling rank (rank 0) draws batches; this rank receives them")
