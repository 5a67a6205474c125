"""The trainer with NaN losses injected at chosen steps: a test hook for tests/test_reliability_resume.py,
kept out of the production loss.

    torchrun ... tests/workers/train_faults.py --nan-steps 2,4,5 --config RECIPE [key.sub=value ...]

Steps count from 1 (the step being computed); the loss and its logged value become NaN there.
"""

import sys

import torch

from megatron_tbrm.train import Trainer, main


def nan_trainer(nan_steps: set[int]) -> type[Trainer]:
    class NaNTrainer(Trainer):
        def loss_fn(self):
            fn = super().loss_fn()
            if self.step + 1 not in nan_steps:
                return fn

            def nan_loss(mb, logits):
                loss_sum, count, sums = fn(mb, logits)
                loss_sum = loss_sum * float("nan")
                sums["loss"] = torch.stack([loss_sum.detach().double(), count.double()])
                return loss_sum, count, sums

            return nan_loss

    return NaNTrainer


if __name__ == "__main__":
    argv = sys.argv[1:]
    i = argv.index("--nan-steps")
    steps = {int(x) for x in argv[i + 1].split(",")}
    sys.exit(main(argv[:i] + argv[i + 2:], trainer_cls=nan_trainer(steps)))
