"""Convert a Hugging Face Qwen2 / Llama folder into a megatron-core checkpoint at TP x PP.

    megatron-tbrm-convert-hf-to-megatron --hf-dir DIR --out CKPT --tp 2 --pp 2 [--dtype bf16]

One command: with TP x PP > 1 it starts that many worker processes of itself (torchrun's
environment; gloo on CPU, NCCL on GPU). Each rank reads only its own slices of the safetensors
files (megatron_tbrm.hf_mapping) and the model is saved in the trainer's checkpoint layout
(megatron_tbrm/checkpoint.py), so training starts from CKPT and
megatron-tbrm-convert-megatron-to-hf turns it back into an HF folder:

    CKPT/latest                    "iter_0000000"
    CKPT/iter_0000000/             dist_checkpointing (torch_dist) of {"model": sharded_state_dict}
    CKPT/iter_0000000/hf_config.json, tokenizer files, generation_config.json

The checkpoint reshards on load: any TP/PP can read it. Inputs are validated before any
worker starts (architecture, files, shapes, parallel sizes).
"""
from __future__ import annotations

import argparse
import sys

from .args import DTYPE_CHOICES, check_layout_and_out, parser
from .launch import is_worker

# Only the standard library at module level: the processes dist_checkpointing spawns
# re-import this module, and torch would cost them seconds.

_HF_DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("megatron-tbrm-convert-hf-to-megatron", __doc__, "--hf-dir",
               "Hugging Face model folder (config.json + safetensors)", "checkpoint root")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="parameter dtype of the checkpoint (default: the source's torch_dtype, else fp32)")
    return p.parse_args(argv)


def validate(args: argparse.Namespace):
    """Everything that can be checked without megatron-core, on the launching process.
    Returns the ModelConfig."""
    from megatron_tbrm.hf_mapping import HFWeights, check_hf_weights
    from megatron_tbrm.model import ModelConfig

    cfg = ModelConfig.from_hf(args.hf_dir)
    cfg.dtype = args.dtype or _HF_DTYPES.get(cfg.hf_config.get("torch_dtype") or cfg.hf_config.get("dtype"), "fp32")
    check_layout_and_out(args, cfg)
    with HFWeights(args.hf_dir) as weights:
        check_hf_weights(weights, cfg)
    return cfg


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
    if is_worker(__spec__.name, args.tp * args.pp, argv):
        convert(args, cfg)


def cli() -> int:
    """The console script: input errors end with one `error: ...` line (megatron_tbrm/cli.py)."""
    from megatron_tbrm.cli import run

    return run(main, ValueError, OSError)


if __name__ == "__main__":
    sys.exit(cli())
