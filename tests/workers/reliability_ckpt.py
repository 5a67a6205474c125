"""torchrun worker for tests/test_reliability.py: checkpoints under a crash.

    torchrun --nproc-per-node 2 reliability_ckpt.py ROOT save-loop   # iterations 1, 2, 3, ... until killed
    torchrun --nproc-per-node 2 reliability_ckpt.py ROOT resave-loop # iteration 1, then 2 again and again
    torchrun --nproc-per-node 2 reliability_ckpt.py ROOT keep-loop   # save-loop with keep_last=2
    torchrun --nproc-per-node 2 reliability_ckpt.py ROOT load        # load ROOT's latest, print what it holds

A ~25M-parameter GPT (TP=2, ~100 MB fp32 per save) so that a save takes long enough for a
random SIGKILL to land inside it. Before each save every parameter is filled with one value
(the iteration, or a counter for resave-loop), so a load shows at once whether it got one
complete checkpoint (all parameters equal, min == max) or a mix of two.
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from megatron_tbrm.checkpoint import load_checkpoint, save_checkpoint
from megatron_tbrm.model import ModelConfig, build_model, unwrap
from megatron_tbrm.parallel import destroy_distributed, init_distributed

HF = dict(architectures=["Qwen2ForCausalLM"], vocab_size=8192, hidden_size=512, num_hidden_layers=4,
          num_attention_heads=8, num_key_value_heads=4, intermediate_size=2048, max_position_embeddings=256,
          tie_word_embeddings=False)


def fill(chunks, value: float) -> None:
    with torch.no_grad():
        for c in chunks:
            for p in unwrap(c).parameters():
                p.fill_(value)


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    ps = init_distributed(tp=2, pp=1, seed=0)
    chunks = build_model(ModelConfig.from_hf(HF))
    if mode in ("save-loop", "resave-loop", "keep-loop"):
        value = 0
        while True:
            value += 1
            it = value if mode != "resave-loop" or value == 1 else 2
            fill(chunks, float(value))
            save_checkpoint(root, it, chunks, extra={"value": value}, keep_last=2 if mode == "keep-loop" else None)
            if ps.rank == 0:
                print(json.dumps({"saved": it, "value": value}), flush=True)
    elif mode == "load":
        state = load_checkpoint(root, chunks, load_rng=False)
        vals = torch.cat([p.detach().flatten() for c in chunks for p in unwrap(c).parameters()])
        lo, hi = vals.min().clone(), vals.max().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if ps.rank == 0:
            print(json.dumps({"iteration": state["iteration"], "path": state["path"], "extra": state["extra"],
                              "min": lo.item(), "max": hi.item()}), flush=True)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    destroy_distributed()


if __name__ == "__main__":
    main()
