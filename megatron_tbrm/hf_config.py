"""Reading a Hugging Face config.json for the model builder: one allow-list.

`read_hf_config(hf, where)` -> the ModelConfig fields of a Qwen2 / Llama config.json, or
ModelConfigError naming the file, the key and the value for anything Megatron cannot
reproduce. Used by the builder (ModelConfig.from_hf), the converters and config validation.
"""

from __future__ import annotations

SUPPORTED_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "LlamaForCausalLM": "llama"}


class ModelConfigError(ValueError):
    """The model folder or the requested model settings are unusable."""


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
