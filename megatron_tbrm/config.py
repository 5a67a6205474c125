"""Typed run configuration: a dataclass tree loaded from YAML recipes (recipe.py: inheritance,
`key.sub=value` overrides, interpolation).

Everything is validated once, at start, before any process-group work; errors name the
dotted key, the value given and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union


class ConfigError(ValueError):
    """A configuration problem, reported before anything starts."""


@dataclass
class ModelSection:
    path: str = ""  # Hugging Face model folder (config.json, safetensors, tokenizer)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "mxfp8", "blockwise"] = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: Literal["max", "most_recent"] = "max"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    make_vocab_size_divisible_by: int = 128
    recompute: Literal["none", "selective", "full"] = "none"
    # Policy-preserving shift of V_theta(s_1): subtract the base model's mean V(s_1) from an
    # output-layer bias so r/beta dominates (shared/notes/tbrm.md). Off for paper fidelity.
    value_offset: bool = False


@dataclass
class ParallelSection:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline stages per rank (interleaved 1F1B)
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = True
    seed: int = 1234


@dataclass
class ReplaySection:
    # Experience replay (TBRM only; data/replay.py): the last `size` fresh rollouts (successes
    # only, reward > 0, with successes_only) are kept and `per_step` of them are added to every
    # step's batch once that many are held. per_step 0: off. The residual needs no correction.
    size: int = 0
    per_step: int = 0
    successes_only: bool = True


@dataclass
class DataSection:
    train_path: str = ""
    eval_path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    system_prompt: Optional[str] = "Please reason step by step, and put your final answer within \\boxed{}."
    max_prompt_tokens: int = 512
    shuffle: bool = True
    seed: int = 0
    strict: bool = False
    # Train on the raw problem: user turns wrapped in DAPO-Math-17k's instruction ("... the last
    # line of your response should be of the form Answer: $Answer ...") keep only the problem.
    strip_instruction: bool = False
    dedupe: bool = True  # drop rows whose prompt and answer repeat an earlier row's (counted)
    # Off-policy TBRM: train on saved trajectories (rollout.save files, or any JSONL/Parquet with
    # prompt, response and reward; a path or a glob). trajectory_fraction of each step's samples
    # come from them; 1.0: no vLLM server at all.
    trajectories: Optional[str] = None
    trajectory_fraction: float = 1.0
    replay: ReplaySection = field(default_factory=ReplaySection)


@dataclass
class WeightSyncSection:
    # shm: same host; http: any host, slow (base64); nccl (GPUs) / gloo (CPU): a broadcast
    # group from trainer rank 0 to every vLLM worker, any host (weight_sync.py).
    transport: Literal["http", "shm", "nccl", "gloo"] = "shm"
    bucket_mb: int = 512
    # Collective transports: the address the vLLM workers reach trainer rank 0 at (default
    # 127.0.0.1 for a server the trainer starts, this host's name-resolved address when
    # attached to rollout.server_url), and its port (0: a free one, picked at each connect;
    # else engine i's group uses master_port + i).
    master_address: Optional[str] = None
    master_port: int = 0
    # What a push does to requests in flight (overlapped rollouts): wait = they finish on the
    # old weights first; keep = frozen and continued on the new ones; abort = dropped.
    pause_mode: Literal["wait", "keep", "abort"] = "wait"


@dataclass
class RolloutSection:
    server_url: Optional[str] = None  # attach to a running server instead of starting one
    server_urls: list[str] = field(default_factory=list)  # attach to several (one engine each)
    # vLLM engines the trainer starts (rank 0, on node 0): on GPUs engine i gets its own
    # tensor_parallel_size devices (CUDA_VISIBLE_DEVICES); requests go to the engine with the
    # fewest in flight, every push reaches every engine. auto: the local GPUs // tensor_parallel_size
    # (1 without CUDA), or the number of server URLs when attached.
    engines: Union[int, Literal["auto"]] = 1
    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port (else engine i listens on port + i)
    n: int = 1  # samples per prompt (TBRM's default is 1)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 2048
    stop: list[str] = field(default_factory=list)
    # Token ids that end a response besides the model's EOS. None: the chat template's end of
    # turn (`<|im_end|>` for Qwen2.5 base models, whose EOS is `<|endoftext|>`); []: none.
    stop_token_ids: Optional[list[int]] = None
    max_concurrency: int = 64  # requests in flight per engine
    max_model_len: int = 4096
    kv_cache_bytes: Optional[int] = None
    gpu_memory_utilization: float = 0.5
    max_num_seqs: int = 256
    tensor_parallel_size: int = 1
    dtype: Optional[str] = None  # default: the trainer's model.dtype
    extra_args: list[str] = field(default_factory=list)
    # CPU only (ignored with CUDA): seconds vLLM's message-queue readers (EngineCore, worker) spin
    # after each read before sleeping; vLLM hard-codes 1 s, which takes the trainer's cores during
    # every update on a CPU-only machine (rollout/vllm_cpu_patches.py). null: vLLM's 1 s.
    shm_busy_loop_s: Optional[float] = 0.05
    startup_timeout_s: float = 600.0
    request_timeout_s: float = 600.0
    max_restarts: int = 3  # consecutive server failures survived (restart + redo the batch)
    save: bool = False  # write every step's trajectories to <run.dir>/rollouts/step_N.jsonl
    # vLLM's sleep mode, colocated with the trainer: every engine sleeps after each rollout (its KV
    # cache and weights leave the GPU during the update) and wakes before the push. auto: when
    # the trainer starts the engines on GPUs and rollouts do not overlap the update. always: also
    # when attached (the servers must have --enable-sleep-mode); on CPU the calls are made but do
    # nothing (vLLM refuses the flag there). never. (Not on/off: YAML reads those as booleans.)
    sleep_mode: Literal["auto", "always", "never"] = "auto"
    weight_sync: WeightSyncSection = field(default_factory=WeightSyncSection)

    @property
    def attach_urls(self) -> list[str]:
        """The servers to attach to (rollout.server_url, then rollout.server_urls); [] when the
        trainer starts its own engines."""
        return ([self.server_url] if self.server_url else []) + list(self.server_urls)

    def engine_count(self, local_gpus: int = 0) -> int:
        """How many engines run: the attached URLs, or `engines` (auto: local_gpus //
        tensor_parallel_size, at least 1)."""
        if self.attach_urls:
            return len(self.attach_urls)
        if self.engines == "auto":
            return max(1, local_gpus // max(self.tensor_parallel_size, 1))
        return self.engines


@dataclass
class RewardSection:
    name: str = "math"
    timeout_s: float = 5.0
    workers: int = 2


@dataclass
class LossSection:
    name: Literal["tbrm", "grpo"] = "tbrm"
    beta: float = 0.002
    # GRPO only
    clip_eps: float = 0.2
    kl_coef: float = 0.001
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    # PPO's pi_old in the ratio: the sampler's log-probs ("rollout": the off-policy correction
    # for stale rollouts), or the trainer's own before the update ("recompute", as verl does:
    # with train.max_staleness > 0 that is the current policy, i.e. no correction)
    old_logprobs: Literal["rollout", "recompute"] = "rollout"


@dataclass
class OptimSection:
    lr: float = 2.5e-6
    min_lr: float = 0.0
    warmup_steps: int = 0
    decay: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainSection:
    steps: int = 760
    prompts_per_step: int = 128
    micro_batch_size: int = 4  # rows per micro-batch when max_tokens_per_microbatch is null
    # Micro-batches of at most this many positions (rows x padded length, or a packed row's
    # length) instead of micro_batch_size rows: every trajectory of the step is trained, each
    # DP rank runs the same number of micro-batches (microbatches.py). null: fixed rows.
    max_tokens_per_microbatch: Optional[int] = None
    # Several trajectories end to end in one row of up to max_tokens_per_microbatch positions,
    # attention confined to each (THD PackedSeqParams; needs max_tokens_per_microbatch).
    pack_sequences: bool = False
    ref_offload: bool = False  # keep the frozen reference model on CPU between uses
    max_bad_steps: int = 3  # non-finite losses in a row before the run stops
    # Megatron-LM's --exit-duration-in-mins: stop after the first step that ends this many
    # minutes after the trainer started (rank 0's clock, so every rank stops at the same step),
    # with the final evaluation and a checkpoint, e.g. ahead of a SLURM time limit. null: run
    # train.steps. train.steps still caps the run and sets the lr schedule.
    exit_duration_in_mins: Optional[float] = None
    # Rollouts for the next max_staleness steps are generated while the current update runs
    # (0: synchronous). TBRM needs no correction for the stale data; GRPO's ratio is taken
    # against the sampler's log-probs. TBRM has no trust region either: on the demo, lr 3e-4
    # learns with k=0 and collapses with k=1 and 2, lr 1.5e-4 learns with k=1 (docs/offpolicy.md).
    max_staleness: int = 0


@dataclass
class CheckpointSection:
    dir: Optional[str] = None  # default: <run.dir>/checkpoints
    save_every: int = 50
    # Delete all but the newest K complete checkpoints, each time after a newer one is
    # complete (a 7B checkpoint with optimizer state is ~100 GB); null: keep every one.
    keep_last: Optional[int] = None
    load: Optional[str] = None  # initial Megatron checkpoint (else the HF folder is loaded)


@dataclass
class EvalSection:
    every: int = 0  # 0: no evaluation during training
    path: Optional[str] = None
    # The evaluation file's own fields; null: detected like the benchmark loader does
    # (problem/question/prompt...; answer/final_answer/.../reward_model.ground_truth).
    prompt_key: Optional[str] = None
    answer_key: Optional[str] = None
    max_problems: int = 256
    temperature: float = 0.0
    max_tokens: int = 1024


@dataclass
class RunSection:
    dir: str = "runs/default"
    tensorboard: bool = True
    progress: bool = True  # a progress bar when stderr is a terminal (else one log line per step)
    wandb_project: Optional[str] = None  # log to Weights & Biases too (needs `pip install wandb`)
    wandb_mode: Literal["online", "offline"] = "online"  # offline: no network, `wandb sync` later
    wandb_name: Optional[str] = None  # the W&B run name (default: the run folder's name)


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    data: DataSection = field(default_factory=DataSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    reward: RewardSection = field(default_factory=RewardSection)
    loss: LossSection = field(default_factory=LossSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    eval: EvalSection = field(default_factory=EvalSection)
    run: RunSection = field(default_factory=RunSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def samples_per_step(self) -> tuple[int, int]:
        """(fresh prompts, trajectory-file samples) per step: data.trajectory_fraction of
        train.prompts_per_step prompts' worth of samples (x rollout.n) come from the files."""
        total = self.train.prompts_per_step
        if not self.data.trajectories:
            return total, 0
        from_files = max(1, round(self.data.trajectory_fraction * total))
        return total - from_files, from_files * self.rollout.n

    def trajectories_per_step(self) -> int:
        """Trajectories in a step's update once the replay buffer is full: train.prompts_per_step
        x rollout.n (fresh and trajectory-file samples) plus data.replay.per_step."""
        return self.train.prompts_per_step * self.rollout.n + self.data.replay.per_step

    def engines_sleep(self, cuda: bool) -> bool:
        """Whether the vLLM engines sleep during the update (rollout.sleep_mode): always, or
        auto on GPUs (`cuda`) when the trainer starts them and rollouts do not overlap the
        update (train.max_staleness 0)."""
        r = self.rollout
        return r.sleep_mode == "always" or (r.sleep_mode == "auto" and cuda and not r.attach_urls
                                            and not self.train.max_staleness)

    @property
    def fresh_rollouts(self) -> bool:
        """False when every sample comes from data.trajectories: no prompts, no vLLM server."""
        return self.samples_per_step()[0] > 0


# ----------------------------------------------------------------------------- loading


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", bool: "true/false", str: "a string"}.get(tp, str(tp))


_YAML12_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, tp, key: str):
    """Check `value` against the annotation `tp`; returns the value (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # PyYAML follows YAML 1.1, which reads 1e-3 (no dot) as a string; YAML 1.2 and users
        # read it as a number.
        if isinstance(value, str) and _YAML12_FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")


def _has_interpolation(value) -> bool:
    if isinstance(value, list):
        return any(_has_interpolation(v) for v in value)
    return isinstance(value, str) and "${" in value


def _closest(prefix: str, name, names: list[str]) -> str:
    """"did you mean 'section.key'? " for the allowed name most like `name` (difflib's ratio)."""
    closest = difflib.get_close_matches(str(name), names, n=1, cutoff=0.0)
    return f"did you mean '{prefix + '.' if prefix else ''}{closest[0]}'? " if closest else ""


def _nowhere(key: str) -> str:
    return ""


def _build(cls, data: Any, prefix: str, where=_nowhere, check_only: bool = False):
    """The dataclass `cls` from `data`, every key and value checked; errors end with where(key).
    check_only: a partial tree (one recipe file, before merging), values with interpolations
    left for later; returns None."""
    if not isinstance(data, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, got {data!r}{where(prefix)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names), key=str)  # YAML keys may be ints, null, ...
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown config key '{key}'{where(key)}: {_closest(prefix, unknown[0], names)}"
                          f"allowed keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, data[name], key, where, check_only)
        elif not (check_only and _has_interpolation(data[name])):
            try:
                kwargs[name] = _coerce(data[name], tp, key)
            except ConfigError as e:
                raise ConfigError(f"{e}{where(key)}") from None
    return None if check_only else cls(**kwargs)


def _check_tree(tree: dict, where) -> None:
    _build(Config, tree, "", where, check_only=True)


def load_config(path: Optional[str | os.PathLike] = None, overrides: list[str] = ()) -> Config:
    """Load the recipe `path` (or defaults) with its bases (recipe.py), apply `key.sub=value`
    overrides, resolve interpolations, type-check every key."""
    from .recipe import load_tree

    tree, where = load_tree(Path(path) if path is not None else None, list(overrides), _check_tree)
    return _build(Config, tree, "", where)


def validate(cfg: Config, world_size: Optional[int] = None) -> None:
    """Cross-field checks, once at start (validation.py). Raises ConfigError naming the key,
    the value and what is allowed."""
    from .validation import validate as _validate

    _validate(cfg, world_size)
