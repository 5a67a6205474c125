"""Test models for the conversion tests: the tiny Qwen2 / Llama (megatron_tbrm.demo.tiny) with a
vocabulary of 300 (so Megatron pads it: 384 at TP=1, 512 at TP=2), 4 layers (PP=2 with two
virtual stages), random norms and biases (the tiny model's are 1 and 0, which would hide a
swapped or misplaced norm/bias), optionally split into several safetensors shards.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

VOCAB = 300


def make_test_model(dst: Path, tiny_model_factory: Callable[..., Path], *, family: str, tie: bool,
                    shards: int = 1, layers: int = 4) -> Path:
    src = tiny_model_factory(family=family, tie=tie, layers=layers, vocab_size=VOCAB)
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    (dst / "model.safetensors").unlink()
    gen = torch.Generator().manual_seed(7)
    weights = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if v.dim() == 1 else v for k, v in weights.items()}
    if shards == 1:
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst
    names, weight_map = list(weights), {}
    for s in range(shards):  # interleaved, so a layer's tensors span several files
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: weights[k] for k in names[s::shards]}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(v.numel() * 4 for v in weights.values())}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def read_all(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (single file or sharded), read independently of hf_mapping."""
    hf_dir = Path(hf_dir)
    index = hf_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(str(hf_dir / f)))
    return out
