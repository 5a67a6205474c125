"""The tiny model: deterministic files, loadable by transformers, Qwen2-style tokenizer."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_tbrm.demo.tiny import SYSTEM_PROMPT, TinyModelSpec, cached_tiny_model, write_tiny_model

REPO = Path(__file__).resolve().parents[1]
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"]


def test_cli_is_deterministic_and_seed_changes_weights(tmp_path):
    # One run through the CLI in a fresh process (other hash seed) against in-process runs.
    subprocess.run([sys.executable, str(REPO / "tools" / "make_tiny_model.py"),
                    "--out", str(tmp_path / "a"), "--seed", "0"], check=True, capture_output=True)
    write_tiny_model(tmp_path / "b", TinyModelSpec(seed=0))
    write_tiny_model(tmp_path / "c", TinyModelSpec(seed=1))
    for f in FILES:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()
    # The tokenizer does not depend on the weight seed.
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "c" / "tokenizer.json").read_bytes()


def test_weight_statistics_follow_hf_init(tiny_model_dir):
    w = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in w.values())
    assert torch.equal(w["model.norm.weight"], torch.ones(128))
    assert torch.equal(w["model.layers.0.self_attn.q_proj.bias"], torch.zeros(128))
    std = w["model.embed_tokens.weight"].std().item()
    assert abs(std - 0.02) < 0.002


@pytest.mark.parametrize("fields", [{}, {"family": "llama", "tie": True}])
def test_transformers_loads_without_missing_keys(tiny_model_factory, fields):
    from transformers import AutoModelForCausalLM

    d = tiny_model_factory(**fields)
    model, info = AutoModelForCausalLM.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    cfg = json.loads((d / "config.json").read_text())
    assert type(model).__name__ == cfg["architectures"][0]
    ref = load_file(str(d / "model.safetensors"))
    sd = model.state_dict()
    for k, v in ref.items():  # the loaded model holds exactly the file's weights
        assert torch.equal(sd[k], v), k
    if fields.get("tie"):
        assert "lm_head.weight" not in ref
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        assert not torch.equal(sd["lm_head.weight"], sd["model.embed_tokens.weight"])
    assert cfg["model_type"] == fields.get("family", "qwen2")
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, cfg["vocab_size"]) and torch.isfinite(logits).all()


def test_tokenizer_matches_raw_tokenizers_and_splits_digits(tiny_model_dir):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    raw = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    assert len(hf) <= cfg["vocab_size"]
    assert (hf.eos_token, hf.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert hf.eos_token_id == cfg["eos_token_id"] and hf.pad_token_id == cfg["pad_token_id"]
    texts = ["What is 37 + 58?", "37 + 58 = 95. The answer is \\boxed{95}.", SYSTEM_PROMPT,
             "héllo wörld ∑ 12345\n\n  tabs\tand 🙂", "<|im_start|>user\nhi<|im_end|>\n"]
    for t in texts:
        ids = hf(t, add_special_tokens=False)["input_ids"]
        assert ids == raw.encode(t).ids, t
        assert hf.decode(ids) == t  # byte-level: lossless round trip
    pieces = hf.convert_ids_to_tokens(hf("x 1234567890", add_special_tokens=False)["input_ids"])
    assert [p for p in pieces if p.strip("Ġ").isdigit()] == list("1234567890")
    specials = hf("<|im_start|><|im_end|><|endoftext|>", add_special_tokens=False)["input_ids"]
    assert specials == [1, 2, 0]


def test_chat_template_is_chatml(tiny_model_dir):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tiny_model_dir)
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 1 + 2?"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n")
    # No default system turn is injected.
    no_sys = hf.apply_chat_template(msgs[1:], tokenize=False, add_generation_prompt=False)
    assert no_sys == "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"


def test_cache_is_built_once_under_concurrency(tmp_path):
    spec = TinyModelSpec(layers=1)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(cached_tiny_model(tmp_path, spec)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and (results[0] / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [results[0].name]


def test_spec_validation_names_the_value():
    with pytest.raises(ValueError, match="head_dim=16"):
        TinyModelSpec(hidden=64, heads=4)
    with pytest.raises(ValueError, match="family='gpt2'"):
        TinyModelSpec(family="gpt2")


def test_write_into_existing_folder(tmp_path):
    write_tiny_model(tmp_path, TinyModelSpec(layers=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(FILES)


VLLM_SCRIPT = r'''
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=64 * 2**20, seed=0)
    out = llm.chat([[{"role": "user", "content": "What is 37 + 58?"}]],
                   SamplingParams(max_tokens=4, temperature=1.0, seed=0))[0]
    print("RESULT", json.dumps({"prompt_ids": out.prompt_token_ids, "n": len(out.outputs[0].token_ids)}))
'''


@pytest.mark.skipif(os.environ.get("TBRM_VLLM_TESTS") != "1",
                    reason="starts a vLLM CPU engine (~20-60 s); set TBRM_VLLM_TESTS=1")
def test_vllm_cpu_engine_loads_and_generates(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    script = tmp_path / "smoke.py"  # vLLM spawns workers: the engine needs a __main__ guard
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "TMPDIR": str(tmp_path), "VLLM_CACHE_ROOT": str(tmp_path / "vllm")}
    proc = subprocess.run([sys.executable, str(script), str(tiny_model_dir)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    want = tok.apply_chat_template([{"role": "user", "content": "What is 37 + 58?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert result["prompt_ids"] == tok(want, add_special_tokens=False)["input_ids"]
    assert 1 <= result["n"] <= 4
