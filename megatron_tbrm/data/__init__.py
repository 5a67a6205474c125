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

__all__ = ["BadRow", "DAPO_INSTRUCTION_PREFIX", "DAPO_INSTRUCTION_SUFFIX", "LoadStats", "MirroredSampler", "PathLike",
           "PromptDataset", "PromptItem", "PromptSampler", "SYSTEM_PROMPT", "TrainingData", "check_prompt_fields",
           "get_field", "load_eval_items", "load_tokenizer", "load_training_data", "read_rows", "resolve_eval_fields",
           "strip_dapo_instruction", "to_messages"]


@dataclasses.dataclass
class TrainingData:
    """What rank 0 loads for a training run: the prompts, their sampler, the evaluation items
    (None without evaluation) and the load counts (floats, logged every step)."""

    dataset: "PromptDataset"
    sampler: "PromptSampler"
    eval_items: Optional[list]
    stats: dict


def load_training_data(cfg, tokenizer: Any) -> TrainingData:
    """The `data` and `eval` sections of a Config -> TrainingData (rank 0 only in the trainer).
    Evaluation prompts longer than data.max_prompt_tokens are skipped with a warning."""
    from ..log import get_logger

    log = get_logger(__name__)
    d, e = cfg.data, cfg.eval
    dataset = PromptDataset(d.train_path, tokenizer, d.prompt_key, d.answer_key, d.system_prompt, d.max_prompt_tokens,
                            d.strict, strip_instruction=d.strip_instruction, dedupe=d.dedupe)
    sampler = PromptSampler(dataset, cfg.train.prompts_per_step, seed=d.seed, shuffle=d.shuffle)
    eval_items = None
    if e.every and (e.path or d.eval_path):
        items = load_eval_items(e.path or d.eval_path, tokenizer, e.prompt_key, e.answer_key, d.system_prompt)
        fit = [it for it in items if len(it.prompt_ids) <= d.max_prompt_tokens]
        if len(fit) < len(items):
            log.warning(f"eval: skipped {len(items) - len(fit)} prompts longer than "
                        f"data.max_prompt_tokens={d.max_prompt_tokens}")
        eval_items = fit[: e.max_problems]
    st = dataset.stats
    log.info(f"data: {st.rows} rows -> {len(dataset)} prompts ({st.duplicates} duplicates dropped, {st.bad} bad rows, "
             f"{st.too_long} too long, {st.instruction_stripped} instructions stripped)")
    stats = {"data_rows": float(st.rows), "data_rows_skipped": float(st.bad), "data_rows_duplicate": float(st.duplicates),
             "data_prompts_too_long": float(st.too_long), "data_prompts": float(len(dataset))}
    return TrainingData(dataset, sampler, eval_items, stats)
