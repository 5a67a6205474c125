"""data.replay's buffer (megatron_tbrm/data/replay.py), against what its contract says by hand:
which trajectories it keeps, when and what it draws, and that a checkpointed buffer draws what
the uninterrupted one would have. (The trainer with replay, killed and resumed:
test_reliability_resume.py.)"""

from __future__ import annotations

import pytest
import torch

from megatron_tbrm.data.replay import ReplayBuffer
from megatron_tbrm.rollout.batch import Sample


def _sample(i: int, reward: float) -> Sample:
    # a sampler's log-probs as vLLM returns them (float64, one missing at the end: counted 0)
    return Sample.from_ids([1, 2, 3 + i % 2], [10 + i, 11 + i, 7], [-0.5 - 1e-9 * i, -0.25], reward, prompt_index=i,
                           pad_id=5, version=i, version_end=i + 1)


def test_keeps_the_last_size_successes_and_draws_none_until_per_step_are_held():
    buf = ReplayBuffer(size=3, per_step=2)
    buf.add([_sample(0, 1.0), _sample(1, 0.0)])
    assert len(buf) == 1 and buf.draw() == []  # the failure is not kept; one success < per_step
    buf.add([_sample(2, 1.0), _sample(3, 1.0), _sample(4, 1.0)])
    assert [s.prompt_index for s in buf.samples] == [2, 3, 4]  # the oldest (0) fell out
    drawn = buf.draw()
    assert len(drawn) == 2 and len({s.prompt_index for s in drawn}) == 2
    assert {s.prompt_index for s in drawn} <= {2, 3, 4}


def test_successes_only_false_keeps_failures_too():
    buf = ReplayBuffer(size=4, per_step=1, successes_only=False)
    buf.add([_sample(0, 0.0), _sample(1, 1.0)])
    assert [s.reward for s in buf.samples] == [0.0, 1.0]


def test_draws_are_copies():
    buf = ReplayBuffer(size=2, per_step=1)
    buf.add([_sample(0, 1.0)])
    drawn = buf.draw()[0]
    drawn.advantage = 5.0  # per-step fields set on a drawn sample stay off the held one
    assert buf.samples[0].advantage == 0.0 and buf.samples[0] is not drawn


def test_draws_without_replacement_and_tops_up_with_extra():
    buf = ReplayBuffer(size=4, per_step=4)
    buf.add([_sample(i, 1.0) for i in range(4)])
    for _ in range(5):
        assert sorted(s.prompt_index for s in buf.draw()) == [0, 1, 2, 3]  # each held one, once
    buf = ReplayBuffer(size=8, per_step=2)
    buf.add([_sample(i, 1.0) for i in range(5)])
    assert len(buf.draw(extra=2)) == 4 and len(buf.draw(extra=9)) == 5  # capped at what is held


def test_saved_state_through_a_file_draws_what_the_uninterrupted_buffer_draws(tmp_path):
    a = ReplayBuffer(size=8, per_step=3, seed=5)
    for step in range(4):
        new = [_sample(step * 4 + k, float(k % 2)) for k in range(4)]
        for s in new[2:]:  # reference log-probs as the trainer sets them (exact in fp32); the rest have none
            s.ref_logprobs = [-0.25 * (j + 1) * m for j, m in enumerate(s.loss_mask)]
        a.add(new)
        a.draw()
    assert {s.ref_logprobs is None for s in a.samples} == {True, False}
    torch.save(a.state_dict(), tmp_path / "replay.pt")  # as the checkpoint stores it
    b = ReplayBuffer(size=8, per_step=3, seed=0)  # another seed: only the loaded state decides
    b.load_state_dict(torch.load(tmp_path / "replay.pt", weights_only=False))
    assert list(b.samples) == list(a.samples)  # every field rebuilt: tokens, labels, mask, both log-probs, versions
    for step in range(3):
        new = [_sample(100 + step, 1.0)]
        a.add(new)
        b.add(new)
        assert [s.prompt_index for s in a.draw()] == [s.prompt_index for s in b.draw()]


@pytest.mark.parametrize("size,per_step", [(0, 1), (4, 0), (2, 3)])
def test_bad_sizes_are_refused(size, per_step):
    with pytest.raises(ValueError, match=f"size={size}, per_step={per_step}"):
        ReplayBuffer(size, per_step)
