"""The conversion tools end to end (real processes), and their errors on bad inputs.

Round trip: HF -> megatron-core checkpoint at TP=2 x PP=2 (4 processes) -> HF at TP=1, PP=1
(resharding, vocab padding 512 -> 384): every tensor bit-identical, the same config.json and
tokenizer files, and transformers loads the result with no missing or unexpected keys.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

from convert_models import make_test_model, read_all  # noqa: E402

from megatron_tbrm.convert import hf_to_megatron as to_megatron  # noqa: E402
from megatron_tbrm.convert import megatron_to_hf as to_hf  # noqa: E402
from megatron_tbrm.hf_mapping import WeightsError  # noqa: E402
from megatron_tbrm.model import ModelConfigError  # noqa: E402

SHARD = "model-00002-of-00003.safetensors"


@pytest.fixture(scope="module")
def qwen2(tmp_path_factory, tiny_model_factory) -> Path:
    return make_test_model(tmp_path_factory.mktemp("src") / "qwen2", tiny_model_factory,
                           family="qwen2", tie=False, shards=3)


def run_tool(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, str(REPO / "tools" / script), *args], env=env,
                          capture_output=True, text=True, timeout=600)


def test_round_trip_tp2_pp2_is_bit_identical(qwen2, tmp_path):
    ckpt, back = tmp_path / "ckpt", tmp_path / "back"
    # In process: validates here, then starts its 4 ranks (what the CLI does, minus a torch import).
    to_megatron.main(["--hf-dir", str(qwen2), "--out", str(ckpt), "--tp", "2", "--pp", "2"])
    assert (ckpt / "latest").read_text() == "iter_0000000"
    r = run_tool("convert_megatron_to_hf.py", "--ckpt", str(ckpt), "--out", str(back), "--max-shard-size", "300KB")
    assert r.returncode == 0, r.stderr[-4000:]

    source, result = read_all(qwen2), read_all(back)
    assert sorted(result) == sorted(source)
    for k, v in source.items():
        assert result[k].dtype == v.dtype and torch.equal(result[k], v), k
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert json.loads((back / "config.json").read_text()) == json.loads((qwen2 / "config.json").read_text())
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (back / f).read_bytes() == (qwen2 / f).read_bytes(), f

    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(back, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


# --- bad inputs: the tools name the problem before any worker starts -------------------------


def _edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))


def _drop_from_index(d: Path, name: str) -> None:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _truncate(d: Path) -> None:
    data = (d / SHARD).read_bytes()
    (d / SHARD).write_bytes(data[: len(data) - 100])


BAD_INPUTS = {
    "unsupported architecture": (lambda d: _edit_config(d, architectures=["MistralForCausalLM"]), [],
                                 ModelConfigError, r"unsupported architecture.*supported: Qwen2ForCausalLM, LlamaForCausalLM"),
    # The converters read config.json through the builder's allow-list (model.read_hf_config).
    "unsupported rope type": (lambda d: _edit_config(d, rope_scaling=None, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512, "rope_theta": 10000.0}), [],
        ModelConfigError, r"config.json: rope_parameters.rope_type='yarn' is not supported"),
    "unknown config key": (lambda d: _edit_config(d, quantization_config={"quant_method": "gptq"}), [],
                           ModelConfigError, r"config.json: quantization_config=.* is not a config key"),
    "truncated shard": (_truncate, [], WeightsError, rf"shard file .*{SHARD} is truncated"),
    "missing shard": (lambda d: (d / SHARD).unlink(), [], WeightsError, rf"shard file .*{SHARD} is missing"),
    "missing tensor": (lambda d: _drop_from_index(d, "model.norm.weight"), [], WeightsError,
                       r"tensor 'model.norm.weight' is missing"),
    "shape vs config": (lambda d: _edit_config(d, intermediate_size=192), [], WeightsError,
                        r"'model.layers.0.mlp.gate_proj.weight' .* has shape \[256, 128\], but config.json implies \[192, 128\]"),
    "tp vs heads": (lambda d: None, ["--tp", "3"], ModelConfigError,
                    r"tensor parallel size 3 does not divide num_attention_heads=4"),
    "tp vs kv heads": (lambda d: None, ["--tp", "4"], ModelConfigError,
                       r"tensor parallel size 4 does not divide num_key_value_heads=2"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_hf_to_megatron_names_the_problem(case, qwen2, tmp_path):
    import shutil

    edit, extra, error, message = BAD_INPUTS[case]
    src = shutil.copytree(qwen2, tmp_path / "src")
    edit(src)
    with pytest.raises(error, match=message):
        to_megatron.main(["--hf-dir", str(src), "--out", str(tmp_path / "ckpt"), *extra])
    assert not (tmp_path / "ckpt").exists()


def test_refuses_a_non_empty_output(qwen2, tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        to_megatron.main(["--hf-dir", str(qwen2), "--out", str(tmp_path / "ckpt")])


def test_megatron_to_hf_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a dist_checkpointing checkpoint"):
        to_hf.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out")])
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="hf_config.json is missing"):
        to_hf.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out")])
    (tmp_path / "hf_config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelConfigError, match="unsupported architecture.*GPT2LMHeadModel"):
        to_hf.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out")])


def test_megatron_to_hf_refuses_a_config_the_builder_refuses(qwen2, tmp_path):
    """The same allow-list as the import, and the error names the checkpoint's file."""
    (tmp_path / "metadata.json").write_text("{}")
    cfg = json.loads((qwen2 / "config.json").read_text())
    (tmp_path / "hf_config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(ModelConfigError, match=rf"^{tmp_path / 'hf_config.json'}: hidden_act='gelu' is not supported"):
        to_hf.main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out")])


def test_cli_reports_errors_without_a_traceback(qwen2, tmp_path):
    r = run_tool("convert_hf_to_megatron.py", "--hf-dir", str(qwen2), "--out", str(tmp_path / "c"), "--tp", "3")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: tensor parallel size 3 does not divide num_attention_heads=4"


def test_cli_names_a_refused_config_field(qwen2, tmp_path):
    import shutil

    src = shutil.copytree(qwen2, tmp_path / "src")
    _edit_config(src, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    r = run_tool("convert_hf_to_megatron.py", "--hf-dir", str(src), "--out", str(tmp_path / "c"))
    assert r.returncode == 1
    assert r.stderr.strip() == (f"error: {src / 'config.json'}: rope_scaling.rope_type='dynamic' is not supported: "
                                f"megatron-tbrm builds RoPE types ['default', 'llama3'] only")
    assert not (tmp_path / "c").exists()
