#!/usr/bin/env python
"""How much shared direction is there in a TBRM step at a warm start? (issue 15 item 2)

    python bench/gradient_snr.py WARM_DIR [WARM_DIR ...] [--batches 16] [--batch 64] [--beta 0.05]

WARM_DIR is a demo folder (its sft_model/ and data/train.jsonl). At theta = theta_ref (the
first TBRM step), for K independent on-policy batches of B prompts x 1 sample (transformers,
fp32, one process; sampling at temperature 1, 32 new tokens at most, stopped at <|im_end|>;
0/1 reward by megatron_tbrm.reward.math_reward), it takes the gradient of

- `tbrm`: mean delta^2 with delta = V(s_1) - offset + sum_h log pi/pi_ref - r/beta
  (shared/notes/tbrm.md; the offset is the trainer's value offset: the first batch's mean V(s_1)
  minus its mean r/beta; the log-ratio is 0 in value at theta_ref, its gradient is that of log pi),
- `through V(s_1)`: the part of that gradient that flows through V(s_1) (2 delta dV),
- `through log pi`: the part through the summed response log-probs (2 delta d sum log pi): the
  policy-gradient part, REINFORCE with the residual as its (negative) advantage,

and prints, per loss, the median gradient norm and the mean (+- sd) over batches of the cosine
between a batch's gradient and the mean of the other K-1 batches' gradients. Independent
batches share only the expected gradient, so a cosine near 0 means that a batch's gradient is
almost all noise: Adam then takes steps in directions that the next batches do not repeat.
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def sample_batch(model, tok, items, batch: int, rng: random.Random, eot: int):
    """B (prompt ids, response ids, reward) on-policy samples, temperature 1."""
    from megatron_tbrm.reward.math_reward import math_reward

    chosen = rng.sample(items, batch)
    width = max(len(it.prompt_ids) for it in chosen)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eot
    ids = torch.tensor([[pad] * (width - len(it.prompt_ids)) + it.prompt_ids for it in chosen])  # left-padded
    att = (ids != pad).long()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                             max_new_tokens=32, eos_token_id=eot, pad_token_id=pad)
    samples = []
    for it, row in zip(chosen, out[:, width:].tolist()):
        resp = row[: row.index(eot) + 1] if eot in row else row
        text = tok.decode([t for t in resp if t != eot])
        samples.append((it.prompt_ids, resp, math_reward(text, it.answer)))
    return samples


def value_and_logprob(model, samples):
    """V(s_1) [B] and sum_h log pi(a_h|s_h) [B], fp32, with gradients (one right-padded forward)."""
    seqs = [p + r for p, r, _ in samples]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    att = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    logits = model(input_ids=ids, attention_mask=att).logits.float()
    lse = torch.logsumexp(logits, dim=-1)
    v, lp = [], []
    for i, (p, r, _) in enumerate(samples):
        pos = torch.arange(len(p) - 1, len(p) - 1 + len(r))  # the positions predicting a_1..a_H
        lp.append((logits[i, pos, torch.tensor(r)] - lse[i, pos]).sum())
        v.append(lse[i, len(p) - 1])
    return torch.stack(v), torch.stack(lp)


def measure(warm: Path, batches: int, batch: int, beta: float, seed: int) -> str:
    from transformers import AutoModelForCausalLM

    from megatron_tbrm.data import PromptDataset, load_tokenizer
    from megatron_tbrm.rollout.client import end_of_turn_token_ids

    model_dir = warm / "sft_model"
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = load_tokenizer(str(model_dir))
    eot = end_of_turn_token_ids(tok)[0]
    items = PromptDataset(warm / "data" / "train.jsonl", tok).items
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    params = list(model.parameters())

    def flat(loss):
        gs = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)])

    names = ("tbrm", "through V(s_1)", "through log pi")
    grads: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    successes, offset = [], None
    for k in range(batches):
        s = sample_batch(model, tok, items, batch, rng, eot)
        r = torch.tensor([x[2] for x in s], dtype=torch.float32)
        successes.append(int(r.sum()))
        v, lp = value_and_logprob(model, s)
        if offset is None:
            offset = float(v.mean() - (r / beta).mean())
        log_ratio = lp - lp.detach()  # 0 at theta_ref, gradient of log pi
        delta = v - offset + log_ratio - r / beta
        d = delta.detach()
        losses = {"tbrm": (delta ** 2).mean(), "through V(s_1)": (2 * d * v).mean(),
                  "through log pi": (2 * d * log_ratio).mean()}
        for n in names:
            grads[n].append(flat(losses[n]))
        print(f"[gradient_snr] {warm.name}: batch {k + 1}/{batches}, {successes[-1]} successes", file=sys.stderr, flush=True)
    lines = [f"{warm} ({batches} batches of {batch}, beta {beta}; successes per batch {sum(successes) / batches:.2f})",
             "| gradient | norm (median) | cosine with the other batches' mean (mean +- sd) |", "|---|---|---|"]
    for n in names:
        g = torch.stack(grads[n])
        total = g.sum(0)
        cos = torch.stack([torch.nn.functional.cosine_similarity(g[i], (total - g[i]) / (batches - 1), dim=0)
                           for i in range(batches)])
        lines.append(f"| {n} | {g.norm(dim=1).median():.1f} | {cos.mean():+.3f} +- {cos.std():.3f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("warm", nargs="+", type=Path, help="demo folders (sft_model/, data/train.jsonl)")
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    for w in a.warm:
        print(measure(w, a.batches, a.batch, a.beta, a.seed) + "\n", flush=True)


if __name__ == "__main__":
    main()
