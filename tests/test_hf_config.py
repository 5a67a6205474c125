"""ModelConfig.from_hf reads config.json through one allow-list (megatron_tbrm.model.read_hf_config).

References are transformers' own: configs written by its save_pretrained (transformers 5
spelling: `rope_parameters`, `layer_types`, `dtype`), its reading of them (AutoConfig), and its
logits in fp64 on a random model it initialised. Megatron runs in a gloo process of one.

- Llama 3.2's RoPE (rope_type llama3, factor 32) gives transformers' logits at positions past
  256; plain RoPE, what the builder used to build, is far off there (checked, so the test can fail).
- The configs of the models users bring (Qwen2.5-Math-1.5B/7B, Qwen2.5-0.5B, Llama-3.2-1B) are
  accepted, as published and as transformers 5 re-writes them, and read as transformers reads them.
- Every field the builder cannot reproduce is refused with the file, the key and the value.
- init_weights=False (start-up without random init) leaves nothing unloaded: the weights are
  NaN-filled before the import and the logits still match; the default still draws N(0, initializer_range).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from _dist import run_distributed

from megatron_tbrm.model import ModelConfig, ModelConfigError, transformer_config

# As published on the Hugging Face hub (transformers 4 spelling).
QWEN25_MATH_1_5B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
    "hidden_act": "silu", "hidden_size": 1536, "initializer_range": 0.02, "intermediate_size": 8960,
    "max_position_embeddings": 4096, "max_window_layers": 21, "model_type": "qwen2", "num_attention_heads": 12,
    "num_hidden_layers": 28, "num_key_value_heads": 2, "rms_norm_eps": 1e-06, "rope_theta": 10000,
    "sliding_window": 4096, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "transformers_version": "4.37.0",
    "use_cache": True, "use_mrope": False, "use_sliding_window": False, "vocab_size": 151936,
}
QWEN25_MATH_7B = {**QWEN25_MATH_1_5B, "hidden_size": 3584, "intermediate_size": 18944, "max_window_layers": 28,
                  "num_attention_heads": 28, "num_key_value_heads": 4, "tie_word_embeddings": False,
                  "vocab_size": 152064}
QWEN25_0_5B = {**QWEN25_MATH_1_5B, "hidden_size": 896, "intermediate_size": 4864, "max_position_embeddings": 32768,
               "max_window_layers": 24, "num_attention_heads": 14, "num_hidden_layers": 24, "rope_theta": 1000000.0,
               "sliding_window": 32768, "transformers_version": "4.40.1"}
LLAMA32_1B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 128000,
    "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0", "use_cache": True, "vocab_size": 128256,
}
REAL = {"Qwen2.5-Math-1.5B": QWEN25_MATH_1_5B, "Qwen2.5-Math-7B": QWEN25_MATH_7B, "Qwen2.5-0.5B": QWEN25_0_5B,
        "Llama-3.2-1B": LLAMA32_1B}
# Shrunk sizes for models transformers builds and saves here (vocabulary and every other field kept).
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=1)


def save_with_transformers(fields: dict, out: Path, seed: int = 0) -> Path:
    """A random model of `fields` (transformers' init), written by transformers' save_pretrained."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = copy.deepcopy(fields)
    model_type = fields.pop("model_type")
    for k in ("architectures", "transformers_version", "torch_dtype"):
        fields.pop(k, None)
    config = AutoConfig.for_model(model_type, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    return out


def tiny(fields: dict) -> dict:
    out = {**fields, **TINY_SIZES}
    if "head_dim" in out:
        out["head_dim"] = 32
    return out


# --- the configs users bring ----------------------------------------------------------------


@pytest.mark.parametrize("name", REAL)
def test_published_configs_are_accepted(name):
    cfg = ModelConfig.from_hf(REAL[name], source=f"{name}/config.json")
    hf = REAL[name]
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.tie_word_embeddings) == (
        hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"], hf["tie_word_embeddings"])
    assert cfg.qkv_bias == (hf["model_type"] == "qwen2")
    assert (cfg.rope_type, cfg.rope_scaling_factor) == (("llama3", 32.0) if "Llama" in name else ("default", 1.0))


@pytest.mark.parametrize("name", REAL)
def test_transformers_5_configs_are_read_as_transformers_reads_them(name, tmp_path):
    from transformers import AutoConfig

    d = save_with_transformers(tiny(REAL[name]), tmp_path / name)
    written = json.loads((d / "config.json").read_text())
    assert "rope_parameters" in written and "rope_scaling" not in written  # the spelling under test
    cfg = ModelConfig.from_hf(d)
    ref = AutoConfig.from_pretrained(d)
    rope = ref.rope_parameters
    head_dim = getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads
    assert cfg.kv_channels == head_dim
    assert (cfg.vocab_size, cfg.hidden_size, cfg.ffn_hidden_size, cfg.num_layers, cfg.num_attention_heads,
            cfg.num_kv_heads, cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.tie_word_embeddings) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers, ref.num_attention_heads,
        ref.num_key_value_heads, ref.max_position_embeddings, ref.rms_norm_eps, ref.tie_word_embeddings)
    assert (cfg.rope_theta, cfg.rope_type, cfg.rope_scaling_factor) == (
        float(rope["rope_theta"]), rope["rope_type"], float(rope.get("factor", 1.0)))
    assert all(t == "full_attention" for t in getattr(ref, "layer_types", None) or ["full_attention"])


def test_rms_norm_eps_and_rope_theta_reach_megatron():
    cfg = ModelConfig.from_hf({**tiny(LLAMA32_1B), "rms_norm_eps": 1e-5})
    assert transformer_config(cfg, tp=1, pp=1).layernorm_epsilon == 1e-5
    assert cfg.rope_theta == 500000.0


# --- refusals: file, key and value named ------------------------------------------------------

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
REFUSED = {
    # name: (base, edit, message)
    "unknown key": (QWEN25_MATH_1_5B, {"quantization_config": {"quant_method": "gptq"}},
                    r"quantization_config=\{'quant_method': 'gptq'\} is not a config key megatron-tbrm knows"),
    "yarn": (QWEN25_0_5B, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
             r"rope_scaling.rope_type='yarn' is not supported"),
    "linear (old 'type' key)": (LLAMA32_1B, {"rope_scaling": {"type": "linear", "factor": 2.0}},
                                r"rope_scaling.rope_type='linear' is not supported"),
    "llama3 low_freq_factor": (LLAMA32_1B, {"rope_scaling": None,
                                            "rope_parameters": {**LLAMA3_ROPE, "low_freq_factor": 2.0}},
                               r"rope_parameters.low_freq_factor=2.0 is not supported: megatron-core's llama3"),
    "llama3 original context": (LLAMA32_1B, {"rope_scaling": {**LLAMA3_ROPE, "original_max_position_embeddings": 4096}},
                                r"rope_scaling.original_max_position_embeddings=4096 is not supported"),
    "llama3 without factor": (LLAMA32_1B, {"rope_scaling": {k: v for k, v in LLAMA3_ROPE.items() if k != "factor"}},
                              r"rope_scaling.factor is missing"),
    "unknown rope key": (LLAMA32_1B, {"rope_scaling": {**LLAMA3_ROPE, "mscale": 1.0}},
                         r"rope_scaling.mscale=1.0 is not a parameter megatron-tbrm reads"),
    "rope_theta conflict": (LLAMA32_1B, {"rope_scaling": {**LLAMA3_ROPE, "rope_theta": 10000.0}},
                            r"rope_theta=500000.0 conflicts with rope_scaling.rope_theta=10000.0"),
    "both spellings differ": (LLAMA32_1B, {"rope_parameters": {**LLAMA3_ROPE, "factor": 8.0}},
                              r"rope_scaling=.* conflicts with rope_parameters="),
    "partial rotary": (QWEN25_MATH_1_5B, {"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported"),
    "sliding window on": (QWEN25_MATH_1_5B, {"use_sliding_window": True},
                          r"use_sliding_window=True makes layers use \['sliding_attention'\] attention"),
    "sliding layer_types": (QWEN25_MATH_1_5B, {"layer_types": ["full_attention"] * 27 + ["sliding_attention"]},
                            r"layer_types=\[.*\] makes layers use \['sliding_attention'\]"),
    "gelu": (LLAMA32_1B, {"hidden_act": "gelu"}, r"hidden_act='gelu' is not supported"),
    "attention dropout": (QWEN25_MATH_1_5B, {"attention_dropout": 0.1}, r"attention_dropout=0.1 is not supported"),
    "llama attention_bias": (LLAMA32_1B, {"attention_bias": True}, r"attention_bias=True is not supported for llama"),
    "qwen2 attention_bias false": (QWEN25_MATH_1_5B, {"attention_bias": False},
                                   r"attention_bias=False contradicts the qwen2 family"),
    "mlp_bias": (LLAMA32_1B, {"mlp_bias": True}, r"mlp_bias=True is not supported"),
    "mrope": (QWEN25_MATH_1_5B, {"use_mrope": True}, r"use_mrope=True is not supported"),
    "model_type mismatch": (QWEN25_MATH_1_5B, {"model_type": "llama"}, r"model_type='llama' contradicts"),
    "missing size": (QWEN25_MATH_1_5B, {"hidden_size": None}, r"hidden_size=None is not a positive integer"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_refused_fields_are_named(case, tmp_path):
    base, edit, message = REFUSED[case]
    (tmp_path / "config.json").write_text(json.dumps({**base, **edit}))
    with pytest.raises(ModelConfigError, match=rf"^{tmp_path / 'config.json'}: {message}"):
        ModelConfig.from_hf(tmp_path)


def test_a_missing_required_key_is_named():
    hf = {k: v for k, v in QWEN25_MATH_1_5B.items() if k != "num_hidden_layers"}
    with pytest.raises(ModelConfigError, match=r"^x/config.json: required key 'num_hidden_layers' is missing"):
        ModelConfig.from_hf(hf, source="x/config.json")


# --- llama3 RoPE: Megatron's logits against transformers' -------------------------------------

SEQ = 320  # the failure was at positions past 256


def _megatron_logits(rank, world_size, hf_dir: str, tokens: torch.Tensor) -> dict:
    from megatron_tbrm.hf_mapping import import_hf_weights
    from megatron_tbrm.model import build_model
    from megatron_tbrm.parallel import init_distributed

    init_distributed(tp=1, pp=1)
    cfg = ModelConfig.from_hf(hf_dir)
    out = {}
    for name, c in (("llama3", cfg), ("plain", dataclasses.replace(cfg, rope_type="default", rope_scaling_factor=1.0))):
        (model,) = build_model(c, init_weights=False)
        with torch.no_grad():
            for p in model.parameters():  # whatever import_hf_weights does not write shows up as NaN
                p.fill_(float("nan"))
        import_hf_weights([model], c, hf_dir)
        model.eval()
        with torch.no_grad():
            logits = model(tokens, torch.arange(tokens.shape[1]).unsqueeze(0), attention_mask=None)
        out[name] = logits[..., : c.vocab_size].double()
    # The default still draws random weights (tests and tools that build random models rely on it).
    (model,) = build_model(cfg)
    out["init_std"] = model.embedding.word_embeddings.weight.std().item()
    return out


@pytest.fixture(scope="module")
def llama3_model(tmp_path_factory) -> Path:
    # Llama 3.2's fields (tied, head_dim, rope), shrunk; a larger init so attention is peaked and
    # the positions matter.
    fields = {**tiny(LLAMA32_1B), "vocab_size": 256, "initializer_range": 0.2}
    return save_with_transformers(fields, tmp_path_factory.mktemp("llama3") / "model")


def test_llama3_rope_logits_match_transformers(llama3_model):
    from transformers import AutoModelForCausalLM

    written = json.loads((llama3_model / "config.json").read_text())
    assert written["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in written
    tokens = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(llama3_model, dtype=torch.float64).eval()(tokens).logits
        ref32 = AutoModelForCausalLM.from_pretrained(llama3_model, dtype=torch.float32).eval()(tokens).logits
    (got,) = run_distributed(_megatron_logits, 1, str(llama3_model), tokens)
    late = slice(256, SEQ)
    # Plain RoPE is far off past 256 (2.4 here, logits of std 1.6): the comparison below can fail.
    assert (got["plain"][:, late] - ref[:, late]).abs().max().item() > 1e-1
    assert not torch.isnan(got["llama3"]).any()
    assert got["init_std"] == pytest.approx(0.2, rel=0.05)  # initializer_range, when init is not skipped
    # Megatron in fp32 is as close to the fp64 reference as transformers' own fp32 forward
    # (1.8e-5 here; Megatron 2.1e-5): the same rounding, no formula difference.
    err = (got["llama3"] - ref).abs().max().item()
    err_hf32 = (ref32.double() - ref).abs().max().item()
    assert err < max(2 * err_hf32, 1e-5) and err < 5e-5, f"max |megatron - transformers| = {err:.3g} (hf fp32: {err_hf32:.3g})"
