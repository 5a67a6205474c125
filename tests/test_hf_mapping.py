"""hf_mapping against independent references: transformers (names, shapes, logits) and the
source safetensors files (bit for bit).

One gloo launch (2 ranks, tests/workers/convert_worker.py) imports a tiny Qwen2 (q/k/v bias,
untied, 3 shard files) and a tiny Llama (no bias, tied embeddings) at TP=1, TP=2, PP=2 and
PP=2 x 2 virtual stages, runs the forward through megatron-core's pipeline schedule and
exports the weights back with export_hf_weights.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent / "workers"))

from convert_models import VOCAB, make_test_model, read_all  # noqa: E402

from megatron_tbrm.convert.launch import launch  # noqa: E402
from megatron_tbrm.hf_mapping import expected_hf_shapes  # noqa: E402
from megatron_tbrm.model import ModelConfig  # noqa: E402

WORKER = Path(__file__).resolve().parent / "workers" / "convert_worker.py"
LAYOUTS = ["1x1", "2x1", "1x2", "1x2x2"]  # TP x PP [x virtual stages]
FAMILIES = {"qwen2": dict(family="qwen2", tie=False, shards=3), "llama": dict(family="llama", tie=True)}


def tag(name: str, layout: str) -> str:
    tp, pp, *vpp = layout.split("x")
    return f"{name}_tp{tp}_pp{pp}" + (f"_vpp{vpp[0]}" if vpp else "")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_test_model(root / name, tiny_model_factory, **kw) for name, kw in FAMILIES.items()}


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def worker_out(models, tokens, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("worker")
    torch.save(tokens, out / "tokens.pt")
    rc = launch(str(WORKER), 2, [str(out), str(out / "tokens.pt"), ",".join(LAYOUTS), *map(str, models.values())])
    assert rc == 0, "convert_worker failed (see its output above)"
    return out


@pytest.fixture(scope="module")
def reference_logits(models, tokens) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    out = {}
    for name, d in models.items():
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        with torch.no_grad():
            out[name] = model(tokens).logits
    return out


@pytest.mark.parametrize("name", FAMILIES)
def test_table_names_and_shapes_are_what_transformers_writes(name, models, tmp_path):
    """The HF side of the table against transformers' own save_pretrained (tied heads dropped)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models[name]))
    model.save_pretrained(tmp_path, safe_serialization=True)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert expected_hf_shapes(ModelConfig.from_hf(models[name])) == written


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_logits_match_transformers(name, layout, worker_out, reference_logits):
    logits = torch.load(worker_out / f"{tag(name, layout)}.logits.pt")
    ref = reference_logits[name]
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", FAMILIES)
def test_export_is_the_source_bit_for_bit(name, layout, worker_out, models):
    path = worker_out / f"{tag(name, layout)}.safetensors"
    exported = load_file(str(path))
    source = read_all(models[name])
    assert sorted(exported) == sorted(source)
    for k, v in source.items():
        assert exported[k].dtype == v.dtype and torch.equal(exported[k], v), k
    with safe_open(str(path), framework="pt") as f:
        order = json.loads(f.metadata()["order"])
    assert order == list(expected_hf_shapes(ModelConfig.from_hf(models[name])))  # HF order, one at a time
