"""Convert a megatron-tbrm checkpoint (the trainer's, or megatron-tbrm-convert-hf-to-megatron's)
into a Hugging Face folder that transformers and vLLM load as is.

    megatron-tbrm-convert-megatron-to-hf --ckpt CKPT --out DIR [--tp 1 --pp 1]
        [--max-shard-size 2GB] [--dtype fp32|bf16|fp16]

CKPT is a checkpoint root (with `latest`) or one iter_N folder. The weights reshard on load,
so any layout reads any checkpoint; the default TP=1, PP=1 is a single process (TP x PP > 1
starts that many worker processes). Writes config.json (the source's, unchanged),
model-0000k-of-0000N.safetensors + model.safetensors.index.json (shards of at most
--max-shard-size), and the tokenizer files / generation_config.json kept in the checkpoint.
Tensors are streamed: one shard in memory at a time.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

from .args import DTYPE_CHOICES, check_layout_and_out, parser
from .launch import is_worker

# Only the standard library at module level; torch is imported lazily (see hf_to_megatron.py).

HF_CONFIG = "hf_config.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1.5GiB', '123456' -> bytes (decimal units, like transformers)."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).upper() not in _UNITS:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}: use e.g. 2GB, 500MB, 1GiB or a byte count")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = parser("megatron-tbrm-convert-megatron-to-hf", __doc__, "--ckpt",
               "checkpoint root (with `latest`) or an iter_N folder", "HF folder", " to load at")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("2GB"))
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                   help="dtype of the written tensors (default: the checkpoint's parameter dtype)")
    return p.parse_args(argv)


def resolve_checkpoint(path: str | Path) -> Path:
    """The iter_N folder: CKPT itself, or the one CKPT/latest names."""
    path = Path(path)
    if (path / "latest").is_file():
        path = path / (path / "latest").read_text().strip()
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a dist_checkpointing checkpoint (no metadata.json)")
    if not (path / HF_CONFIG).is_file():
        raise FileNotFoundError(f"{path / HF_CONFIG} is missing: the checkpoint does not record its HF config")
    return path


def validate(args: argparse.Namespace):
    """(iter folder, ModelConfig), checked without megatron-core."""
    from megatron_tbrm.model import ModelConfig

    ckpt = resolve_checkpoint(args.ckpt)
    cfg = ModelConfig.from_hf(ckpt / HF_CONFIG)  # the same allow-list as the import; errors name the file
    check_layout_and_out(args, cfg)
    return ckpt, cfg


def checkpoint_dtype(ckpt: Path) -> str:
    """'fp32' / 'bf16' / 'fp16': what the checkpoint's weights were saved in."""
    from megatron.core import dist_checkpointing

    from megatron_tbrm.model import DTYPES

    meta = dist_checkpointing.load_tensors_metadata(str(ckpt))
    dtype = meta["embedding.word_embeddings.weight"].dtype
    return {v: k for k, v in DTYPES.items()}[dtype]


class ShardWriter:
    """Accumulates tensors into safetensors shards of at most `max_bytes` (a single larger
    tensor gets a shard of its own), then names them model-0000k-of-0000N like transformers."""

    def __init__(self, out: Path, max_bytes: int):
        self.out, self.max_bytes = out, max_bytes
        self.current: dict = {}
        self.current_bytes = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_bytes:
            self._flush()
        self.current[name] = tensor.detach().cpu().contiguous()
        self.current_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        save_file(self.current, str(self.out / f".shard-{len(self.shards)}.tmp"), metadata={"format": "pt"})
        self.shards.append(list(self.current))
        self.current, self.current_bytes = {}, 0

    def close(self) -> int:
        if self.current:
            self._flush()
        n = len(self.shards)
        weight_map = {}
        for k, names in enumerate(self.shards):
            fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out / f".shard-{k}.tmp", self.out / fname)
            weight_map.update({name: fname for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return n


def convert(args: argparse.Namespace, ckpt: Path, cfg) -> None:
    """Every rank: load at TP x PP, run the export collectives; rank 0 writes the folder."""
    import torch.distributed as dist
    from tqdm import tqdm

    from megatron_tbrm.checkpoint import TOKENIZER_FILES, load_checkpoint
    from megatron_tbrm.hf_mapping import WeightsError, expected_hf_shapes, export_hf_weights, hf_config_for
    from megatron_tbrm.model import DTYPES, build_model
    from megatron_tbrm.parallel import destroy_distributed, init_distributed

    ps = init_distributed(tp=args.tp, pp=args.pp)
    cfg.dtype = checkpoint_dtype(ckpt)
    chunks = build_model(cfg, init_weights=False)  # every weight is loaded next
    load_checkpoint(ckpt, chunks, load_rng=False)
    out = Path(args.out)
    writer = None
    if ps.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        writer = ShardWriter(out, args.max_shard_size)
    expected = expected_hf_shapes(cfg)
    # One dtype for the folder: mcore keeps some parameters (local-spec norms) in fp32 under bf16.
    out_dtype = DTYPES[args.dtype or cfg.dtype]
    from megatron_tbrm.log import on_terminal

    bar = tqdm(total=len(expected), desc="export", unit="tensor", disable=ps.rank != 0 or not on_terminal())
    for name, tensor in export_hf_weights(chunks, cfg):
        if tuple(tensor.shape) != expected.get(name):
            raise WeightsError(f"exported {name!r} has shape {list(tensor.shape)}, config.json implies {expected.get(name)}")
        writer.add(name, tensor.to(out_dtype))
        bar.update()
    bar.close()
    if ps.rank == 0:
        n = writer.close()
        written = sum(len(names) for names in writer.shards)
        if written != len(expected):
            raise WeightsError(f"wrote {written} tensors, config.json implies {len(expected)}")
        (out / "config.json").write_text(json.dumps(hf_config_for(cfg), indent=2) + "\n")
        for fname in TOKENIZER_FILES:
            if (ckpt / fname).is_file():
                shutil.copy2(ckpt / fname, out / fname)
        print(f"wrote {cfg.family} with {len(expected)} tensors in {n} shard(s) to {out}")
    dist.barrier()
    destroy_distributed()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    ckpt, cfg = validate(args)
    if is_worker(__spec__.name, args.tp * args.pp, argv):
        convert(args, ckpt, cfg)


def cli() -> int:
    """The console script: input errors end with one `error: ...` line (megatron_tbrm/cli.py)."""
    from megatron_tbrm.cli import run

    return run(main, ValueError, OSError)


if __name__ == "__main__":
    sys.exit(cli())
