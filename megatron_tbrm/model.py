"""Megatron-core GPTModel for the Llama and Qwen2 families, from a typed config.

The architecture comes from a Hugging Face config.json (what users have for Qwen2.5-Math);
the layer spec is Transformer Engine's when TE is importable and a GPU is present, the local
(pure megatron-core) spec otherwise.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ModelConfigError(ValueError):
    """The model folder or the requested model settings are unusable."""


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


# ---------------------------------------------------------------------------------------
# Reading a Hugging Face config.json: one allow-list
#
# Every top-level key is in exactly one group below; a key in none of them is refused, so a
# field that changes the forward pass can never be silently dropped (an allow-list, not a
# deny-list). Defaults for absent keys are transformers' own class defaults (transformers 5
# Qwen2Config / LlamaConfig), so a minimal config.json means what it means to transformers
# and vLLM.

# Carried into ModelConfig (and from there into megatron-core's TransformerConfig / GPTModel).
HF_CARRIED = frozenset({
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
    "tie_word_embeddings", "initializer_range", "rope_theta", "rope_parameters", "rope_scaling",
})
# Read, and accepted only with the value Megatron computes (see _check_fixed / _check_sliding).
HF_CHECKED = frozenset({
    "hidden_act", "attention_dropout", "attention_bias", "mlp_bias", "use_mrope", "partial_rotary_factor",
    "use_sliding_window", "sliding_window", "max_window_layers", "layer_types",
})
# Known not to change the forward pass of the trained model: token ids, the storage dtype
# (the trainer chooses its own), bookkeeping, and `pretraining_tp` (transformers 5 and vLLM
# ignore it; transformers 4 only split the same matmuls into slices).
HF_NO_EFFECT = frozenset({
    "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version", "use_cache",
    "_name_or_path", "pretraining_tp", "output_attentions", "output_hidden_states", "return_dict",
})
# Keys allowed inside rope_parameters / rope_scaling, per rope_type.
_ROPE_KEYS = {
    "default": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor"}),
    "llama3": frozenset({"rope_type", "type", "rope_theta", "partial_rotary_factor", "factor", "low_freq_factor",
                         "high_freq_factor", "original_max_position_embeddings"}),
}
# megatron-core 0.16 RotaryEmbedding._apply_scaling hard-codes these three (only `factor` is a
# GPTModel argument); its formula is transformers' _compute_llama3_parameters line for line.
_MCORE_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

# transformers 5 class defaults for absent keys (None: derived, see read_hf_config).
_DEFAULTS = {
    "qwen2": dict(num_key_value_heads=32, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  initializer_range=0.02, sliding_window=4096, max_window_layers=28),
    "llama": dict(num_key_value_heads=None, max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                  initializer_range=0.02),
}
_DEFAULT_ROPE_THETA = 10000.0  # transformers' RotaryEmbeddingConfigMixin.default_theta


def _refuse(where: str, key: str, value, why: str) -> ModelConfigError:
    return ModelConfigError(f"{where}: {key}={value!r} {why}")


def _required(hf: dict, key: str, where: str):
    if key not in hf:  # transformers' class default would be some other model's size
        raise ModelConfigError(f"{where}: required key {key!r} is missing")
    return hf[key]


def _int(value, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _refuse(where, key, value, "is not a positive integer")
    return value


def _float(value, key: str, where: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (positive and not value > 0):
        raise _refuse(where, key, value, f"is not a {'positive ' if positive else ''}number")
    return float(value)


def _rope(hf: dict, where: str) -> dict:
    """rope_theta / rope_type / rope_scaling_factor from rope_parameters (transformers 5) or
    rope_scaling + rope_theta (transformers 4), combined the way transformers does it
    (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict): the dict's values win, then the
    top-level rope_theta, then 10000. Conflicting spellings are refused rather than guessed."""
    params, key = {}, "rope_parameters"
    scaling, new = hf.get("rope_scaling"), hf.get("rope_parameters")
    for name, value in (("rope_scaling", scaling), ("rope_parameters", new)):
        if value is not None and not isinstance(value, dict):
            raise _refuse(where, name, value, "is not a JSON object")
    if scaling and new and scaling != new:
        raise _refuse(where, "rope_scaling", scaling, f"conflicts with rope_parameters={new!r}; keep one of them")
    if scaling or new:
        params, key = dict(scaling or new), ("rope_scaling" if scaling else "rope_parameters")
    if "rope_type" in params and "type" in params and params["rope_type"] != params["type"]:
        raise _refuse(where, f"{key}.type", params["type"], f"conflicts with {key}.rope_type={params['rope_type']!r}")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in _ROPE_KEYS:
        raise _refuse(where, f"{key}.rope_type", rope_type,
                      f"is not supported: megatron-tbrm builds RoPE types {sorted(_ROPE_KEYS)} only")
    for k in params:
        if k not in _ROPE_KEYS[rope_type]:
            raise _refuse(where, f"{key}.{k}", params[k],
                          f"is not a parameter megatron-tbrm reads for rope_type {rope_type!r} "
                          f"(allowed: {sorted(_ROPE_KEYS[rope_type])}); it may change the forward pass, so it is refused")
    if "rope_theta" in params and "rope_theta" in hf and float(params["rope_theta"]) != float(hf["rope_theta"]):
        raise _refuse(where, "rope_theta", hf["rope_theta"], f"conflicts with {key}.rope_theta={params['rope_theta']!r}")
    theta = _float(params.get("rope_theta", hf.get("rope_theta", _DEFAULT_ROPE_THETA)), f"{key}.rope_theta", where)
    for name, value in ((f"{key}.partial_rotary_factor", params.get("partial_rotary_factor")),
                        ("partial_rotary_factor", hf.get("partial_rotary_factor"))):
        if value is not None and value != 1:
            raise _refuse(where, name, value, "is not supported: megatron-tbrm rotates the whole head (factor 1.0)")
    out = {"rope_theta": theta, "rope_type": rope_type, "rope_scaling_factor": 1.0}
    if rope_type == "llama3":
        for k in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            if k not in params:  # transformers' _compute_llama3_parameters needs every one
                raise ModelConfigError(f"{where}: {key}.{k} is missing (rope_type 'llama3' needs it)")
        out["rope_scaling_factor"] = _float(params["factor"], f"{key}.factor", where)
        for k, fixed in _MCORE_LLAMA3_FIXED.items():
            if _float(params[k], f"{key}.{k}", where) != fixed:
                raise _refuse(where, f"{key}.{k}", params[k],
                              f"is not supported: megatron-core's llama3 RoPE scaling fixes {k}={fixed:g} "
                              f"(RotaryEmbedding._apply_scaling takes only `factor`)")
    return out


def _check_sliding(hf: dict, family: str, layers: int, where: str) -> None:
    """transformers 5 Qwen2Config: sliding_window applies only with use_sliding_window, to the
    layers layer_types marks 'sliding_attention' (default: layers >= max_window_layers).
    Megatron here has full causal attention only: any sliding layer is refused."""
    use = hf.get("use_sliding_window", False)
    if not isinstance(use, bool):
        raise _refuse(where, "use_sliding_window", use, "is not true/false")
    window = hf.get("sliding_window", _DEFAULTS[family].get("sliding_window")) if use else None
    types = hf.get("layer_types")
    if types is None:
        first = hf.get("max_window_layers", _DEFAULTS[family].get("max_window_layers", 0))
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(layers)]
    elif not isinstance(types, list) or len(types) != layers:
        raise _refuse(where, "layer_types", types, f"is not a list of {layers} entries (num_hidden_layers)")
    bad = sorted({t for t in types if t != "full_attention"})
    if bad:
        key = "layer_types" if "layer_types" in hf else "use_sliding_window"
        raise _refuse(where, key, hf.get(key), f"makes layers use {bad} attention: only full causal attention is "
                      f"supported (sliding_window={window!r}, max_window_layers={hf.get('max_window_layers')!r})")
    if family == "llama" and (hf.get("sliding_window") is not None or use):
        raise _refuse(where, "sliding_window", hf.get("sliding_window"), "is not a Llama field; refusing to guess")


def _check_fixed(hf: dict, family: str, where: str) -> None:
    """Keys that must say what Megatron computes (the family's fixed architecture)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(where, "hidden_act", act, "is not supported: the MLP is SwiGLU (silu)")
    drop = hf.get("attention_dropout", 0.0)
    if isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop != 0:
        raise _refuse(where, "attention_dropout", drop, "is not supported: megatron-tbrm trains without dropout (0.0)")
    if hf.get("mlp_bias", False) is not False:
        raise _refuse(where, "mlp_bias", hf["mlp_bias"], "is not supported: the MLP has no biases")
    if hf.get("use_mrope", False) is not False:
        raise _refuse(where, "use_mrope", hf["use_mrope"], "is not supported: multimodal RoPE is not built")
    bias = hf.get("attention_bias")
    if family == "qwen2" and bias not in (None, True):
        # transformers and vLLM give Qwen2 q/k/v biases whatever this says: refuse the contradiction.
        raise _refuse(where, "attention_bias", bias, "contradicts the qwen2 family (q/k/v biases always present)")
    if family == "llama" and bias not in (None, False):
        # Llama's attention_bias adds o_proj.bias too, which has no Megatron counterpart here.
        raise _refuse(where, "attention_bias", bias, "is not supported for llama (it adds an o_proj bias that "
                      "megatron-core's local spec lacks)")


def read_hf_config(hf: dict, where: str = "<dict>") -> dict:
    """The ModelConfig architecture fields of a Hugging Face Qwen2/Llama config dict.

    Every key is either carried (HF_CARRIED), checked against the value Megatron computes
    (HF_CHECKED), or known not to change the forward pass (HF_NO_EFFECT); any other key is
    refused, as is a value Megatron cannot reproduce: an architecture other than
    Qwen2ForCausalLM / LlamaForCausalLM, hidden_act other than silu, attention dropout,
    MLP biases, multimodal RoPE, sliding-window layers, attention_bias contradicting the
    family, rope types other than default / llama3, llama3 parameters megatron-core fixes,
    partial rotary factors. Absent keys take transformers 5's class defaults. Raises
    ModelConfigError "<where>: <key>=<value> <why>".
    """
    if not isinstance(hf, dict):
        raise ModelConfigError(f"{where}: not a JSON object")
    archs = hf.get("architectures") or []
    family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if family is None:
        raise ModelConfigError(
            f"{where}: unsupported architecture {archs or hf.get('model_type')!r}; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if len(archs) != 1:
        raise _refuse(where, "architectures", archs, "must name exactly one architecture")
    if hf.get("model_type", family) != family:
        raise _refuse(where, "model_type", hf["model_type"], f"contradicts architectures={archs!r} ({family!r})")
    known = HF_CARRIED | HF_CHECKED | HF_NO_EFFECT
    for key in hf:
        if key not in known:
            raise _refuse(where, key, hf[key], "is not a config key megatron-tbrm knows: it may change the forward "
                          "pass, so it is refused (model.HF_CARRIED / HF_CHECKED / HF_NO_EFFECT list the known keys)")
    d = _DEFAULTS[family]
    heads = _int(_required(hf, "num_attention_heads", where), "num_attention_heads", where)
    layers = _int(_required(hf, "num_hidden_layers", where), "num_hidden_layers", where)
    kv = hf.get("num_key_value_heads", d["num_key_value_heads"])
    kv = heads if kv is None else _int(kv, "num_key_value_heads", where)
    head_dim = hf.get("head_dim")
    if head_dim is not None:
        head_dim = _int(head_dim, "head_dim", where)
    _check_fixed(hf, family, where)
    _check_sliding(hf, family, layers, where)
    tie = hf.get("tie_word_embeddings", d["tie_word_embeddings"])
    if not isinstance(tie, bool):
        raise _refuse(where, "tie_word_embeddings", tie, "is not true/false")
    return dict(
        family=family,
        vocab_size=_int(_required(hf, "vocab_size", where), "vocab_size", where),
        hidden_size=_int(_required(hf, "hidden_size", where), "hidden_size", where),
        num_layers=layers,
        num_attention_heads=heads,
        num_kv_heads=kv,
        ffn_hidden_size=_int(_required(hf, "intermediate_size", where), "intermediate_size", where),
        max_position_embeddings=_int(hf.get("max_position_embeddings", d["max_position_embeddings"]),
                                     "max_position_embeddings", where),
        rms_norm_eps=_float(hf.get("rms_norm_eps", d["rms_norm_eps"]), "rms_norm_eps", where),
        tie_word_embeddings=tie,
        qkv_bias=family == "qwen2",  # Qwen2: q/k/v biases always; Llama: attention_bias must be false
        head_dim=head_dim,
        initializer_range=_float(hf.get("initializer_range", d["initializer_range"]), "initializer_range", where),
        **_rope(hf, where),
    )


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


def layer_spec(cfg: ModelConfig):
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if use_te(cfg):
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization="RMSNorm")


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
