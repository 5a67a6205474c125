#!/usr/bin/env python
"""Convert a Hugging Face Qwen2 / Llama folder into a megatron-core checkpoint at TP x PP.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out CKPT --tp 2 --pp 2 [--dtype bf16]

One command: with TP x PP > 1 it re-runs itself under torch.distributed.run with that many
processes (gloo on CPU, NCCL on GPU). Each rank reads only its own slices of the safetensors
files (megatron_tbrm.hf_mapping) and the model is saved in the trainer's checkpoint layout
(megatron_tbrm/checkpoint.py), so training starts from CKPT and
tools/convert_megatron_to_hf.py turns it back into an HF folder:

    CKPT/latest                    "iter_0000000"
    CKPT/iter_0000000/             dist_checkpointing (torch_dist) of {"model": sharded_state_dict}
    CKPT/iter_0000000/hf_config.json, tokenizer files, generation_config.json

The checkpoint reshards on load: any TP/PP can read it. Inputs are validated before any
worker starts (architecture, files, shapes, parallel sizes).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable without an install

from megatron_tbrm.hf_mapping import HFWeights, WeightsError, check_tp_heads  # noqa: E402
from megatron_tbrm.model import DTYPES, ModelConfig, ModelConfigError  # noqa: E402

_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root to create (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype of the checkpoint (default: the source's torch_dtype, else fp32)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace) -> ModelConfig:
    """Everything that can be checked without megatron-core, on the launching process."""
    cfg = ModelConfig.from_hf(args.hf_dir)
    cfg.dtype = args.dtype or _HF_DTYPES.get(cfg.hf_config.get("torch_dtype") or cfg.hf_config.get("dtype"), "fp32")
    if args.tp < 1 or args.pp < 1:
        raise ModelConfigError(f"--tp {args.tp} --pp {args.pp}: parallel sizes must be >= 1")
    cfg.check_parallel(args.tp, args.pp)
    check_tp_heads(cfg, args.tp)
    with HFWeights(args.hf_dir) as weights:
        weights.check(cfg)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty")
    return cfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Re-run this script under torch.distributed.run with `nproc` local workers."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", __file__, *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(cmd, env=env)


def convert(args: argparse.Namespace, cfg: ModelConfig) -> None:
    """One rank's share: build the model at TP x PP, import its slices, save (collective)."""
    from megatron_tbrm.checkpoint import save_checkpoint
    from megatron_tbrm.hf_mapping import import_hf_weights
    from megatron_tbrm.model import build_model
    from megatron_tbrm.parallel import destroy_distributed, init_distributed

    ps = init_distributed(tp=args.tp, pp=args.pp)
    chunks = build_model(cfg)
    import_hf_weights(chunks, cfg, args.hf_dir, progress=ps.rank == 0)
    path = save_checkpoint(args.out, 0, chunks, hf_dir=args.hf_dir)
    if ps.rank == 0:
        print(f"saved {cfg.family} ({cfg.dtype}) at TP={args.tp} PP={args.pp} to {path}")
    destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cfg = validate(args)
    nproc = args.tp * args.pp
    if "WORLD_SIZE" not in os.environ:
        if nproc > 1:
            rc = relaunch(nproc, argv)
            if rc:
                raise SystemExit(f"error: conversion workers failed (exit code {rc})")
            return
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif int(os.environ["WORLD_SIZE"]) != nproc:
        raise ModelConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but --tp x --pp = {nproc}: "
                               f"run one process per model-parallel rank")
    convert(args, cfg)


if __name__ == "__main__":
    try:
        main()
    except (ModelConfigError, WeightsError, FileExistsError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: unreadable JSON: {e}") from None
