"""Prompt datasets (JSONL / Parquet), chat templating, a resumable sampler.

    ds = PromptDataset("dapo.parquet", tokenizer=model_dir, prompt_key="prompt",
                       answer_key="reward_model.ground_truth", max_prompt_tokens=1024,
                       strip_instruction=True)      # DAPO's "Answer:" wrapper off, raw problem
    sampler = PromptSampler(ds, batch_size=128, seed=0)
    for batch in sampler: ...                       # list[PromptItem], epochs roll over
    ckpt["data"] = sampler.state_dict(); sampler.load_state_dict(ckpt["data"])

Only the rank that samples (rank 0 in the trainer) loads a dataset; the others hold a
`MirroredSampler`, which keeps the sampler state rank 0 sends with each step. Duplicate rows
(same prompt and answer: the public DAPO-Math-17k parquet repeats each of its ~17.4 k
prompts ~100 times) are dropped and counted before any templating or tokenisation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from .prompts import (DAPO_INSTRUCTION_PREFIX, DAPO_INSTRUCTION_SUFFIX, SYSTEM_PROMPT, LoadStats, PromptDataset,
                      PromptItem, check_prompt_fields, load_eval_items, load_tokenizer, resolve_eval_fields,
                      strip_dapo_instruction, to_messages)
from .rows import BadRow, PathLike, get_field, read_rows
from .sampler import MirroredSampler, PromptSampler

__all__ = ["BadRow", "DataLoadFailed", "DataLoaded", "load_on_rank0", "DAPO_INSTRUCTION_PREFIX", "DAPO_INSTRUCTION_SUFFIX", "LoadStats", "MirroredSampler", "PathLike",
           "PromptDataset", "PromptItem", "PromptSampler", "SYSTEM_PROMPT", "TrainingData", "check_prompt_fields",
           "get_field", "load_eval_items", "load_tokenizer", "load_training_data", "read_rows", "resolve_eval_fields",
           "strip_dapo_instruction", "to_messages"]


@dataclasses.dataclass
class TrainingData:
    """What rank 0 loads for a training run: the prompts and their sampler (None when every
    sample comes from trajectory files), the trajectory files' samples and their sampler
    (None without data.trajectories), the evaluation items (None without evaluation, or without
    a server) and the load counts (floats, logged every step)."""

    dataset: Optional["PromptDataset"]
    sampler: Optional["PromptSampler"]
    eval_items: Optional[list]
    stats: dict
    trajectories: Optional[Any] = None
    trajectory_sampler: Optional["PromptSampler"] = None


def load_training_data(cfg, tokenizer: Any, pad_id: int = 0, eot_id: Optional[int] = None) -> TrainingData:
    """The `data` and `eval` sections of a Config -> TrainingData (rank 0 only in the trainer).
    Evaluation prompts longer than data.max_prompt_tokens are skipped with a warning."""
    from ..log import get_logger

    log = get_logger(__name__)
    d, e = cfg.data, cfg.eval
    fresh, from_files = cfg.samples_per_step()
    data = TrainingData(None, None, None, {})
    if fresh:
        data.dataset = PromptDataset(d.train_path, tokenizer, d.prompt_key, d.answer_key, d.system_prompt,
                                     d.max_prompt_tokens, d.strict, strip_instruction=d.strip_instruction, dedupe=d.dedupe)
        data.sampler = PromptSampler(data.dataset, fresh, seed=d.seed, shuffle=d.shuffle)
        st = data.dataset.stats
        log.info(f"data: {st.rows} rows -> {len(data.dataset)} prompts ({st.duplicates} duplicates dropped, "
                 f"{st.bad} bad rows, {st.too_long} too long, {st.instruction_stripped} instructions stripped)")
        data.stats.update(data_rows=float(st.rows), data_rows_skipped=float(st.bad),
                          data_rows_duplicate=float(st.duplicates), data_prompts_too_long=float(st.too_long),
                          data_prompts=float(len(data.dataset)))
        if e.every and (e.path or d.eval_path):
            items = load_eval_items(e.path or d.eval_path, tokenizer, e.prompt_key, e.answer_key, d.system_prompt)
            fit = [it for it in items if len(it.prompt_ids) <= d.max_prompt_tokens]
            if len(fit) < len(items):
                log.warning(f"eval: skipped {len(items) - len(fit)} prompts longer than "
                            f"data.max_prompt_tokens={d.max_prompt_tokens}")
            data.eval_items = fit[: e.max_problems]
    if from_files:
        from .trajectories import TrajectoryDataset

        data.trajectories = TrajectoryDataset(d.trajectories, tokenizer, pad_id, d.system_prompt, eot_id,
                                              max_tokens=d.max_prompt_tokens + cfg.rollout.max_tokens)
        data.trajectory_sampler = PromptSampler(data.trajectories.samples, from_files, seed=d.seed, shuffle=d.shuffle)
        ts = data.trajectories.stats
        log.info(f"trajectories: {ts.rows} rows in {len(data.trajectories.files)} file(s) -> {len(data.trajectories)} "
                 f"samples ({ts.bad} bad: {ts.reasons}); {from_files} per step, {fresh} fresh prompts per step")
        data.stats.update(trajectory_rows=float(ts.rows), trajectory_rows_skipped=float(ts.bad))
    return data


@dataclasses.dataclass
class DataLoaded:
    """What every rank learns from rank 0's load: sampler positions and load counts."""

    sampler_state: dict
    stats: dict
    trajectory_sampler_state: Optional[dict] = None


@dataclasses.dataclass
class DataLoadFailed:
    error: str


def load_on_rank0(cfg, tokenizer: Any, pad_id: int, eot_id: Optional[int],
                  is_main: bool) -> tuple[Optional[TrainingData], DataLoaded]:
    """Only rank 0 reads, templates and tokenizes the prompts (load_training_data) and
    broadcasts the sampler positions and counts; (rank 0's TrainingData or None, DataLoaded) on
    every rank. A loading error on rank 0 reaches every rank as RuntimeError (no rank is left
    waiting in the broadcast); rank 0 raises its own."""
    import torch.distributed as dist

    msg: list[Any] = [None]
    data = None
    if is_main:
        try:
            data = load_training_data(cfg, tokenizer, pad_id, eot_id)
        except Exception as e:
            dist.broadcast_object_list([DataLoadFailed(f"{type(e).__name__}: {e}")], src=0)
            raise
        msg = [DataLoaded(data.sampler.state_dict() if data.sampler else {}, data.stats,
                          data.trajectory_sampler.state_dict() if data.trajectory_sampler else None)]
    dist.broadcast_object_list(msg, src=0)
    if isinstance(msg[0], DataLoadFailed):
        raise RuntimeError(f"rank 0 could not load the data: {msg[0].error}")
    return data, msg[0]
