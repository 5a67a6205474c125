"""The memory plan (megatron_tbrm/plan.py): its formulas against numbers worked out by hand here,
the paper recipes on 8x80 GB, a layout that cannot fit, and the errors. No GPU, no processes.

The hand numbers follow the published forms: Megatron's distributed optimizer at 6 + 12/d bytes
per bf16 parameter, and Korthikanti et al. 2022 (arXiv 2205.05198) eq. 1-2: per layer
s*b*h*(34 + 5*a*s/h), or s*b*h*(10 + 24/t + 5*a*s/(h*t)) with TP t and no sequence parallelism.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from megatron_tbrm import cli
from megatron_tbrm.config import load_config
from megatron_tbrm.plan import (GB, VLLM_RUNTIME_GB, Layout, hf_params, layer_activation_bytes, make_plan,
                                model_shape, stage_params)

REPO = Path(__file__).resolve().parents[1]
HF = REPO / "tests" / "data" / "hf_configs"
PAPER = sorted((REPO / "recipes").glob("qwen2.5_math_*.yaml"))

# A small Qwen2: head_dim 64/4 = 16, 2 KV heads, gated MLP of 128, vocabulary 1000, tied.
SMALL = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 1000, "hidden_size": 64,
         "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 256, "tie_word_embeddings": True, "rope_theta": 10000.0}


def small_recipe(tmp_path: Path, **overrides) -> tuple[Path, Path]:
    (tmp_path / "hf").mkdir(exist_ok=True)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(SMALL))
    recipe = tmp_path / "small.yaml"
    recipe.write_text(f"model: {{path: {tmp_path / 'hf'}, dtype: bf16, recompute: selective}}\n"
                      "parallel: {tp: 2, pp: 1, sequence_parallel: false, distributed_optimizer: true}\n"
                      "data: {max_prompt_tokens: 40}\n"
                      "rollout: {max_tokens: 60, max_model_len: 100, tensor_parallel_size: 1, gpu_memory_utilization: 0.5}\n"
                      "train: {micro_batch_size: 2, prompts_per_step: 8, ref_offload: false}\n")
    return recipe, tmp_path / "hf"


def plan_cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """megatron-tbrm-plan in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["megatron-tbrm-plan", *map(str, args)])
    try:
        code = cli.plan()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err


def test_parameters_by_hand(tmp_path):
    _, hf = small_recipe(tmp_path)
    m = model_shape(load_config(None, [f"model.path={hf}"]))
    # one layer, whole: QKV 64 x (64 + 2*2*16) = 8192 + bias 128, proj 64*64 = 4096,
    # fc1 64 x 2*128 = 16384, fc2 128*64 = 8192, two norms 2*64 = 128 -> 37120
    assert hf_params(m) == 4 * 37120 + 64 + 1000 * 64  # + final norm + tied embedding = 212544
    # one TP rank of 2: split parts (36992) halved + norms 128 = 18624 per layer; the
    # embedding padded to a multiple of 128*2 (1024 rows) and halved: 32768; final norm 64
    assert stage_params(m, 2, 1, 0) == 4 * 18624 + 32768 + 64 == 107328
    # PP=2: first stage 2 layers + embedding; last 2 layers + final norm + a copy of the tied embedding
    assert stage_params(m, 2, 2, 0) == 2 * 18624 + 32768
    assert stage_params(m, 2, 2, 1) == 2 * 18624 + 64 + 32768
    # the published checkpoints (model cards: 1.54 B and 7.61 B parameters)
    assert round(hf_params(model_shape(load_config(None), str(HF / "qwen2.5-math-1.5b"))) / 1e7) == 154
    assert round(hf_params(model_shape(load_config(None), str(HF / "qwen2.5-math-7b"))) / 1e7) == 762


def test_activations_by_hand():
    s, b, h, a = 100, 2, 64, 4  # s*b*h = 12800; 5*a*s/h = 31.25
    gpt = dict(s=s, b=b, h=h, a=a, f=4 * h, gated=False)  # the paper's 4h GeLU MLP
    assert layer_activation_bytes(**gpt, tp=1, sp=False, recompute="none") == 12800 * (34 + 31.25)
    assert layer_activation_bytes(**gpt, tp=4, sp=False, recompute="none") == 12800 * (10 + 24 / 4 + 31.25 / 4)
    assert layer_activation_bytes(**gpt, tp=4, sp=True, recompute="none") == 12800 * (34 + 31.25) / 4
    assert layer_activation_bytes(**gpt, tp=4, sp=True, recompute="selective") == 12800 * 34 / 4
    # gated MLP of width 128 = 2h: 6f/h = 12 replaces the GeLU's 16; TP 2 without SP:
    # 10 replicated + (8 + 12)/2 split = 20 -> 256000 bytes; the attention scores add 31.25/2
    small = dict(s=s, b=b, h=h, a=a, f=128, tp=2)
    assert layer_activation_bytes(**small, sp=False, recompute="selective") == 256_000
    assert layer_activation_bytes(**small, sp=False, recompute="none") == 12800 * (20 + 15.625) == 456_000
    assert layer_activation_bytes(**small, sp=True, recompute="selective") == 12800 * (5 + 10) == 192_000
    assert layer_activation_bytes(**small, sp=False, recompute="full") == 2 * 12800  # the layer input only
    assert layer_activation_bytes(**small, sp=True, recompute="full") == 12800
    assert layer_activation_bytes(**small, sp=True, recompute="full", dtype_bytes=4) == 2 * 12800  # fp32


def test_small_plan_by_hand(tmp_path):
    recipe, _ = small_recipe(tmp_path)
    cfg = load_config(recipe, ["rollout.sleep_mode=never"])  # vLLM holds its memory through the update
    plan = make_plan(cfg, model_shape(cfg), Layout(gpus_per_node=4, nodes=1, gpu_memory_gb=10), reserve_gb=0.1)
    assert plan.info["dp"] == 2 and plan.info["n_mb"] == 2  # 8 trajectories / (DP 2 x 2 rows)
    vllm, rest = plan.groups
    assert vllm.gpus == [(0, 0)] and rest.gpus == [(0, 1), (0, 2), (0, 3)]
    P = 107328
    rows = {"weights": 2 * P, "gradients": 4 * P, "optimizer": 12 * P / 2,
            "activations": 4 * 256_000,  # 4 layers at s=100, b=2 (above)
            # logits 2 x 100 x 512 (1024/TP) elements, bf16, kept + their gradient, and the fp32
            # chunk temporary of min(512, 200) tokens x 512
            "logits": 2 * 100 * 512 * 2 * 2 + 200 * 512 * 4,
            "reference": 2 * P, "reserve": 0.1e9}
    for key, value in rows.items():
        assert rest.rows[key] == pytest.approx(value), key
        assert vllm.rows[key] == pytest.approx(value), key
    assert rest.total == pytest.approx(sum(rows.values()))
    # vLLM: 0.5 x 10 GB in all; its weights 212544 x 2 bytes; the KV cache the rest less the runtime
    assert vllm.rows["vllm"] == 5e9 and vllm.rows["vllm weights"] == 212544 * 2
    assert vllm.rows["vllm kv cache"] == pytest.approx(5e9 - 212544 * 2 - VLLM_RUNTIME_GB * GB)
    assert plan.info["vllm_kv_tokens"] == pytest.approx(vllm.rows["vllm kv cache"] / (2 * 4 * 2 * 16 * 2))
    assert vllm.total == pytest.approx(sum(rows.values()) + 5e9) and plan.fits


# The small recipe's trainer on one GPU (TP=2, above): resident 2P + 4P + 12P/2 + 0.1 GB reserve +
# the resident reference 2P; the update phase adds activations 1,024,000 and logits 819,200.
P_SMALL = 107328
RESIDENT = 2 * P_SMALL + 4 * P_SMALL + 6 * P_SMALL + 0.1e9 + 2 * P_SMALL  # 101,502,592
UPDATE = RESIDENT + 1_024_000 + 819_200  # 103,345,792


@pytest.mark.parametrize("sleep", ["always", "never"])
def test_several_engines_and_sleep_mode_by_hand(tmp_path, sleep):
    """rollout.engines=3 at tensor_parallel_size 1 on 4 GPUs: engines on GPUs 0, 1, 2, none on 3.
    With sleep mode vLLM keeps only its runtime (2 GB, assumed) through the update, and the
    rollout phase (the trainer's resident state + vLLM's 5 GB awake) sets the peak; without it,
    the update phase + vLLM's 5 GB."""
    recipe, _ = small_recipe(tmp_path)
    cfg = load_config(recipe, ["rollout.engines=3", f"rollout.sleep_mode={sleep}"])
    plan = make_plan(cfg, model_shape(cfg), Layout(gpus_per_node=4, nodes=1, gpu_memory_gb=10), reserve_gb=0.1)
    engines, rest = plan.groups
    assert engines.gpus == [(0, 0), (0, 1), (0, 2)] and rest.gpus == [(0, 3)] and plan.info["engines"] == 3
    assert RESIDENT == 101_502_592 and UPDATE == 103_345_792
    assert engines.phases["update"] == pytest.approx(UPDATE) and rest.phases["update"] == pytest.approx(UPDATE)
    assert engines.rollout == pytest.approx(RESIDENT + 5e9)  # 5,101,502,592
    if sleep == "always":
        assert engines.vllm_held == 2e9 and engines.rows["vllm asleep"] == 2e9
        assert engines.total == pytest.approx(max(UPDATE + 2e9, RESIDENT + 5e9)) == pytest.approx(5_101_502_592)
        assert engines.peak_phase == "rollout phase (vLLM awake)"
    else:
        assert engines.vllm_held == 5e9
        assert engines.total == pytest.approx(UPDATE + 5e9) == pytest.approx(5_103_345_792)
        assert engines.peak_phase == "update phase + vLLM"
    assert rest.vllm_held == 0 and rest.total == pytest.approx(UPDATE)  # no engine: the trainer alone
    # auto: 4 // tensor_parallel_size engines; attached: none of them on these GPUs
    assert make_plan(load_config(recipe, ["rollout.engines=auto"]), model_shape(cfg), plan.layout).info["engines"] == 4
    attached = make_plan(load_config(recipe, ["rollout.server_urls=[http://a:1,http://b:1]"]), model_shape(cfg),
                         plan.layout, reserve_gb=0.1)
    assert [g.vllm for g in attached.groups] == [False] and attached.groups[0].total == pytest.approx(UPDATE)


def test_sleep_mode_lets_the_7b_recipe_fit_with_2_rows(monkeypatch, capsys):
    """2 rows a micro-batch at TP=2, an engine on every GPU: without sleep each GPU holds vLLM's
    28.0 GB on top of the update's 57.7 GB (85.7: does not fit); asleep vLLM keeps 2.0 GB
    through the update and the rollout phase peaks: 37.2 GB resident (7.6 + 15.2 + 11.4 + 3.0,
    the reference offloaded) + 28.0 awake = 65.3 GB (rounded parts)."""
    recipe = REPO / "recipes" / "qwen2.5_math_7b_tbrm_n1.yaml"
    hf = HF / "qwen2.5-math-7b"
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", hf, "train.micro_batch_size=2",
                              "rollout.sleep_mode=never")
    assert code == 2 and "need an estimated 85.7 GB of 80 GB (update phase + vLLM)" in err, err
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", hf, "train.micro_batch_size=2")
    assert code == 0 and "asleep during the update" in out and "4 engines (rollout.engines)" in out, out + err
    assert re.search(r"rollout phase \(trainer resident \+ vLLM awake\)\s+65\.3\n", out), out
    assert re.search(r"peak per GPU \(of 80 GB\)\s+65\.3\n", out), out


def test_engines_that_do_not_fit_the_node_name_the_key(tmp_path, monkeypatch, capsys):
    recipe, hf = small_recipe(tmp_path)
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--gpus-per-node", 4, "--gpu-memory-gb", 10,
                              "rollout.engines=3", "rollout.tensor_parallel_size=2")
    assert code == 2 and "3 vLLM engines x tensor_parallel_size 2 need 6 GPUs; node 0 has 4" in err, err
    assert "change 'rollout.engines'" in err


@pytest.mark.parametrize("recipe", PAPER, ids=[r.stem for r in PAPER])
def test_every_paper_recipe_fits_on_8x80gb(recipe, monkeypatch, capsys):
    hf = HF / ("qwen2.5-math-1.5b" if "1.5b" in recipe.name else "qwen2.5-math-7b")
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", hf,
                              "--gpus-per-node", 8, "--nodes", 1, "--gpu-memory-gb", 80)
    assert code == 0, out + err
    assert "ESTIMATES" in out and "fits (estimate)" in out and "vLLM" in out


def test_a_layout_that_cannot_fit_exits_2_naming_a_knob(monkeypatch, capsys):
    recipe = REPO / "recipes" / "qwen2.5_math_7b_tbrm_n1.yaml"
    hf = HF / "qwen2.5-math-7b"
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", hf, "--gpus-per-node", 1,
                              "--gpu-memory-gb", 24, "parallel.tp=1")
    assert code == 2 and "peak per GPU" in out
    assert "does not fit" in err and "'parallel.tp'" in err, err
    # one knob fixes it: the message names it and its value
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", hf, "train.micro_batch_size=4",
                              "rollout.sleep_mode=never")
    assert code == 2 and "change 'train.micro_batch_size' (train.micro_batch_size=" in err, err
    # vLLM's budget below its weights: it could not start at all
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", hf,
                              "rollout.gpu_memory_utilization=0.1")
    assert code == 2 and "change 'rollout.gpu_memory_utilization'" in err and "refuses to start" in err, err


def test_errors_name_the_file(tmp_path, monkeypatch, capsys):
    missing = tmp_path / "nope.yaml"
    code, _, err = plan_cli(monkeypatch, capsys, "--config", missing)
    assert code == 1 and f"error: config file not found: {missing}" in err
    recipe = REPO / "recipes" / "qwen2.5_math_7b_tbrm_n1.yaml"
    code, _, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", tmp_path / "no-model")
    assert code == 1 and str(tmp_path / "no-model") in err
    # without --hf-config: model.path's config.json, named, and the way out
    code, _, err = plan_cli(monkeypatch, capsys, "--config", recipe, f"model.path={tmp_path / 'gone'}")
    assert code == 1 and str(tmp_path / "gone" / "config.json") in err and "--hf-config" in err
    empty = tmp_path / "hf-empty"
    empty.mkdir()
    code, _, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", empty)
    assert code == 1 and str(empty / "config.json") in err


def test_token_budget_sizes_the_micro_batch(tmp_path):
    """train.max_tokens_per_microbatch B: activations and logits of B tokens in trajectories of
    up to s = 100 (b = B / s rows' worth); B = 200 is the same as 2 rows of 100, B = 400 twice
    the token terms."""
    recipe, _ = small_recipe(tmp_path)
    rows = make_plan(load_config(recipe), model_shape(load_config(recipe)), Layout(4, 1, 10), reserve_gb=0.1)
    for budget, pack in ((200, False), (200, True), (400, True)):
        cfg = load_config(recipe, [f"train.max_tokens_per_microbatch={budget}", f"train.pack_sequences={pack}"])
        plan = make_plan(cfg, model_shape(cfg), Layout(4, 1, 10), reserve_gb=0.1)
        rest = plan.groups[1]
        if budget == 200:
            assert rest.rows == rows.groups[1].rows
        else:
            assert rest.rows["activations"] == pytest.approx(4 * 2 * 256_000)  # 4 layers at b = 4
            assert rest.rows["logits"] == pytest.approx(400 * 512 * 2 * 2 + 400 * 512 * 4)
            assert plan.info["n_mb"] == 1  # 8 trajectories / (DP 2 x 4 a micro-batch)


def test_a_token_budget_that_cannot_fit_names_the_budget(monkeypatch, capsys):
    recipe = REPO / "recipes" / "qwen2.5_math_7b_tbrm_n1.yaml"
    code, out, err = plan_cli(monkeypatch, capsys, "--config", recipe, "--hf-config", HF / "qwen2.5-math-7b",
                              "train.max_tokens_per_microbatch=16384", "train.pack_sequences=true")
    assert code == 2 and "<= 16384 tokens (packed rows)" in out
    assert "change 'train.max_tokens_per_microbatch' (train.max_tokens_per_microbatch=8192 fits" in err, err
