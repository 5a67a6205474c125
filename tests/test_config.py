"""Config: bad input fails at load/validate time, before any process-group work, naming the key."""

from __future__ import annotations

import json

import pytest

from megatron_tbrm.config import ConfigError, load_config, validate


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 300, "hidden_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 256, "max_position_embeddings": 512,
    }))
    return d


@pytest.fixture
def good(tmp_path, model_dir):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    return [f"model.path={model_dir}", f"data.train_path={data}", "rollout.max_tokens=64",
            "data.max_prompt_tokens=64", "rollout.max_model_len=256", "train.prompts_per_step=4",
            "train.micro_batch_size=2"]


def test_good_config_validates(good):
    cfg = load_config(None, good + ["parallel.tp=2", "loss.beta=0.05"])
    validate(cfg, world_size=4)
    assert cfg.parallel.tp == 2 and cfg.loss.beta == 0.05 and cfg.rollout.n == 1


@pytest.mark.parametrize(
    "overrides,world,match",
    [
        (["parallel.tpp=2"], 1, r"unknown config key 'parallel.tpp'.*allowed keys here: tp, pp"),
        (["parallel.tp=3"], 3, r"'parallel.tp': tensor parallel size 3 does not divide num_attention_heads=4"),
        (["parallel.tp=2", "parallel.pp=2"], 6, r"= 4 does not divide the world size 6"),
        (["parallel.tp=two"], 1, r"'parallel.tp': got 'two', expected an integer"),
        (["loss.name=ppo"], 1, r"'loss.name': got 'ppo', expected one of 'tbrm', 'grpo'"),
        (["rollout.max_tokens=1000"], 1, r"exceed the model's max_position_embeddings=512"),
        (["data.train_path=/nonexistent.jsonl"], 1, r"'data.train_path': file not found: /nonexistent.jsonl"),
        (["rollout.shm_busy_loop_s=-1"], 1, r"'rollout.shm_busy_loop_s': got -1.0, expected a non-negative number"),
        (["loss.beta=0"], 1, r"'loss.beta': got 0.0, expected a positive number"),
        (["parallel.pp=3"], 3, r"'parallel.pp': 3 pipeline stages \(3 x 1 virtual\) do not divide num_hidden_layers=2"),
        (["loss.name=grpo"], 1, r"'rollout.n': got 1; loss.name=grpo needs n >= 2"),
        (["model.fp8=hybrid"], 1, r"fp8='hybrid' needs a GPU"),
        (["eval.every=5", "eval.path=/nonexistent.jsonl"], 1, r"'eval.path': file not found: /nonexistent.jsonl"),
        (["train.max_staleness=1", "rollout.sleep_mode=always"], 1, r"'rollout.sleep_mode': 'always' with train.max"),
        (["data.trajectories=/nonexistent/*.jsonl"], 1, r"'data.trajectories': no trajectory files"),
        (["data.trajectories=/tmp", "loss.name=grpo", "rollout.n=4"], 1, r"off-policy data is for loss.name=tbrm"),
        (["train.pack_sequences=true"], 1, r"'train.pack_sequences': true needs train.max_tokens_per_microbatch"),
        (["train.max_tokens_per_microbatch=100"], 1,
         r"'train.max_tokens_per_microbatch': got 100, must be >= .* = 128 .*a trajectory is never split"),
        (["train.max_tokens_per_microbatch=256", "train.pack_sequences=true", "parallel.cp=2"], 2,
         r"'train.pack_sequences': true with parallel.cp=2"),
        (["train.max_tokens_per_microbatch=256", "train.micro_batch_size=3"], 8, r"4 trajectories are too few for 1 "),
        (["train.max_tokens_per_microbatch=two"], 1, r"'train.max_tokens_per_microbatch': got 'two', expected an integer or null"),
        (["data.replay.size=8", "data.replay.per_step=16"], 1, r"'data.replay.size' / 'data.replay.per_step': got 8 / 16; replay needs per_step <= size"),
        (["data.replay.size=-1"], 1, r"'data.replay.size' / 'data.replay.per_step': got -1 / 0; must be >= 0"),
        (["data.replay.size=8", "data.replay.per_step=4", "loss.name=grpo", "rollout.n=4"], 1,
         r"'data.replay': replayed \(off-policy\) trajectories are for loss.name=tbrm .*data.replay.per_step=0 turns replay off"),
        (["data.replay.size=8", "data.replay.per_step=3"], 1,
         r"'data.replay.per_step': got 3; .* data-parallel size 1 x 'train.micro_batch_size' 2"),
        (["parallel.pp=2", "parallel.vpp=1", "train.prompts_per_step=2"], 2,
         r"= 2 trajectories must split evenly into data-parallel size 1 x 'train.micro_batch_size' 2 x 'parallel.pp' 2"),
        (["parallel.pp=2", "parallel.vpp=1", "data.replay.size=8", "data.replay.per_step=2"], 2,
         r"'data.replay.per_step': got 2; .* x 'parallel.pp' 2 \(interleaved schedule\)"),
        (["data.replay.size=8", "data.replay.per_step=2", "data.trajectories=/tmp"], 1,
         r"'data.replay': the buffer holds fresh rollouts, and data.trajectory_fraction=1 makes none"),
        (["train.exit_duration_in_mins=0"], 1, r"'train.exit_duration_in_mins': got 0.*must be > 0 \(minutes\), or null"),
    ],
)
def test_bad_config_names_key_and_value(good, overrides, world, match):
    with pytest.raises(ConfigError, match=match) if "fp8" not in overrides[0] else pytest.raises(ValueError, match=match):
        validate(load_config(None, good + overrides), world_size=world)


def test_replay_settings_that_run_validate(good):
    """per_step 0 turns replay off whatever the size; a token budget lifts the row split; replay
    mixes with trajectory files when fresh rollouts still come."""
    traj = next(x for x in good if x.startswith("data.train_path=")).split("=", 1)[1]
    for extra in (["data.replay.size=8"],
                  ["data.replay.size=8", "data.replay.per_step=3", "train.max_tokens_per_microbatch=256"],
                  ["data.replay.size=8", "data.replay.per_step=2", f"data.trajectories={traj}",
                   "data.trajectory_fraction=0.5"]):
        validate(load_config(None, good + extra), world_size=1)


def test_token_budget_replaces_the_row_split(good):
    """With train.max_tokens_per_microbatch the step need not split into DP x micro_batch_size
    rows (4 trajectories, DP 4, 3 rows would not); every trajectory is trained."""
    validate(load_config(None, good + ["train.max_tokens_per_microbatch=128", "train.micro_batch_size=3",
                                       "train.pack_sequences=true"]), world_size=4)
    with pytest.raises(ConfigError, match="must split evenly"):
        validate(load_config(None, good + ["train.micro_batch_size=3"]), world_size=4)


def test_eval_files_are_checked_only_when_evaluating(good):
    """eval.every=0 reads no evaluation file: a recipe's eval.path that is not there is fine."""
    validate(load_config(None, good + ["eval.every=0", "eval.path=/nonexistent.jsonl"]), world_size=1)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    bad.write_text("model:\n  pathh: x\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.pathh'"):
        load_config(bad)


def test_every_recipe_loads():
    """Every shipped YAML recipe type-checks (paths point at the user's files, so no validate)."""
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert len(recipes) >= 7
    for r in recipes:
        cfg = load_config(r)
        assert cfg.loss.beta > 0, r
        if "grpo" in r.name:
            assert cfg.loss.name == "grpo" and cfg.rollout.n == 4
        if "n1" in r.name:
            assert cfg.loss.name == "tbrm" and cfg.rollout.n == 1


def test_model_config_fields_megatron_cannot_carry_fail_validation(good, model_dir):
    """The builder's allow-list runs in validate() (exit 2 before any model is built): a RoPE
    type megatron-core does not implement is named with its file."""
    cfg_file = model_dir / "config.json"
    hf = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**hf, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ConfigError, match=r"config key 'model.path': .*config\.json: rope_scaling.*yarn"):
        validate(load_config(None, good), world_size=1)
    cfg_file.write_text(json.dumps({**hf, "no_such_field": 1}))
    with pytest.raises(ConfigError, match=r"config\.json: no_such_field=1 is not a config key"):
        validate(load_config(None, good), world_size=1)


def test_floats_without_a_dot_are_numbers(good, tmp_path):
    """`optim.lr=1e-3` was refused ("expected a number"): PyYAML reads 1e-3 as a string."""
    cfg = load_config(None, good + ["optim.lr=1e-3", "loss.beta=5E-2", "optim.adam_eps=1e-08"])
    assert (cfg.optim.lr, cfg.loss.beta, cfg.optim.adam_eps) == (1e-3, 5e-2, 1e-8)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  lr: 2e-6\n")
    assert load_config(recipe, good).optim.lr == 2e-6
    with pytest.raises(ConfigError, match="config key 'optim.lr': got '1e-3x', expected a number"):
        load_config(None, good + ["optim.lr=1e-3x"])
    with pytest.raises(ConfigError, match="config key 'train.steps': got '1e3', expected an integer"):
        load_config(None, good + ["train.steps=1e3"])


def _literal_keys(cls, prefix=""):
    """(dotted key, allowed values) of every Literal-typed field of the schema."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _literal_keys(tp, f"{prefix}{f.name}.")
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Literal:
            yield f"{prefix}{f.name}", typing.get_args(tp)
        elif args and typing.get_origin(args[0]) is typing.Literal:  # Optional[Literal[...]]
            yield f"{prefix}{f.name}", typing.get_args(args[0])


def test_every_choice_survives_the_command_line():
    """Each allowed value of each choice key, given as key=value, loads as itself (YAML 1.1 reads
    on/off/yes/no as booleans: a choice spelled that way could never be selected)."""
    from megatron_tbrm.config import Config

    keys = list(_literal_keys(Config))
    assert ("rollout.sleep_mode", ("auto", "always", "never")) in keys
    for key, values in keys:
        for v in values:
            cfg = load_config(None, [f"{key}={v}"])
            sec, *rest = key.split(".")
            got = getattr(cfg, sec)
            for part in rest:
                got = getattr(got, part)
            assert got == v, (key, v, got)


def test_fresh_rollouts_follow_the_step_split(good, tmp_path):
    """Whether a server runs is decided by the same split that sizes the prompt sampler: a
    fraction that rounds every sample to the files (0.99 of 8) runs no server and asks for no
    prompts (it used to start one whose sampler drew nothing)."""
    traj = tmp_path / "t.jsonl"
    traj.write_text('{"prompt": "What is 1 + 1?", "response": "2", "reward": 1.0}\n')
    base = good + [f"data.trajectories={traj}", "train.prompts_per_step=8"]
    cfg = load_config(None, base + ["data.trajectory_fraction=0.99"])
    assert cfg.samples_per_step() == (0, 8) and not cfg.fresh_rollouts
    cfg = load_config(None, base + ["data.trajectory_fraction=0.5"])
    assert cfg.samples_per_step() == (4, 4) and cfg.fresh_rollouts
    cfg = load_config(None, good + ["train.prompts_per_step=8"])
    assert cfg.samples_per_step() == (8, 0) and cfg.fresh_rollouts
