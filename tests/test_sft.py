"""Supervised warm start (megatron_tbrm/demo/sft.py) against transformers as the reference.

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

from megatron_tbrm.ports import torchrun_command
from megatron_tbrm.data import SYSTEM_PROMPT
from megatron_tbrm.demo.arithmetic import make_arithmetic_dataset

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

    from megatron_tbrm.demo.sft import build_examples

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
        *torchrun_command(2), "-m", "megatron_tbrm.demo.sft", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
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


def _sft_cli(model: Path, data: Path, out: Path, metrics: Path, *extra: str, nproc: int = 2):
    """nproc 0: a plain process (a world of one), whose exit status is the CLI's own (torchrun
    reports any failed rank as 1)."""
    cmd = [
        *(torchrun_command(nproc) if nproc else [sys.executable]),
        "-m", "megatron_tbrm.demo.sft", "--model", str(model), "--data", str(data), "--out", str(out),
        "--batch", "16", "--lr", "3e-3", "--warmup-steps", "1", "--no-progress", "--metrics-out", str(metrics), *extra,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@torch.no_grad()
def _hf_greedy_exact(model_dir: Path, examples) -> float:
    """transformers greedy decoding, one problem at a time: the fraction whose generated
    tokens are exactly the solution followed by <|im_end|>."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hits = 0
    for p_ids, r_ids in examples:
        out = model.generate(torch.tensor([p_ids]), max_new_tokens=len(r_ids), do_sample=False,
                             eos_token_id=r_ids[-1], pad_token_id=0)
        hits += out[0, len(p_ids):].tolist() == r_ids
    return hits / len(examples)


def test_warm_start_stops_inside_the_band_of_the_held_out_probe(tiny_model_dir, tmp_path):
    """The stopping rule (issue 15, item 1) on the tiny model, 2 DP ranks: the probe file is
    read and scored every 5 steps (what transformers' greedy decoding gets on it, with the
    written weights), training stops at the first probe inside the band, and a band the
    schedule cannot reach fails loudly (exit 3; under torchrun any rank's failure is 1), with the
    weights still written."""
    data = make_arithmetic_dataset(tmp_path / "train.jsonl", N, seed=1, digits=2, ops="+")
    unseen = make_arithmetic_dataset(tmp_path / "unseen.jsonl", N, seed=1, digits=2, ops="+", skip=N)
    # The probe: the 16 training problems (memorised within tens of steps) and 16 unseen
    # ones, so its accuracy climbs from 0 to about 0.5 in a few seconds of training.
    probe = tmp_path / "probe.jsonl"
    probe.write_text(data.read_text() + unseen.read_text())
    out, metrics = tmp_path / "sft_out", tmp_path / "metrics.json"
    proc = _sft_cli(tiny_model_dir, data, out, metrics, "--steps", "200", "--decay-steps", "200",
                    "--probe", str(probe), "--probe-every", "5", "--band", "0.25", "0.6")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    res = json.loads(metrics.read_text())
    assert res["band_status"] == "in_band" and res["band"] == [0.25, 0.6]
    assert res["probe_size"] == 2 * N
    steps = [p["step"] for p in res["probe"]]
    accs = [p["greedy_exact"] for p in res["probe"]]
    assert steps == list(range(0, res["steps"] + 1, 5))  # step 0, then every 5 steps
    assert 0.25 <= accs[-1] <= 0.6 and all(a < 0.25 for a in accs[:-1])  # the first probe in band
    assert res["steps"] < 200 and res["probe_accuracy"] == accs[-1]
    assert "held-out probe greedy exact match" in proc.stdout + proc.stderr  # logged (stderr)

    # The number is what greedy decoding of the written model gets on the probe problems.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ref = _hf_greedy_exact(out, _examples(tok, probe))
    assert abs(ref - res["probe_accuracy"]) <= 1.5 / (2 * N), (ref, res["probe_accuracy"])

    # A band the schedule never reaches: exit 3 with a plain message, the folder still written.
    out2, metrics2 = tmp_path / "sft_short", tmp_path / "short.json"
    proc = _sft_cli(tiny_model_dir, data, out2, metrics2, "--steps", "10", "--decay-steps", "10",
                    "--probe", str(probe), "--probe-every", "5", "--band", "0.9", "1.0", nproc=0)
    assert proc.returncode == 3, (proc.stdout + proc.stderr)[-6000:]
    assert "WARM START FAILED: below_band" in proc.stdout + proc.stderr
    res2 = json.loads(metrics2.read_text())
    assert res2["band_status"] == "below_band" and res2["steps"] == 10
    assert (out2 / "model.safetensors").exists()
