"""GPU-path configuration that can be checked on CPU: FP8 settings reach megatron-core's
TransformerConfig (what TE reads), and the layer spec is chosen as documented.

The FP8 test replaces `check_fp8_available` (it needs CUDA and Transformer Engine, absent here):
that is the only mock. The real FP8/TE run needs a lent GPU with Transformer Engine.
"""
from __future__ import annotations

import pytest
import torch

import megatron_tbrm.model as model_mod
from megatron_tbrm.model import ModelConfig, ModelConfigError, layer_spec, transformer_config

TINY = dict(family="qwen2", vocab_size=512, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
            ffn_hidden_size=128, max_position_embeddings=128)


@pytest.mark.parametrize("fp8,recipe,history,algo", [("hybrid", "delayed", 1024, "max"),
                                                     ("e4m3", "tensorwise", 16, "most_recent")])
def test_fp8_settings_reach_the_transformer_config(monkeypatch, fp8, recipe, history, algo):
    monkeypatch.setattr(model_mod, "check_fp8_available", lambda fp8: None)  # CUDA + TE: mocked
    cfg = ModelConfig(**TINY, dtype="bf16", fp8=fp8, fp8_recipe=recipe, fp8_amax_history_len=history,
                      fp8_amax_compute_algo=algo)
    tc = transformer_config(cfg, tp=1, pp=1)
    assert (tc.fp8, str(getattr(tc.fp8_recipe, "value", tc.fp8_recipe)), tc.fp8_amax_history_len,
            tc.fp8_amax_compute_algo, tc.bf16) == (fp8, recipe, history, algo, True)


def test_no_fp8_by_default():
    assert transformer_config(ModelConfig(**TINY), tp=1, pp=1).fp8 is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_fp8_without_a_gpu_says_why():
    with pytest.raises(ModelConfigError, match=r"fp8='hybrid' needs a GPU"):
        transformer_config(ModelConfig(**TINY, dtype="bf16", fp8="hybrid"), tp=1, pp=1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU behaviour")
def test_layer_spec_is_local_without_te_and_te_on_request_fails_clearly():
    from megatron.core.tensor_parallel import ColumnParallelLinear

    spec = layer_spec(ModelConfig(**TINY))  # transformer_impl=auto
    assert spec.submodules.self_attention.submodules.linear_qkv is ColumnParallelLinear
    with pytest.raises(ModelConfigError, match="needs Transformer Engine and a GPU"):
        layer_spec(ModelConfig(**TINY, transformer_impl="transformer_engine"))
