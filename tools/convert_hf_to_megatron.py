#!/usr/bin/env python
"""Convert a Hugging Face Qwen2 / Llama folder into a megatron-core checkpoint at TP x PP.

    python tools/convert_hf_to_megatron.py --hf-dir DIR --out CKPT --tp 2 --pp 2 [--dtype bf16]

One command: with TP x PP > 1 it starts that many worker processes of itself (torchrun's
environment; gloo on CPU, NCCL on GPU). Each rank reads only its own slices of the safetensors
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
import time
from pathlib import Path

# Runnable without an install. Only the standard library at module level: the process
# dist_checkpointing spawns re-imports this file, and torch would cost it seconds.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPE_CHOICES = ("bf16", "fp16", "fp32")
_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="checkpoint root to create (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="parameter dtype of the checkpoint (default: the source's torch_dtype, else fp32)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace):
    """Everything that can be checked without megatron-core, on the launching process.
    Returns the ModelConfig."""
    from megatron_tbrm.hf_mapping import HFWeights, check_tp_heads
    from megatron_tbrm.model import ModelConfig, ModelConfigError

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


def launch(script: str, nproc: int, argv: list[str]) -> int:
    """Run `script argv` as `nproc` local ranks with torchrun's environment variables.

    A minimal torchrun: no extra launcher process importing torch, and when one rank
    fails the others are stopped instead of waiting in a collective until the timeout.
    """
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
               LOCAL_WORLD_SIZE=str(nproc))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = [subprocess.Popen([sys.executable, script, *argv], env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
             for r in range(nproc)]
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [c for c in codes if c not in (None, 0)]
            if failed:
                return failed[0]
            if all(c == 0 for c in codes):
                return 0
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            p.wait()


def is_worker(script: str, nproc: int, argv: list[str]) -> bool:
    """True when this process does the work: a launched rank, or a world of one. Otherwise
    launch `nproc` ranks of `script` and return False once they all succeeded."""
    if "WORLD_SIZE" not in os.environ:
        if nproc > 1:
            rc = launch(script, nproc, argv)
            if rc:
                raise SystemExit(f"error: conversion workers failed (exit code {rc})")
            return False
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    elif int(os.environ["WORLD_SIZE"]) != nproc:
        raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but --tp x --pp = {nproc}: "
                         f"run one process per model-parallel rank")
    return True


def convert(args: argparse.Namespace, cfg) -> None:
    """One rank's share: build the model at TP x PP, import its slices, save (collective)."""
    from megatron_tbrm.checkpoint import save_checkpoint
    from megatron_tbrm.hf_mapping import import_hf_weights
    from megatron_tbrm.model import build_model
    from megatron_tbrm.parallel import destroy_distributed, init_distributed

    ps = init_distributed(tp=args.tp, pp=args.pp)
    chunks = build_model(cfg, init_weights=False)  # every weight is imported next
    import_hf_weights(chunks, cfg, args.hf_dir, progress=ps.rank == 0)
    path = save_checkpoint(args.out, 0, chunks, hf_dir=args.hf_dir)
    if ps.rank == 0:
        print(f"saved {cfg.family} ({cfg.dtype}) at TP={args.tp} PP={args.pp} to {path}")
    destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    cfg = validate(args)
    if is_worker(__file__, args.tp * args.pp, argv):
        convert(args, cfg)


def run_cli(main) -> None:
    """A converter's entry point: bad input (missing/existing files, unreadable JSON, model
    configs or weights that do not fit) ends with one `error: ...` line, not a traceback."""
    try:
        main()
    except json.JSONDecodeError as e:
        raise SystemExit(f"error: unreadable JSON: {e}") from None
    except (ValueError, OSError) as e:  # ModelConfigError, WeightsError, missing/existing files
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    run_cli(main)
