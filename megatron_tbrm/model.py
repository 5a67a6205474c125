"""Megatron-core GPTModel for the Llama and Qwen2 families, from a typed config.

The architecture comes from a Hugging Face config.json (what users have for Qwen2.5-Math);
the layer spec is Transformer Engine's when TE is importable and a GPU is present, the local
(pure megatron-core) spec otherwise.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

from .hf_config import SUPPORTED_ARCHITECTURES, ModelConfigError, read_hf_config  # noqa: F401 (re-exported)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    family: Literal["qwen2", "llama"]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    # RoPE frequency scaling: "default" (none) or "llama3" (Llama 3.1/3.2; megatron-core's
    # RotaryEmbedding(rope_scaling=True), which fixes low/high_freq_factor 1/4 and original
    # context 8192: read_hf_config refuses other values).
    rope_type: Literal["default", "llama3"] = "default"
    rope_scaling_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    head_dim: Optional[int] = None
    initializer_range: float = 0.02
    # Trainer-side settings (not part of the HF architecture).
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    make_vocab_size_divisible_by: int = 128
    fp8: Optional[Literal["hybrid", "e4m3"]] = None
    fp8_recipe: str = "delayed"
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    recompute: Literal["none", "selective", "full"] = "none"
    hf_config: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_section(cls, section) -> "ModelConfig":
        """From the config's `model` section: the architecture of `section.path` (from_hf) with
        every trainer-side field of the section (dtype, fp8, recompute, ...) carried by name."""
        import dataclasses

        own = {f.name for f in dataclasses.fields(cls)}
        return cls.from_hf(section.path, **{f.name: getattr(section, f.name) for f in dataclasses.fields(section)
                                             if f.name in own})

    @classmethod
    def from_hf(cls, path: "str | Path | dict", source: Optional[str] = None, **overrides) -> "ModelConfig":
        """The architecture of a Qwen2 or Llama model from its Hugging Face config.

        `path`: a model folder (reads `path/config.json`), a .json file (e.g. a checkpoint's
        hf_config.json) or an already-parsed dict (`source` names it in errors). `overrides` set
        trainer-side fields (dtype, fp8, ...).

        Every top-level key (and every key of `rope_parameters` / `rope_scaling`) goes through one
        allow-list, `read_hf_config`: it is carried into Megatron, known not to change the forward
        pass, or refused. Raises ModelConfigError naming the file, the key and the value for a
        missing file, an unsupported architecture, an unknown key, or a value Megatron cannot
        reproduce (see read_hf_config).
        """
        if isinstance(path, dict):
            hf, where = path, source or "<dict>"
        else:
            cfg_file = Path(path)
            if cfg_file.is_dir() or not cfg_file.suffix == ".json":
                cfg_file = cfg_file / "config.json"
            if not cfg_file.is_file():
                raise ModelConfigError(f"{cfg_file} not found: expected a Hugging Face model folder")
            hf = json.loads(cfg_file.read_text())
            where = source or str(cfg_file)
        cfg = cls(**read_hf_config(hf, where), hf_config=hf)
        for k, v in overrides.items():
            if not hasattr(cfg, k):
                raise ModelConfigError(f"unknown model setting {k!r}")
            setattr(cfg, k, v)
        return cfg

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Megatron's vocabulary padding: a multiple of make_vocab_size_divisible_by x TP."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def check_parallel(self, tp: int, pp: int = 1, vpp: Optional[int] = None) -> None:
        """Raises ModelConfigError when megatron-core cannot split this model over TP x PP (x VPP):
        TP must divide the heads and the KV heads (megatron-core splits whole query groups; it
        cannot replicate KV heads) and the FFN; the pipeline stages must divide the layers. The
        one copy of this check (config validation and the converters call it too)."""
        if self.num_attention_heads % tp:
            raise ModelConfigError(f"tensor parallel size {tp} does not divide num_attention_heads={self.num_attention_heads}")
        if self.num_kv_heads % tp:  # megatron-core shards KV groups; it does not replicate them
            raise ModelConfigError(f"tensor parallel size {tp} does not divide num_key_value_heads={self.num_kv_heads}")
        if self.ffn_hidden_size % tp:
            raise ModelConfigError(f"tensor parallel size {tp} does not divide intermediate_size={self.ffn_hidden_size}")
        stages = pp * (vpp or 1)
        if self.num_layers % stages:
            raise ModelConfigError(f"{stages} pipeline stages ({pp} x {vpp or 1} virtual) do not divide "
                                   f"num_hidden_layers={self.num_layers}")


def te_available() -> bool:
    """Transformer Engine is usable: importable and a GPU present (it fails to import without CUDA)."""
    if not torch.cuda.is_available() or importlib.util.find_spec("transformer_engine") is None:
        return False
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def check_fp8_available(fp8: Optional[str]) -> None:
    if fp8 is None:
        return
    if not torch.cuda.is_available():
        raise ModelConfigError(f"fp8={fp8!r} needs a GPU: FP8 runs through Transformer Engine's CUDA kernels, and no GPU is visible")
    if not te_available():
        raise ModelConfigError(f"fp8={fp8!r} needs Transformer Engine (transformer_engine.pytorch), which is not importable here")
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < (8, 9):
        raise ModelConfigError(f"fp8={fp8!r} needs an Ada/Hopper-class GPU (compute capability >= 8.9); this one is {major}.{minor}")


def use_te(cfg: ModelConfig) -> bool:
    if cfg.transformer_impl == "local":
        return False
    if cfg.transformer_impl == "transformer_engine":
        if not te_available():
            raise ModelConfigError("transformer_impl='transformer_engine' needs Transformer Engine and a GPU")
        return True
    return te_available()


def transformer_config(cfg: ModelConfig, tp: int, pp: int, vpp: Optional[int] = None, sequence_parallel: bool = False,
                       init_weights: bool = True):
    """The megatron-core TransformerConfig for `cfg` at this parallel layout.

    `init_weights=False` sets perform_initialization=False: weights are allocated
    (torch.empty) but not drawn, for callers that load every weight afterwards.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg.check_parallel(tp, pp, vpp)
    check_fp8_available(cfg.fp8)
    dtype = DTYPES[cfg.dtype]
    recompute = {} if cfg.recompute == "none" else {"recompute_granularity": cfg.recompute}
    if cfg.recompute == "full":
        recompute.update(recompute_method="uniform", recompute_num_layers=1)
    fp8 = {}
    if cfg.fp8 is not None:
        fp8 = dict(
            fp8=cfg.fp8,
            fp8_recipe=cfg.fp8_recipe,
            fp8_amax_history_len=cfg.fp8_amax_history_len,
            fp8_amax_compute_algo=cfg.fp8_amax_compute_algo,
        )
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_kv_heads,
        kv_channels=cfg.kv_channels,
        ffn_hidden_size=cfg.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=cfg.initializer_range,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        sequence_parallel=sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=cfg.dtype == "bf16",
        fp16=cfg.dtype == "fp16",
        # Initialise full weights on CPU, then shard: identical weights for every TP size.
        use_cpu_initialization=True,
        perform_initialization=init_weights,
        # Fusions that need CUDA kernels (or apex) are off; TE brings its own fused paths.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        # Each micro-batch's loss is a sum; the schedule divides by the global item count.
        calculate_per_token_loss=True,
        **recompute,
        **fp8,
    )


_CAUSAL: dict = {}  # device -> the largest causal mask built there


def causal_mask(length: int, device) -> torch.Tensor:
    """[1, 1, length, length] bool, True above the diagonal (megatron-core's masks mark the
    excluded entries True, attention_mask_func): a view of one mask per device, grown to the
    longest length asked for. (megatron-core's own default mask is cached per length without
    bound, which the many lengths of packed trajectories would fill.)"""
    m = _CAUSAL.get(str(device))
    if m is None or m.shape[0] < length:
        m = _CAUSAL[str(device)] = torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
    return m[:length, :length][None, None]


@functools.cache
def _packed_attention_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class PackedDotProductAttention(DotProductAttention):
        """The local spec's attention, also over THD-packed rows (microbatches.pack).

        megatron-core's DotProductAttention refuses PackedSeqParams. With them, SelfAttention
        hands over q, k, v as [t, heads, dim] with RoPE already applied per segment; this is
        attention under the row's block-diagonal causal mask, computed one diagonal block (one
        segment, causal) at a time: the blocks off the diagonal are all masked, and skipping
        them costs sum_i s_i^2 instead of T^2 (as Transformer Engine's THD attention does).
        Returns [t, 1, hidden], what SelfAttention reshapes THD output to. Without
        PackedSeqParams: unchanged."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None:
                return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed rows need qkv_format='thd', got {packed_seq_params.qkv_format!r}")
            bounds = packed_seq_params.cu_seqlens_q.tolist()
            return torch.cat([
                super(PackedDotProductAttention, self).forward(
                    query[a:b].unsqueeze(1), key[a:b].unsqueeze(1), value[a:b].unsqueeze(1),
                    causal_mask(b - a, query.device), attn_mask_type, attention_bias)
                for a, b in zip(bounds[:-1], bounds[1:])
            ])

    return PackedDotProductAttention


def layer_spec(cfg: ModelConfig):
    """Transformer Engine's spec (it takes THD-packed rows itself), or the local spec with
    `PackedDotProductAttention` so that it takes them too."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te(cfg):
        return get_gpt_layer_with_transformer_engine_spec()
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = _packed_attention_class()
    return spec


def _cast_parameters(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Every parameter of `model` in `dtype`, buffers untouched.

    The local spec's norms are torch norms that megatron-core builds without params_dtype, so in
    a bf16/fp16 model their weights stay fp32 (Transformer Engine's norms follow params_dtype).
    The distributed optimizer then holds a parameter group mixing fp32 and 16-bit parameters and
    its checkpoint save indexes the group's main parameters in the wrong order (a size mismatch
    in `get_parameter_state_dp_zero`, megatron-core 0.16). Megatron-LM avoids it by wrapping the
    model in Float16Module (`module.bfloat16()`); here only the parameters are cast, so buffers
    keep their dtype and the logits are not converted to fp32 in full (vocab_parallel.py upcasts
    them in chunks).
    """
    for p in model.parameters():
        if p.dtype != dtype:
            p.data = p.data.to(dtype)


def build_model(
    cfg: ModelConfig,
    *,
    sequence_parallel: bool = False,
    wrap_ddp: bool = False,
    ddp_config=None,
    init_weights: bool = True,
) -> list:
    """Build this rank's model chunks (one per virtual pipeline stage) at the current layout.

    Requires megatron_tbrm.parallel.init_distributed() first. Returns plain GPTModels, or
    megatron-core DDP-wrapped ones when `wrap_ddp` (the trainer's path).

    `init_weights=False` skips the random initialisation (megatron-core's
    perform_initialization): the weights hold whatever torch.empty gave (norm weights are
    still 1, biases uninitialised). Only for callers that then overwrite every parameter:
    hf_mapping.import_hf_weights (which fails on any parameter it has no HF tensor for),
    checkpoint.load_checkpoint, Engine.load_state_from (strict).
    """
    from megatron.core import parallel_state as mpu
    from megatron.core.models.gpt import GPTModel

    tp = mpu.get_tensor_model_parallel_world_size()
    pp = mpu.get_pipeline_model_parallel_world_size()
    vpp = mpu.get_virtual_pipeline_model_parallel_world_size()
    tcfg = transformer_config(cfg, tp, pp, vpp, sequence_parallel, init_weights=init_weights)
    spec = layer_spec(cfg)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        model = GPTModel(
            config=tcfg,
            transformer_layer_spec=spec,
            vocab_size=cfg.padded_vocab_size(tp),
            max_sequence_length=cfg.max_position_embeddings,
            pre_process=mpu.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
            post_process=mpu.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
            parallel_output=True,
            share_embeddings_and_output_weights=cfg.tie_word_embeddings,
            position_embedding_type="rope",
            # A float: int() would silently truncate a fractional rope_theta.
            rotary_base=cfg.rope_theta,
            rope_scaling=cfg.rope_type == "llama3",
            rope_scaling_factor=cfg.rope_scaling_factor,
            vp_stage=stage,
        )
        model.to(device)
        _cast_parameters(model, DTYPES[cfg.dtype])
        chunks.append(model)
    if wrap_ddp:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = ddp_config or DistributedDataParallelConfig(grad_reduce_in_fp32=True)
        chunks = [
            DistributedDataParallel(config=tcfg, ddp_config=ddp_config, module=m, disable_bucketing=i > 0)
            for i, m in enumerate(chunks)
        ]
    return chunks


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model
