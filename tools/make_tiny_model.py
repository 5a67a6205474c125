#!/usr/bin/env python
"""Write a tiny random-weight Hugging Face chat model (Qwen2 or Llama) for tests and the CPU demo.

    python tools/make_tiny_model.py --out runs/tiny [--seed 0] [--family qwen2|llama]
        [--layers 2 --hidden 128 --heads 4 --kv-heads 2 --ffn 256 --vocab-size 512]
        [--tie | --no-tie] [--max-position-embeddings 1024] [--rope-theta 10000]

Deterministic: the same arguments give byte-identical files. See megatron_tbrm/demo/tiny.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without an install

from megatron_tbrm.demo.tiny import TinyModelSpec, write_tiny_model  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    d = TinyModelSpec()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--family", choices=["qwen2", "llama"], default=d.family)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--layers", type=int, default=d.layers)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--heads", type=int, default=d.heads)
    p.add_argument("--kv-heads", type=int, default=d.kv_heads)
    p.add_argument("--ffn", type=int, default=d.ffn)
    p.add_argument("--vocab-size", type=int, default=d.vocab_size)
    p.add_argument("--tie", action=argparse.BooleanOptionalAction, default=d.tie,
                   help="tie input embeddings and lm_head")
    p.add_argument("--max-position-embeddings", type=int, default=d.max_position_embeddings)
    p.add_argument("--rope-theta", type=float, default=d.rope_theta)
    p.add_argument("--rms-norm-eps", type=float, default=d.rms_norm_eps)
    p.add_argument("--initializer-range", type=float, default=d.initializer_range)
    a = p.parse_args(argv)
    fields = {f.name for f in dataclasses.fields(TinyModelSpec)}
    spec = TinyModelSpec(**{k: v for k, v in vars(a).items() if k in fields})
    out = write_tiny_model(a.out, spec)
    print(f"wrote {spec.family} tiny model to {out}")


if __name__ == "__main__":
    main()
