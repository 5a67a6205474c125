"""Padded vs token-budget vs packed micro-batches (megatron_tbrm/microbatches.py), side by side
in one run: one step's reference forward + update (forward, backward, optimizer step) on the
same trajectories, with the time of each and the fraction of the computed positions that are
real tokens. Goal (issue 17): packed update <= 0.6x the padded one, >= 90% real tokens.

The batch: response lengths drawn from a lognormal (median --median-response, sigma --sigma)
clipped to [1, --max-response], the long tail of n=1 rollouts; prompts uniform in
[--min-prompt, --max-prompt] tokens; random token ids. The model: a random Qwen2-shaped GPT
(--hidden, --layers; local spec, fp32 on CPU) trained with TBRM, the frozen reference a second
random model. Layouts, all with the same peak size of a micro-batch (--rows x the step's
longest row positions):
  padded   train.micro_batch_size=--rows rows, each padded to the step's longest (today)
  budget   train.max_tokens_per_microbatch=that many positions, rows padded per micro-batch
  packed   the same budget, train.pack_sequences=true (one row of trajectories end to end)
The local spec's packed attention computes each trajectory's block of the row's block-diagonal
causal mask only, as Transformer Engine's THD attention does on GPUs.

    python bench/packing.py [--trajectories 32] [--max-response 1024] [--rows 2] [--repeats 2]

One process (world of one); layouts interleaved within each repeat, the median per layout.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_samples(a, vocab: int):
    from megatron_tbrm.rollout.batch import Sample

    rng = random.Random(a.seed)
    out = []
    for i in range(a.trajectories):
        p = rng.randint(a.min_prompt, a.max_prompt)
        r = min(a.max_response, max(1, round(rng.lognormvariate(math.log(a.median_response), a.sigma))))
        toks = [rng.randrange(1, vocab) for _ in range(p + r)]
        out.append(Sample.from_ids(toks[:p], toks[p:], [-5.0] * r, float(rng.random() < 0.3), i, pad_id=0))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trajectories", type=int, default=32)
    ap.add_argument("--min-prompt", type=int, default=32)
    ap.add_argument("--max-prompt", type=int, default=96)
    ap.add_argument("--median-response", type=float, default=160.0)
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--max-response", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=2, help="padded rows per micro-batch (sets every layout's budget)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    import torch

    from megatron_tbrm.algorithms import make_algorithm
    from megatron_tbrm.config import LossSection
    from megatron_tbrm.engine import Engine, OptimSettings
    from megatron_tbrm.microbatches import build_microbatches, round_up
    from megatron_tbrm.model import ModelConfig
    from megatron_tbrm.parallel import destroy_distributed, init_distributed
    from megatron_tbrm.vocab_parallel import vocab_parallel_logprob

    load_start = os.getloadavg()
    init_distributed(seed=a.seed)
    hf = dict(architectures=["Qwen2ForCausalLM"], vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers,
              num_attention_heads=a.hidden // 64, num_key_value_heads=max(1, a.hidden // 128),
              intermediate_size=a.hidden * 11 // 4, max_position_embeddings=a.max_prompt + a.max_response + 8)
    cfg = ModelConfig.from_hf(hf, transformer_impl="local")
    # lr 0: the optimizer step costs what it costs but leaves the weights, so every layout trains
    # the same model and their losses must agree
    policy = Engine(cfg, OptimSettings(lr=0.0, clip_grad=1.0, distributed_optimizer=False))
    ref = Engine(cfg, None)
    algo = make_algorithm(LossSection(name="tbrm", beta=0.002), cfg.vocab_size, None)
    samples = make_samples(a, cfg.vocab_size)
    lengths = [len(s.tokens) for s in samples]
    budget = a.rows * round_up(max(lengths))
    layouts = {"padded": (None, False), "budget": (budget, False), "packed": (budget, True)}

    def ref_collect(mb, logits):
        return vocab_parallel_logprob(logits, mb["labels"], cfg.vocab_size, None, mask=mb["loss_mask"].bool())[0]

    def loss_fn(mb, logits):
        loss_sum, count, sums = algo.loss_sums(mb, logits)
        sums["loss"] = torch.stack([loss_sum.detach().double(), count.double()])
        return loss_sum, count, sums

    times: dict = {k: {"ref": [], "update": []} for k in layouts}
    info: dict = {}
    for rep in range(a.repeats + 1):  # the first round warms up (allocations), not counted
        for name, (max_tokens, pack) in layouts.items():
            step = build_microbatches(samples, 0, 0, 1, 0, a.rows, max_tokens, pack)
            mbs = step.microbatches
            t0 = time.perf_counter()
            for mb, lp in zip(mbs, ref.run(mbs, ref_collect, forward_only=True, collect=True)):
                mb["ref_logprobs"] = lp.float()
            t1 = time.perf_counter()
            out = policy.run(mbs, loss_fn)
            policy.step()
            t2 = time.perf_counter()
            loss = sum(float(m["loss"][0]) for m in out) / sum(float(m["loss"][1]) for m in out)
            if rep:
                times[name]["ref"].append(t1 - t0)
                times[name]["update"].append(t2 - t1)
            info[name] = dict(microbatches=len(mbs), trajectories=step.trajectories, computed=step.computed_tokens,
                              real=step.real_token_fraction, loss=loss)

    load = os.getloadavg()
    loads = f"{load_start[0]:.1f} at the start, {load[0]:.1f} at the end (1-minute)"
    print(f"batch: {a.trajectories} trajectories, prompts U[{a.min_prompt}, {a.max_prompt}], responses lognormal("
          f"median {a.median_response:g}, sigma {a.sigma:g}) clipped to [1, {a.max_response}]: tokens mean "
          f"{statistics.mean(lengths):.0f}, median {statistics.median(lengths):.0f}, max {max(lengths)}")
    print(f"model: hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}, local spec, fp32, {torch.get_num_threads()} "
          f"threads; micro-batch budget {budget} positions ({a.rows} rows x {round_up(max(lengths))}); "
          f"median of {a.repeats}; load average {loads}")
    base = statistics.median(times["padded"]["update"])
    base_ref = statistics.median(times["padded"]["ref"])
    print(f"{'layout':8s} {'micro-batches':>13s} {'positions':>10s} {'real':>6s} {'ref fwd s':>9s} {'x':>6s} "
          f"{'update s':>9s} {'x':>6s} {'loss':>10s}")
    for name in layouts:
        r, u = statistics.median(times[name]["ref"]), statistics.median(times[name]["update"])
        i = info[name]
        print(f"{name:8s} {i['microbatches']:13d} {i['computed']:10d} {i['real']:6.1%} {r:9.2f} {r / base_ref:6.2f} "
              f"{u:9.2f} {u / base:6.2f} {i['loss']:10.4f}")
    destroy_distributed()


if __name__ == "__main__":
    main()
