"""Supervised warm start (megatron_tbrm/sft.py) against transformers as the reference.

The SFT CLI runs under torchrun at TP=2 over gloo (2 ranks, micro-batches of 2); the test
then loads the written folder with transformers and checks, independently of the code
under test:
- the examples: prompt = chat template + system prompt + generation prompt, response =
  the arithmetic solution + <|im_end|>, loss only on the response (built here by hand);
- the first step's CE (the whole data set is one batch, so it is the initial model's CE)
  equals transformers' fp32 CE of the source model on those examples;
- the folder is complete (config/tokenizer/generation config copied byte for byte), its
  safetensors hold exactly what transformers' model holds after loading it, and the
  weights moved;
- transformers' CE on the examples is lower after training than before.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _dist import free_port
from megatron_tbrm.data import SYSTEM_PROMPT, make_arithmetic_dataset

REPO = Path(__file__).resolve().parents[1]
N = 16  # examples: one global batch


def _examples(tok, data: Path) -> list[tuple[list[int], list[int]]]:
    out = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        a, op, b = row["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert str(eval(f"{a}{op}{b}")) == row["answer"]
        prompt = tok.apply_chat_template(
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["prompt"]}],
            tokenize=False, add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n")
        solution = f"{a} {op} {b} = {row['answer']}. The answer is \\boxed{{{row['answer']}}}."
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        r_ids = tok(solution, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids("<|im_end|>")]
        out.append((p_ids, r_ids))
    return out


@torch.no_grad()
def _hf_ce(model_dir: Path, examples) -> float:
    """Mean over all response tokens of -log p(token), fp32, one example at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for p_ids, r_ids in examples:
        ids = torch.tensor([p_ids + r_ids])
        logp = torch.log_softmax(model(ids).logits[0].double(), dim=-1)
        targets = torch.tensor(r_ids)
        pos = torch.arange(len(p_ids) - 1, len(p_ids) + len(r_ids) - 1)
        total -= logp[pos, targets].sum().item()
        count += len(r_ids)
    return total / count


def test_build_examples_match_hand_made(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    from megatron_tbrm.sft import build_examples

    data = make_arithmetic_dataset(tmp_path / "train.jsonl", 6, seed=3, digits=2, ops="+-")
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = build_examples(data, tok)
    for row, (p_ids, r_ids) in zip(rows, _examples(tok, data), strict=True):
        seq = p_ids + r_ids
        assert row["tokens"] == seq[:-1]
        assert row["labels"] == seq[1:]
        assert row["loss_mask"] == [0.0] * (len(p_ids) - 1) + [1.0] * len(r_ids)


def test_sft_tp2_lowers_ce_and_writes_loadable_folder(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = make_arithmetic_dataset(tmp_path / "train.jsonl", N, seed=1, digits=2, ops="+-")
    out, metrics = tmp_path / "sft_out", tmp_path / "metrics.json"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}",
        "-m", "megatron_tbrm.sft", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
        "--tp", "2", "--steps", "6", "--batch", str(N), "--micro-batch-size", "2", "--lr", "3e-3",
        "--warmup-steps", "1", "--decay-steps", "6", "--no-progress", "--metrics-out", str(metrics),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    res = json.loads(metrics.read_text())

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = _examples(tok, data)
    ce_before = _hf_ce(tiny_model_dir, examples)
    # Step 1 sees every example with the initial weights: Megatron's TP=2 CE is the reference's.
    assert res["ce"][0] == pytest.approx(ce_before, abs=1e-4)
    assert res["ce"][-1] < res["ce"][0]

    # A complete folder: every non-weight file copied as is, one safetensors file of weights.
    src_files = {f.name for f in tiny_model_dir.iterdir() if f.is_file()}
    assert {f.name for f in out.iterdir()} == src_files
    for name in src_files - {"model.safetensors"}:
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name

    exported = load_file(str(out / "model.safetensors"))
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert exported.keys() == original.keys()
    assert all(exported[k].shape == original[k].shape and exported[k].dtype == original[k].dtype for k in exported)
    assert any(not torch.equal(exported[k], original[k]) for k in exported), "training changed no weight"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    state = model.state_dict()
    for k, t in exported.items():
        assert torch.equal(state[k], t), k

    ce_after = _hf_ce(out, examples)
    assert ce_after < ce_before - 0.5, (ce_before, ce_after)
