"""Recipe inheritance (megatron_tbrm/recipe.py): `defaults:` bases, interpolation, overrides.

The reference is tests/data/resolved_recipes/*.json: every recipe as config.py resolved it
before the recipes were split into bases (commit dbfce46), dumped with Config.to_dict().
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from megatron_tbrm.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
RESOLVED = REPO / "tests" / "data" / "resolved_recipes"
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flatten(v, key) if isinstance(v, dict) else {key: v})
    return out


def test_every_recipe_has_a_reference():
    assert sorted(p.stem for p in RESOLVED.glob("*.json")) == [r.stem for r in RECIPES]
    assert len(RECIPES) == 8


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_recipe_resolves_as_before_key_by_key(recipe):
    before = flatten(json.loads((RESOLVED / f"{recipe.stem}.json").read_text()))
    now = flatten(load_config(recipe).to_dict())
    for key, value in before.items():
        assert key in now, f"{recipe.name}: '{key}' is gone from the schema"
        assert now[key] == value, f"{recipe.name}: '{key}' was {value!r}, now {now[key]!r}"
    # Keys the schema gained since the reference was taken hold their defaults.
    defaults = flatten(dataclasses.asdict(Config()))
    for key in set(now) - set(before):
        assert now[key] == defaults[key], f"{recipe.name}: new key '{key}' = {now[key]!r}, default {defaults[key]!r}"


def test_paper_recipes_repeat_nothing():
    """Each paper recipe is its differences: a few lines besides comments."""
    for recipe in (r for r in RECIPES if r.name.startswith("qwen2.5_math_")):
        lines = [ln for ln in recipe.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
        assert lines[0].startswith("defaults:"), recipe.name
        assert len(lines) <= 11, recipe.name


def test_overrides_reach_interpolations_and_keep_yaml12_floats():
    recipe = REPO / "recipes" / "qwen2.5_math_7b_tbrm_n1.yaml"
    assert load_config(recipe).rollout.tensor_parallel_size == 2  # ${parallel.tp} in base/paper.yaml
    cfg = load_config(recipe, ["parallel.tp=4", "optim.lr=1e-3", "run.dir=runs/${loss.name}-${rollout.n}"])
    assert cfg.rollout.tensor_parallel_size == 4 and cfg.optim.lr == 1e-3 and cfg.run.dir == "runs/tbrm-1"
    cfg = load_config(recipe, ["rollout.tensor_parallel_size=1"])
    assert cfg.rollout.tensor_parallel_size == 1 and cfg.parallel.tp == 2


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error(recipe: Path, *overrides: str) -> str:
    """The ConfigError message of loading `recipe` with `overrides`."""
    with pytest.raises(ConfigError) as e:
        load_config(recipe, list(overrides))
    return str(e.value)


def test_merge_order_and_lists(tmp_path):
    write(tmp_path / "base" / "a.yaml", "optim: {lr: 1e-4, warmup_steps: 3}\nrollout: {stop: [x, y], n: 2}\n")
    write(tmp_path / "base" / "b.yaml", "defaults: a.yaml\noptim: {lr: 2e-4}\n")
    child = write(tmp_path / "c.yaml", "defaults: [base/b.yaml]\nrollout: {stop: [z]}\n")
    cfg = load_config(child)
    # the child over its base over the base's base; mappings merge, lists replace
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.rollout.n, cfg.rollout.stop) == (2e-4, 3, 2, ["z"])


def test_unknown_key_in_a_child_names_the_closest_key_and_the_file(tmp_path):
    base = write(tmp_path / "base.yaml", "optim: {lr: 1e-4}\n")
    child = write(tmp_path / "child.yaml", "defaults: [base.yaml]\noptim:\n  warmup_step: 5\n")
    assert error(child).startswith(f"unknown config key 'optim.warmup_step' (in {child}): "
                                   "did you mean 'optim.warmup_steps'? allowed keys here: lr, ")
    assert error(base, "rollot.n=2").startswith("unknown config key 'rollot' (from the command line): "
                                                "did you mean 'rollout'?")


def test_bad_value_names_the_key_and_the_file_that_set_it(tmp_path):
    base = write(tmp_path / "base.yaml", "train: {steps: many}\n")
    child = write(tmp_path / "child.yaml", "defaults: base.yaml\n")
    assert error(child) == f"config key 'train.steps': got 'many', expected an integer (in {base})"
    write(base, "parallel: {tp: 2}\nrollout: {tensor_parallel_size: '${model.path}'}\nmodel: {path: /m}\n")
    assert error(child) == f"config key 'rollout.tensor_parallel_size': got '/m', expected an integer (from {base})"
    assert error(child, "rollout.tensor_parallel_size=${nope}") == (
        "config key 'rollout.tensor_parallel_size': cannot resolve its interpolation: "
        "Interpolation key 'nope' not found (from the command line)")


def test_missing_base_names_the_file(tmp_path):
    child = write(tmp_path / "child.yaml", "defaults: [base/nope.yaml]\n")
    assert error(child) == (f"config file {child}: base recipe 'base/nope.yaml' in 'defaults' not found: "
                            f"{tmp_path / 'base' / 'nope.yaml'}")
    write(child, "defaults: {a: 1}\n")
    assert error(child).startswith(f"config file {child}: 'defaults' must be a recipe file or a list")


def test_a_cycle_in_defaults_names_the_files(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, "defaults: [b.yaml]\n")
    write(b, "defaults: [a.yaml]\n")
    assert error(a) == f"recipe inheritance cycle in 'defaults': {a} -> {b} -> {a}"
    write(a, "defaults: [a.yaml]\n")
    assert error(a) == f"recipe inheritance cycle in 'defaults': {a} -> {a}"
    # the same base reached twice (a diamond) is not a cycle
    write(tmp_path / "base.yaml", "loss: {beta: 0.01}\n")
    write(a, "defaults: [base.yaml]\n")
    write(b, "defaults: [base.yaml]\n")
    assert load_config(write(tmp_path / "c.yaml", "defaults: [a.yaml, b.yaml]\n")).loss.beta == 0.01
