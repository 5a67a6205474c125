#!/usr/bin/env python
"""What a demo warm start knows of each answer digit (issue 15: why weak starts learn slowly).

    python bench/answer_digits.py runs/demo [--problems 2000]

Teacher-forced on the worked solutions ("47 + 15 = 62. The answer is \\boxed{62}.") of the RL
training set (DEMO/data/train.jsonl), with transformers in fp32: for each digit of the sum after
" = ", split by the number of digits of the sum, the mean probability of the right digit and how
often it is the argmax (what greedy decoding picks); and per problem the probability that a
sample at temperature 1 is the whole worked solution (its mean and percentiles: are some
problems easy?). One forward pass per 128 problems; prints a markdown table.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("demo", help="a demo folder (its sft_model and data/train.jsonl)")
    ap.add_argument("--problems", type=int, default=2000)
    a = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_tbrm.data import PromptDataset
    from megatron_tbrm.demo.sft import build_examples

    model_dir, data = Path(a.demo) / "sft_model", Path(a.demo) / "data" / "train.jsonl"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = build_examples(data, model_dir)[: a.problems]
    answers = [item.answer for item in PromptDataset(data, model_dir)][: a.problems]  # the rows' own order
    stats: dict[tuple[str, int], list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    whole: list[float] = []  # per problem: the probability that a T = 1 sample is the solution
    with torch.no_grad():
        for i in range(0, len(rows), 128):
            batch = rows[i:i + 128]
            width = max(len(r["tokens"]) for r in batch)
            x = torch.tensor([r["tokens"] + [0] * (width - len(r["tokens"])) for r in batch])
            probs = torch.softmax(model(input_ids=x).logits.float(), -1)
            for j, r in enumerate(batch):
                response = [k for k, m in enumerate(r["loss_mask"]) if m]
                whole.append(float(torch.stack([probs[j, k, r["labels"][k]] for k in response]).log().sum().exp()))
                text = [tok.decode([r["labels"][k]]) for k in response]
                kind = f"{len(answers[i + j])}-digit sums"
                eq = text.index(" =")
                for offset in range(2, len(answers[i + j]) + 2):  # the digits after " = "
                    k, label = response[eq + offset], r["labels"][response[eq + offset]]
                    s = stats[(kind, offset)]
                    s[0] += float(probs[j, k, label])
                    s[1] += float(probs[j, k].argmax() == label)
                    s[2] += 1
    print(f"{a.demo}: {len(rows)} problems of {data}")
    print("| sums | answer digit | p(right digit) | right digit is the argmax | problems |")
    print("|---|---|---|---|---|")
    for (kind, offset), (p, top, n) in sorted(stats.items()):
        print(f"| {kind} | {offset - 1} | {p / n:.3f} | {top / n:.3f} | {n} |")
    whole.sort()
    print("per problem, P(a T = 1 sample is the worked solution): mean {:.3f}; percentiles 10/50/90/99: {}".format(
        sum(whole) / len(whole), " / ".join(f"{whole[int(q * (len(whole) - 1))]:.3f}" for q in (0.1, 0.5, 0.9, 0.99))))


if __name__ == "__main__":
    main()
