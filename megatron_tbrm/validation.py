"""Cross-field checks of a loaded Config, once at start and before any process-group work:
parallel layout against the world size and the model's shape (the model builder's own
check), the model folder's config.json through the builder's allow-list, data and evaluation
files and their fields, FP8 and transports against the hardware. Errors name the key, the
value and what is allowed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .config import Config, ConfigError


def _positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config key '{key}': got {value!r}, expected a {'non-negative' if allow_zero else 'positive'} number")


def _model_config_json(model_path: str) -> dict:
    """model.path's config.json, checked by the model builder's allow-list (model.read_hf_config)
    now rather than when the trainer builds the model: a field that changes the forward pass
    and that Megatron cannot carry stops the run here, with the file, key and value named."""
    from .model import ModelConfigError, read_hf_config

    cfg_file = Path(model_path) / "config.json"
    if not cfg_file.is_file():
        raise ConfigError(f"config key 'model.path': {model_path!r} has no config.json (expected a Hugging Face model folder)")
    try:
        hf = json.loads(cfg_file.read_text())
        read_hf_config(hf, where=str(cfg_file))
    except (ModelConfigError, ValueError) as e:
        raise ConfigError(f"config key 'model.path': {e}") from None
    return hf


def _check_layout(cfg: Config, hf: dict) -> None:
    """The model builder's own check (ModelConfig.check_parallel: TP divides the heads, the KV
    heads and the FFN; the pipeline stages divide the layers), named by config key."""
    from .model import ModelConfig, ModelConfigError

    par = cfg.parallel
    try:
        ModelConfig.from_hf(hf, source=str(Path(cfg.model.path) / "config.json")).check_parallel(par.tp, par.pp, par.vpp)
    except ModelConfigError as e:
        key = "parallel.pp" if "pipeline" in str(e) else "parallel.tp"
        raise ConfigError(f"config key '{key}': {e} (model {cfg.model.path})") from None


def _check_replay(cfg: Config) -> None:
    """data.replay: sizes, TBRM only, and fresh rollouts to fill the buffer (per_step 0: off).
    The split of the replayed trajectories into micro-batches is checked with the step's."""
    r = cfg.data.replay
    if r.size < 0 or r.per_step < 0:
        raise ConfigError(f"config keys 'data.replay.size' / 'data.replay.per_step': got {r.size} / {r.per_step}; "
                          "must be >= 0 (per_step 0: no replay)")
    if not r.per_step:
        return
    if r.per_step > r.size:
        raise ConfigError(f"config keys 'data.replay.size' / 'data.replay.per_step': got {r.size} / {r.per_step}; "
                          "replay needs per_step <= size")
    if cfg.loss.name != "tbrm":
        raise ConfigError(f"config key 'data.replay': replayed (off-policy) trajectories are for loss.name=tbrm "
                          f"(got {cfg.loss.name!r}: GRPO's groups and ratios need fresh rollouts); "
                          "data.replay.per_step=0 turns replay off")
    if not cfg.fresh_rollouts:
        raise ConfigError("config key 'data.replay': the buffer holds fresh rollouts, and data.trajectory_fraction=1 "
                          "makes none (no vLLM server); data.replay.per_step=0 turns replay off")


def _check_token_budget(cfg: Config, seq: int, dp: int, trajectories: int) -> None:
    """train.max_tokens_per_microbatch / train.pack_sequences: a budget that holds the longest
    trajectory the rollout can make, and layouts the packed (THD) path supports."""
    from .microbatches import round_up

    t, par = cfg.train, cfg.parallel
    if t.max_tokens_per_microbatch is None:
        raise ConfigError("config key 'train.pack_sequences': true needs train.max_tokens_per_microbatch (the "
                          "length of a packed row), got null")
    if t.max_tokens_per_microbatch < round_up(seq):
        raise ConfigError(f"config key 'train.max_tokens_per_microbatch': got {t.max_tokens_per_microbatch}, must be "
                          f">= data.max_prompt_tokens + rollout.max_tokens = {seq} rounded up to 8 = {round_up(seq)} "
                          "(a trajectory is never split), or null for train.micro_batch_size rows")
    if t.pack_sequences and par.cp > 1:
        raise ConfigError(f"config key 'train.pack_sequences': true with parallel.cp={par.cp}: packed (THD) rows "
                          "under context parallelism are not supported; use parallel.cp=1 or pack_sequences=false")
    per_rank = par.pp if par.vpp else 1  # the interleaved schedule wants a multiple of PP micro-batches
    if trajectories < dp * per_rank:
        raise ConfigError(f"config keys 'train.prompts_per_step' x 'rollout.n' = {trajectories} trajectories are "
                          f"too few for {per_rank} micro-batch(es) on each of {dp} data-parallel rank(s)")


def _check_engines(cfg: Config) -> None:
    """rollout.engines against the server URLs and the local GPUs (CPU cores without CUDA): the
    engines the trainer starts each take rollout.tensor_parallel_size GPUs (cores) of their own."""
    r = cfg.rollout
    if r.engines != "auto" and r.engines < 1:
        raise ConfigError(f"config key 'rollout.engines': got {r.engines!r}, expected a positive integer or 'auto'")
    _positive("rollout.tensor_parallel_size", r.tensor_parallel_size)
    _positive("rollout.max_concurrency", r.max_concurrency)
    if r.shm_busy_loop_s is not None:
        _positive("rollout.shm_busy_loop_s", r.shm_busy_loop_s, allow_zero=True)
    if r.server_url and r.server_urls:
        raise ConfigError(f"config keys 'rollout.server_url'={r.server_url!r} and 'rollout.server_urls'="
                          f"{r.server_urls!r}: give the servers to attach to in one of them")
    urls = r.attach_urls
    if urls and r.engines not in ("auto", 1, len(urls)):
        raise ConfigError(f"config key 'rollout.engines': got {r.engines!r} with {len(urls)} server URL(s) to attach "
                          f"to: attached engines are the URLs (leave rollout.engines at 1 or 'auto', or set it to {len(urls)})")
    if len(set(urls)) < len(urls):
        raise ConfigError(f"config key 'rollout.server_urls': {urls!r} names a server twice")
    import torch

    if not urls and torch.cuda.is_available():
        gpus = torch.cuda.device_count()
        n = r.engine_count(gpus)
        if n * r.tensor_parallel_size > gpus:
            raise ConfigError(f"config keys 'rollout.engines' x 'rollout.tensor_parallel_size' = {n} x "
                              f"{r.tensor_parallel_size} = {n * r.tensor_parallel_size} GPUs, but this node has "
                              f"{gpus}: each engine needs GPUs of its own (use rollout.engines=auto for "
                              f"{max(gpus // r.tensor_parallel_size, 1)})")
    elif not urls:
        cores = len(os.sched_getaffinity(0))
        n = r.engine_count(0)
        if n > 1 and n * r.tensor_parallel_size > cores:
            raise ConfigError(f"config keys 'rollout.engines' x 'rollout.tensor_parallel_size' = {n} x "
                              f"{r.tensor_parallel_size} = {n * r.tensor_parallel_size} CPU workers, but this process "
                              f"may use {cores} cores: each engine's workers need cores of their own "
                              f"(engines sharing cores run slower than one; docs/throughput.md)")


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-field checks. Raises ConfigError naming the key, the value and what is allowed."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    par = cfg.parallel
    for key in ("tp", "pp", "cp"):
        _positive(f"parallel.{key}", getattr(par, key))
    model_parallel = par.tp * par.pp * par.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"config keys 'parallel.tp' x 'parallel.pp' x 'parallel.cp' = {par.tp} x {par.pp} x {par.cp} "
            f"= {model_parallel} does not divide the world size {world_size}"
        )
    if par.vpp is not None and (par.vpp < 1 or par.pp == 1):
        raise ConfigError(f"config key 'parallel.vpp': got {par.vpp!r}; virtual stages need parallel.pp > 1 and vpp >= 1")
    if par.sequence_parallel and par.tp == 1:
        raise ConfigError("config key 'parallel.sequence_parallel': true needs parallel.tp > 1")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        raise ConfigError(f"config key 'checkpoint.keep_last': got {cfg.checkpoint.keep_last}; "
                          "must be >= 1 (or null to keep every checkpoint)")
    if cfg.rollout.sleep_mode == "always" and cfg.train.max_staleness:
        raise ConfigError(f"config key 'rollout.sleep_mode': 'always' with train.max_staleness={cfg.train.max_staleness}: "
                          "the server cannot sleep while it generates the next steps' rollouts during the update")
    if cfg.train.exit_duration_in_mins is not None and not cfg.train.exit_duration_in_mins > 0:
        raise ConfigError(f"config key 'train.exit_duration_in_mins': got {cfg.train.exit_duration_in_mins}; "
                          "must be > 0 (minutes), or null to run train.steps")
    if cfg.train.max_staleness < 0:
        raise ConfigError(f"config key 'train.max_staleness': got {cfg.train.max_staleness}; must be >= 0")
    _check_replay(cfg)
    if cfg.data.trajectories is not None:
        if not 0.0 < cfg.data.trajectory_fraction <= 1.0:
            raise ConfigError(f"config key 'data.trajectory_fraction': got {cfg.data.trajectory_fraction}; must be in (0, 1]")
        if cfg.loss.name != "tbrm":
            raise ConfigError(f"config key 'data.trajectories': off-policy data is for loss.name=tbrm (got "
                              f"{cfg.loss.name!r}: GRPO's groups and ratios need fresh rollouts)")
        from .data.trajectories import resolve_trajectory_files

        try:
            resolve_trajectory_files(cfg.data.trajectories)
        except FileNotFoundError as e:
            raise ConfigError(f"config key 'data.trajectories': {e}") from None
    _check_engines(cfg)
    if cfg.rollout.weight_sync.transport == "nccl":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("config key 'rollout.weight_sync.transport': 'nccl' needs GPUs on the trainer and "
                              "the vLLM workers; without CUDA use 'gloo' (the same broadcast code path) or 'shm'")
        if not cfg.rollout.attach_urls:
            raise ConfigError("config key 'rollout.weight_sync.transport': 'nccl' with engines the trainer starts: "
                              "engine 0 runs on GPU 0 with trainer rank 0, and NCCL refuses two members of a group "
                              "on one GPU ('Duplicate GPU detected'); use 'shm' (same node) or 'gloo', or nccl with "
                              "servers on other GPUs (rollout.server_url / rollout.server_urls)")

    if not cfg.model.path:
        raise ConfigError("config key 'model.path' is required: a Hugging Face model folder")
    hf = _model_config_json(cfg.model.path)
    _check_layout(cfg, hf)
    max_pos = hf.get("max_position_embeddings")
    seq = cfg.data.max_prompt_tokens + cfg.rollout.max_tokens
    if max_pos is not None and seq > max_pos:
        raise ConfigError(
            f"config keys 'data.max_prompt_tokens' + 'rollout.max_tokens' = {seq} exceed the model's "
            f"max_position_embeddings={max_pos} ({cfg.model.path})"
        )
    if cfg.rollout.max_model_len < seq:
        raise ConfigError(f"config key 'rollout.max_model_len': got {cfg.rollout.max_model_len}, must be >= data.max_prompt_tokens + rollout.max_tokens = {seq}")

    if cfg.model.fp8 is not None:
        from .model import check_fp8_available

        check_fp8_available(cfg.model.fp8)

    if cfg.fresh_rollouts and not cfg.data.train_path:
        raise ConfigError("config key 'data.train_path' is required: a JSONL or Parquet prompt file")
    if cfg.data.train_path and not Path(cfg.data.train_path).is_file():
        raise ConfigError(f"config key 'data.train_path': file not found: {cfg.data.train_path}")
    for key in ("data.eval_path", "eval.path"):
        sec, name = key.split(".")
        p = getattr(getattr(cfg, sec), name)
        if cfg.eval.every and p is not None and not Path(p).is_file():  # read only when evaluating
            raise ConfigError(f"config key '{key}': file not found: {p}")
    from .data import check_prompt_fields, resolve_eval_fields

    try:  # the fields, on the first rows: "no usable prompts" is found here, before any model
        if cfg.data.train_path:
            check_prompt_fields(cfg.data.train_path, cfg.data.prompt_key, cfg.data.answer_key)
    except ValueError as e:
        raise ConfigError(f"config keys 'data.prompt_key'={cfg.data.prompt_key!r} / 'data.answer_key'="
                          f"{cfg.data.answer_key!r} (data.train_path): {e}") from None
    eval_path = cfg.eval.path or cfg.data.eval_path
    if cfg.eval.every and eval_path:
        try:
            resolve_eval_fields(eval_path, cfg.eval.prompt_key, cfg.eval.answer_key)
        except ValueError as e:
            raise ConfigError(f"config keys 'eval.prompt_key'={cfg.eval.prompt_key!r} / 'eval.answer_key'="
                              f"{cfg.eval.answer_key!r} (evaluation file): {e}") from None

    _positive("rollout.n", cfg.rollout.n)
    _positive("rollout.max_tokens", cfg.rollout.max_tokens)
    _positive("rollout.temperature", cfg.rollout.temperature, allow_zero=True)
    if not 0 < cfg.rollout.top_p <= 1:
        raise ConfigError(f"config key 'rollout.top_p': got {cfg.rollout.top_p}, expected 0 < top_p <= 1")
    _positive("loss.beta", cfg.loss.beta)
    _positive("optim.lr", cfg.optim.lr)
    _positive("optim.clip_grad", cfg.optim.clip_grad, allow_zero=True)
    _positive("train.steps", cfg.train.steps, allow_zero=True)
    _positive("train.prompts_per_step", cfg.train.prompts_per_step)
    _positive("train.micro_batch_size", cfg.train.micro_batch_size)
    _positive("checkpoint.save_every", cfg.checkpoint.save_every, allow_zero=True)
    if cfg.loss.name == "grpo" and cfg.rollout.n < 2:
        raise ConfigError(f"config key 'rollout.n': got {cfg.rollout.n}; loss.name=grpo needs n >= 2 samples per prompt")
    dp = world_size // model_parallel
    trajectories = cfg.train.prompts_per_step * cfg.rollout.n
    if cfg.train.max_tokens_per_microbatch is not None or cfg.train.pack_sequences:
        _check_token_budget(cfg, seq, dp, trajectories)
    else:
        # fixed rows: a step trains a multiple of dp x micro-batch (x pp with interleaving,
        # whose schedule wants a multiple of pp micro-batches) trajectories; microbatches.py
        # drops the rest
        unit = dp * cfg.train.micro_batch_size * (par.pp if par.vpp else 1)
        split = (f"data-parallel size {dp} x 'train.micro_batch_size' {cfg.train.micro_batch_size}"
                 + (f" x 'parallel.pp' {par.pp} (interleaved schedule)" if par.vpp else ""))
        if trajectories % unit:
            raise ConfigError(f"config keys 'train.prompts_per_step' x 'rollout.n' = {trajectories} trajectories "
                              f"must split evenly into {split}")
        if cfg.data.replay.per_step % unit:
            raise ConfigError(f"config key 'data.replay.per_step': got {cfg.data.replay.per_step}; the replayed "
                              f"trajectories must split evenly into {split} (or set train.max_tokens_per_microbatch)")
