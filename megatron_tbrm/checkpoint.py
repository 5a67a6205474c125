"""Checkpoints: megatron-core dist_checkpointing of model, optimizer, scheduler, data position, RNG.

Layout of a checkpoint root:
    ROOT/latest                 text: the name of the newest complete checkpoint (e.g. iter_0000010)
    ROOT/iter_0000010/          a dist_checkpointing directory
    ROOT/iter_0000010/rng/      per-rank RNG states (exact resume at the same layout)
    ROOT/iter_0000010/hf_config.json, tokenizer files   (what conversion back to HF needs)

A save is written to `iter_N.tmp`, renamed once every rank has finished, and only then is
`latest` replaced (atomically): a crash while saving never touches the previous checkpoint.
With `keep_last=K`, older complete checkpoints are deleted only after that, so a crash at any
point leaves at least one complete checkpoint. Model weights reshard on load, so a
checkpoint loads at any TP/PP.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from .model import unwrap

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "generation_config.json",
    "chat_template.jinja",
)
# Distributed-optimizer state in the canonical (per-parameter) form, so it reshards too.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def model_sharded_state_dict(chunks: list) -> dict:
    return {_model_key(i, len(chunks)): unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def iteration_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def complete_checkpoints(root: str | Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first: folders named exactly iter_N (a
    folder gets that name only once its save is complete)."""
    done = [p for p in Path(root).glob("iter_*") if p.is_dir() and re.fullmatch(r"iter_\d+", p.name)]
    return sorted(done, key=lambda p: int(p.name[5:]))


def prune_checkpoints(root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` (>= 1) complete checkpoints, never the one
    `latest` names; returns what was deleted. Each victim is first renamed to
    iter_N.deleting (atomic), so a crash mid-delete never leaves a half-deleted folder that
    looks complete; leftovers of such a crash are removed here too."""
    if keep_last < 1:
        raise ValueError(f"keep_last={keep_last} must be >= 1")
    root = Path(root)
    newest = latest_checkpoint(root)
    done = complete_checkpoints(root)
    victims = [p for p in done[:-keep_last] if p != newest]
    for p in victims:
        doomed = p.with_name(p.name + ".deleting")
        os.replace(p, doomed)
    for doomed in root.glob("iter_*.deleting"):
        shutil.rmtree(doomed, ignore_errors=True)
    return victims


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The newest complete checkpoint under `root`, or None: the one `latest` names; if `latest`
    is missing or names a folder that is gone (a crash while re-saving that iteration), the
    highest `iter_N` (a folder gets that name only once its save is complete)."""
    root = Path(root)
    marker = root / "latest"
    if marker.is_file():
        path = root / marker.read_text().strip()
        if path.is_dir():
            return path
    done = complete_checkpoints(root)
    return done[-1] if done else None


def _rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": _tracker_states(),
    }


def _tracker_states():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}


def _set_rng_state(state: dict) -> None:
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    get_cuda_rng_tracker().set_states(state["tracker"])


def save_checkpoint(
    root: str | Path,
    iteration: int,
    chunks: list,
    optimizer=None,
    scheduler=None,
    extra: Optional[dict[str, Any]] = None,
    hf_dir: Optional[str | Path] = None,
    keep_last: Optional[int] = None,
    rank0_files: Optional[dict[str, Any]] = None,
) -> Path:
    """Save on all ranks (collective). `extra` is common (rank-0) JSON-able state, e.g. the data
    position; `rank0_files` {name: object} is state only rank 0 holds (e.g. the replay buffer),
    written by rank 0 as NAME.pt with torch.save (read back with `load_rank0_file`); `hf_dir` is
    the source model folder whose config/tokenizer files are copied; `keep_last=K` then deletes
    all but the newest K complete checkpoints (None: keep all)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank = dist.get_rank()
    if rank == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata=_OPTIM_METADATA)
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    dist_checkpointing.save(state, str(tmp))
    (tmp / "rng").mkdir(exist_ok=True)
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        (tmp / "extra.json").write_text(json.dumps(extra or {}, indent=1))
        for name, obj in (rank0_files or {}).items():
            torch.save(obj, tmp / f"{name}.pt")
        if hf_dir is not None:
            copy_hf_metadata(hf_dir, tmp)
    dist.barrier()
    if rank == 0:
        old = final.with_name(final.name + ".old")
        if final.exists():  # re-saving an iteration: move the old copy aside, never delete it first
            if old.exists():
                shutil.rmtree(old)
            os.replace(final, old)
        os.replace(tmp, final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, root / "latest")
        if old.exists():
            shutil.rmtree(old)
        if keep_last:
            prune_checkpoints(root, keep_last)
    dist.barrier()
    return final


def load_rank0_file(path: str | Path, name: str) -> Optional[Any]:
    """The object `save_checkpoint(rank0_files={name: ...})` wrote into the checkpoint
    directory `path` (an iter_N dir), or None when it holds none."""
    f = Path(path) / f"{name}.pt"
    return torch.load(f, weights_only=False) if f.is_file() else None


def copy_hf_metadata(hf_dir: str | Path, dest: str | Path) -> None:
    """config.json (as hf_config.json) and tokenizer files, so the checkpoint is self-contained."""
    hf_dir, dest = Path(hf_dir), Path(dest)
    shutil.copy2(hf_dir / "config.json", dest / "hf_config.json")
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copy2(hf_dir / name, dest / name)


def _materialize_optimizer_state(optimizer) -> None:
    """torch's Adam creates its state at the first step, but mcore's loading state dict needs
    it to exist (Megatron-LM never sees this: it runs apex/TE FusedAdam). A step with lr 0 and
    zero gradients creates it without touching the weights; the load then overwrites it."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        params = [p for g in inner.param_groups for p in g["params"]]
        if any(len(inner.state[p]) for p in params):
            continue
        lrs = [g["lr"] for g in inner.param_groups]
        for g in inner.param_groups:
            g["lr"] = 0.0
        for p in params:
            p.grad = torch.zeros_like(p)
        inner.step()
        for g, lr in zip(inner.param_groups, lrs):
            g["lr"] = lr
        for p in params:
            p.grad = None


def load_checkpoint(
    path: str | Path,
    chunks: list,
    optimizer=None,
    scheduler=None,
    load_rng: bool = True,
) -> dict:
    """Load a checkpoint directory (an iter_N dir, or a root with `latest`) into this layout.

    Returns {"iteration": N, "extra": {...}}. Model weights reshard across TP/PP; optimizer state
    reshards too (canonical form); RNG is restored only when this rank's file exists.
    """
    from megatron.core import dist_checkpointing

    path = Path(path)
    if (path / "latest").is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}/latest names a checkpoint that does not exist")
        path = found
    if not (path / "metadata.json").is_file():
        raise FileNotFoundError(f"{path} is not a dist_checkpointing checkpoint (no metadata.json)")
    state = model_sharded_state_dict(chunks)
    if optimizer is not None:
        _materialize_optimizer_state(optimizer)
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True, metadata=_OPTIM_METADATA)
    loaded = dist_checkpointing.load(state, str(path))
    for i, c in enumerate(chunks):
        unwrap(c).load_state_dict(loaded[_model_key(i, len(chunks))], strict=False)
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
    if scheduler is not None and "scheduler" in loaded:
        # mcore's load_state_dict *adds* the saved step count to the current one (it calls
        # step(increment=num_steps)); our Engine starts at warmup step 1, so count from 0.
        scheduler.num_steps = 0
        scheduler.load_state_dict(loaded["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    if load_rng and rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    extra_file = path / "extra.json"
    extra = json.loads(extra_file.read_text()) if extra_file.is_file() else {}
    return {"iteration": int(loaded.get("iteration", 0)), "extra": extra, "path": str(path)}
