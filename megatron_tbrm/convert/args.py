"""The converters' shared command line: a source, --out, the --tp x --pp layout, and the
checks on them that need no megatron-core (standard library only, see launch.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

DTYPE_CHOICES = ("bf16", "fp16", "fp32")


def parser(prog: str, doc: str, source: str, source_help: str, out_help: str,
           layout: str = "") -> argparse.ArgumentParser:
    """`prog SOURCE --out OUT [--tp N] [--pp M]`; `layout` ends the --tp/--pp help."""
    p = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(source, required=True, help=source_help)
    p.add_argument("--out", required=True, help=f"{out_help} to create (must not exist or be empty)")
    p.add_argument("--tp", type=int, default=1, help=f"tensor parallel size{layout}")
    p.add_argument("--pp", type=int, default=1, help=f"pipeline parallel size{layout}")
    return p


def check_layout_and_out(args: argparse.Namespace, cfg) -> None:
    """--tp x --pp fit the model (ModelConfig.check_parallel); --out is new or empty."""
    from megatron_tbrm.model import ModelConfigError

    if args.tp < 1 or args.pp < 1:
        raise ModelConfigError(f"--tp {args.tp} --pp {args.pp}: parallel sizes must be >= 1")
    cfg.check_parallel(args.tp, args.pp)
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"--out {out} exists and is not empty")
