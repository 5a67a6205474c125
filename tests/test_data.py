"""Prompt datasets (JSONL, DAPO-style Parquet), bad rows, duplicates, DAPO's instruction wrapper,
the sampler's resume (and its mirror on the ranks that do not sample), evaluation files read with
their own fields and checked by config validation, the arithmetic task."""
from __future__ import annotations

import json

import pytest

from megatron_tbrm.config import ConfigError, load_config, validate
from megatron_tbrm.data import (SYSTEM_PROMPT, MirroredSampler, PromptDataset, PromptSampler, load_eval_items, read_rows,
                                strip_dapo_instruction)
from megatron_tbrm.demo.arithmetic import (arithmetic_problems, arithmetic_solution, make_arithmetic_dataset,
                                           make_arithmetic_splits)
from megatron_tbrm.reward import math_reward


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else (json.dumps(r) + "\n").encode())
    return path


def expected_text(user, system=SYSTEM_PROMPT):
    sys_turn = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return f"{sys_turn}<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def test_jsonl_items_are_templated_and_tokenized(tmp_path, tok):
    p = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "What is 1 + 2?", "answer": 3},
                                           {"prompt": "What is 4 - 1?", "answer": "3"}])
    ds = PromptDataset(p, tok)
    assert len(ds) == 2 and ds.stats.kept == 2 and ds.stats.bad == 0
    item = ds[0]
    assert item.index == 0 and item.answer == "3"
    assert item.prompt == expected_text("What is 1 + 2?")
    # Token ids are those of an independent encoding of the exact expected text.
    assert item.prompt_ids == tok(expected_text("What is 1 + 2?"), add_special_tokens=False)["input_ids"]
    assert item.prompt_ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    no_sys = PromptDataset(p, tok, system_prompt=None)
    assert no_sys[1].prompt == expected_text("What is 4 - 1?", system=None)


def test_dapo_parquet_with_messages_and_nested_answer(tmp_path, tiny_model_dir):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = [
        {"data_source": "math_dapo", "prompt": [{"role": "user", "content": "Find x if x + 1 = 3."}],
         "ability": "MATH", "reward_model": {"ground_truth": "2", "style": "rule"}},
        {"data_source": "math_dapo",
         "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2^3?"}],
         "ability": "MATH", "reward_model": {"ground_truth": "8", "style": "rule"}},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    ds = PromptDataset(tmp_path / "dapo.parquet", tiny_model_dir, answer_key="reward_model.ground_truth")
    assert [i.answer for i in ds] == ["2", "8"]
    assert ds[0].prompt == expected_text("Find x if x + 1 = 3.")
    assert ds[1].prompt == expected_text("2^3?", system="Be brief.")  # the row's own system turn wins


def test_bad_rows_are_counted_and_warned(tmp_path, tok):
    p = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "answer": "1"},
        b"\xff\xfe not utf8\n",
        b"{not json\n",
        {"question": "wrong key", "answer": "1"},
        {"prompt": "no answer"},
        {"prompt": "   ", "answer": "1"},
        {"prompt": [], "answer": "1"},
        {"prompt": [{"role": "user"}], "answer": "1"},
        b"\n",  # blank line: not a row
        {"prompt": "ok too", "answer": 7},
    ])
    with pytest.warns(UserWarning, match=r"bad\.jsonl: skipped 7 of 9 rows"):
        ds = PromptDataset(p, tok)
    assert [i.index for i in ds] == [0, 8] and ds.stats.bad == 7 and ds.stats.rows == 9
    assert ds.stats.reasons["not UTF-8"] == 1 and ds.stats.reasons["invalid JSON"] == 1
    assert ds.stats.reasons["missing prompt field 'prompt'"] == 1
    assert ds.stats.reasons["empty prompt"] == 1
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1: line 2: not UTF-8"):
        PromptDataset(p, tok, strict=True)


def test_strict_names_file_row_and_key(tmp_path, tok):
    p = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "a", "answer": "1"}, {"prompt": "b"}])
    with pytest.raises(ValueError, match=r"s\.jsonl: row 1: missing answer field 'answer'"):
        PromptDataset(p, tok, strict=True)


def test_empty_file_and_no_usable_rows_are_errors(tmp_path, tok):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"empty\.jsonl: empty file"):
        PromptDataset(tmp_path / "empty.jsonl", tok)
    p = write_jsonl(tmp_path / "allbad.jsonl", [{"x": 1}])
    with pytest.raises(ValueError, match="no usable prompts"), pytest.warns(UserWarning):
        PromptDataset(p, tok)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        PromptDataset(tmp_path / "nope.jsonl", tok)
    with pytest.raises(ValueError, match="unknown format '.csv'"):
        (tmp_path / "x.csv").write_text("a")
        PromptDataset(tmp_path / "x.csv", tok)


def test_long_prompts_are_skipped_and_counted(tmp_path, tok):
    p = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "short", "answer": "1"},
                                           {"prompt": "long " * 200, "answer": "1"}])
    limit = len(PromptDataset(p, tok)[0].prompt_ids)
    with pytest.warns(UserWarning, match="1 prompts longer than max_prompt_tokens"):
        ds = PromptDataset(p, tok, max_prompt_tokens=limit)
    assert len(ds) == 1 and ds.stats.too_long == 1 and ds[0].index == 0


def test_sampler_epochs_shuffle_and_exact_resume():
    data = list(range(10))  # any sequence works; items are returned as is
    s = PromptSampler(data, batch_size=4, seed=3)
    batches = [s.next_batch() for _ in range(5)]  # 20 items = 2 epochs exactly
    flat = [x for b in batches for x in b]
    assert sorted(flat[:10]) == data and sorted(flat[10:]) == data  # each epoch is a permutation
    assert flat[:10] != flat[10:] and flat[:10] != data  # reshuffled per epoch
    assert s.state_dict()["epoch"] == 2

    a = PromptSampler(data, batch_size=4, seed=3)
    a.next_batch(), a.next_batch(), a.next_batch()  # mid-epoch-1 (crossed the boundary)
    state = json.loads(json.dumps(a.state_dict()))  # survives a checkpoint round trip
    expected = [a.next_batch() for _ in range(4)]
    b = PromptSampler(data, batch_size=4, seed=99)
    b.load_state_dict(state)
    assert [b.next_batch() for _ in range(4)] == expected
    with pytest.raises(ValueError, match="dataset of 10 prompts, this one has 3"):
        PromptSampler([1, 2, 3], batch_size=1).load_state_dict(state)

    finite = PromptSampler(data, batch_size=4, shuffle=False, num_epochs=1)
    assert list(finite) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_arithmetic_dataset_is_deterministic_and_splits_do_not_overlap(tmp_path):
    p1 = make_arithmetic_dataset(tmp_path / "a.jsonl", 50, seed=1)
    p2 = make_arithmetic_dataset(tmp_path / "b.jsonl", 50, seed=1)
    assert p1.read_bytes() == p2.read_bytes()
    rows = [json.loads(x) for x in p1.read_text().splitlines()]
    assert len({r["prompt"] for r in rows}) == 50
    for r in rows:  # answers recomputed independently of the generator
        a, op, b = r["prompt"][len("What is "):-1].split(" ")
        assert r["answer"] == str(eval(f"{int(a)} {op} {int(b)}"))
        assert 0 <= int(a) < 100 and 0 <= int(b) < 100 and int(r["answer"]) >= 0

    train, test = make_arithmetic_splits(tmp_path / "split", 400, 100, seed=1)
    tr = {json.loads(x)["prompt"] for x in train.read_text().splitlines()}
    te = {json.loads(x)["prompt"] for x in test.read_text().splitlines()}
    assert len(tr) == 400 and len(te) == 100 and not tr & te
    assert arithmetic_problems(10, seed=1) == arithmetic_problems(30, seed=1)[:10]
    with pytest.raises(ValueError, match="ops='/'"):
        arithmetic_problems(1, ops="/")
    with pytest.raises(ValueError, match="exceeds the 55 distinct problems"):
        arithmetic_problems(56, digits=1, ops="-")


def test_sft_solution_format_earns_full_reward():
    sol = arithmetic_solution("What is 37 + 58?")
    assert sol == "37 + 58 = 95. The answer is \\boxed{95}."
    assert arithmetic_solution("What is 9 * 12?").endswith("\\boxed{108}.")
    assert math_reward(sol, "95") == 1.0
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        arithmetic_solution("Hello")


# ------------------------------------------------------------------ DAPO-Math-17k's shape

# DAPO-Math-17k's user message, written out from the dataset card / shared/notes/tbrm.md (not
# taken from the code under test).
DAPO_HEAD = ("Solve the following math problem step by step. The last line of your response should be of the "
             "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_TAIL = '\n\nRemember to put your answer on its own line after "Answer:"'


def dapo_row(problem, answer, index=0, wrapped=True):
    return {"data_source": "math_dapo",
            "prompt": [{"role": "user", "content": DAPO_HEAD + problem + DAPO_TAIL if wrapped else problem}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-based"},
            "extra_info": {"index": str(index)}}


def write_parquet(path, rows):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_duplicate_rows_are_dropped_counted_and_logged(tmp_path, tok):
    """Issue 14.2: the public parquet repeats each prompt ~100 times. Rows (index in brackets):
    A[0] B[1] A[2] C[3] A[4] B[5] A-with-another-answer[6]: 3 duplicates, 4 distinct prompts."""
    spec = [("A", "1"), ("B", "2"), ("A", "1"), ("C", "3"), ("A", "1"), ("B", "2"), ("A", "9")]
    p = write_parquet(tmp_path / "dup.parquet", [dapo_row(f"Problem {q}.", a, i) for i, (q, a) in enumerate(spec)])
    with pytest.warns(UserWarning, match=r"dup\.parquet: dropped 3 duplicate rows .* 4 distinct prompts of 7 rows"):
        ds = PromptDataset(p, tok, answer_key="reward_model.ground_truth")
    assert [(i.index, i.answer) for i in ds] == [(0, "1"), (1, "2"), (3, "3"), (6, "9")]
    assert ds.stats.rows == 7 and ds.stats.duplicates == 3 and ds.stats.kept == 4 and ds.stats.bad == 0
    kept_all = PromptDataset(p, tok, answer_key="reward_model.ground_truth", dedupe=False)
    assert len(kept_all) == 7 and kept_all.stats.duplicates == 0


def test_parquet_is_read_with_the_needed_columns_only(tmp_path):
    p = write_parquet(tmp_path / "cols.parquet", [dapo_row("Find 1+1.", "2")])
    (_, row), = read_rows(p, keys=("prompt", "reward_model.ground_truth"))
    assert sorted(row) == ["prompt", "reward_model"] and row["reward_model"]["ground_truth"] == "2"
    (_, full), = read_rows(p)
    assert sorted(full) == ["ability", "data_source", "extra_info", "prompt", "reward_model"]


def test_strip_instruction_trains_on_the_raw_problem_with_the_paper_prompt(tmp_path, tok):
    """Issue 14.1: DAPO's message asks for "Answer: $Answer"; the paper's template asks for \\boxed{}.
    strip_instruction keeps the problem only, under the paper's system prompt."""
    rows = [dapo_row("What is $1+1$?", "2", 0), dapo_row("Compute 3*3.", "9", 1, wrapped=False),
            dapo_row("Line one.\n\nLine two: find x.", "4", 2)]
    p = write_parquet(tmp_path / "d.parquet", rows)
    ds = PromptDataset(p, tok, answer_key="reward_model.ground_truth", strip_instruction=True)
    assert ds[0].prompt == expected_text("What is $1+1$?")
    assert ds[1].prompt == expected_text("Compute 3*3.")  # not wrapped: as it is
    assert ds[2].prompt == expected_text("Line one.\n\nLine two: find x.")
    assert ds.stats.instruction_stripped == 2
    kept = PromptDataset(p, tok, answer_key="reward_model.ground_truth")  # default: the message as written
    assert kept[0].prompt == expected_text(DAPO_HEAD + "What is $1+1$?" + DAPO_TAIL)
    plain = write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "What is 1 + 2?", "answer": "3"}])
    with pytest.warns(UserWarning, match="strip_instruction is on but no prompt carries DAPO's instruction"):
        PromptDataset(plain, tok, strip_instruction=True)


@pytest.mark.parametrize("text, problem", [
    (DAPO_HEAD + "Find x." + DAPO_TAIL, "Find x."),
    (DAPO_HEAD + "Find x.", "Find x."),  # the reminder missing
    ("  " + DAPO_HEAD + "Find x." + DAPO_TAIL + "\n", "Find x."),
    ("Find x." + DAPO_TAIL, None),  # no instruction in front: not DAPO's wrapper
    ("Solve the following math problem step by step. Find x.", None),
    (DAPO_HEAD + DAPO_TAIL, None),  # nothing left
])
def test_strip_dapo_instruction(text, problem):
    assert strip_dapo_instruction(text) == problem


def test_mirrored_sampler_carries_rank0_state_and_draws_nothing():
    """Ranks other than 0 load no dataset (issue 14.2); what they save is rank 0's position."""
    rank0 = PromptSampler(list(range(10)), batch_size=4, seed=3)
    mirror = MirroredSampler(rank0.state_dict())
    rank0.next_batch(), rank0.next_batch(), rank0.next_batch()
    mirror.load_state_dict(rank0.state_dict())  # what train_step does with the broadcast state
    assert mirror.state_dict() == {"epoch": 1, "index": 2, "seed": 3, "size": 10, "shuffle": True}
    resumed = PromptSampler(list(range(10)), batch_size=4, seed=0)
    resumed.load_state_dict(mirror.state_dict())  # a checkpoint saved from the mirror resumes rank 0
    assert resumed.next_batch() == rank0.next_batch()
    with pytest.raises(RuntimeError, match="only the sampling rank"):
        mirror.next_batch()
    with pytest.raises(RuntimeError, match="no sampler state received"):
        MirroredSampler().state_dict()
    with pytest.raises(ValueError, match="expected a PromptSampler state"):
        MirroredSampler({"epoch": 0})


# ------------------------------------------------------------------ evaluation files (issue 14.7)

MATH500_ROWS = [  # MATH500's fields: problem, solution, answer, subject, level, unique_id
    {"problem": "What is $\\frac{1}{2} + \\frac{1}{2}$?", "solution": "It is $\\boxed{1}$.", "answer": "1",
     "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"},
    {"problem": "Simplify $\\frac{2}{4}$.", "solution": "$\\boxed{\\frac{1}{2}}$", "answer": "\\frac{1}{2}",
     "subject": "Prealgebra", "level": 2, "unique_id": "test/prealgebra/2.json"},
]


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "vocab_size": 300, "hidden_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 256, "max_position_embeddings": 4096,
    }))
    return d


@pytest.fixture
def paper_like(tmp_path, model_dir):
    """A 7B-recipe-like config: DAPO parquet for training, MATH500 JSONL for evaluation."""
    train = write_parquet(tmp_path / "dapo.parquet", [dapo_row("Find 1+1.", "2", 0), dapo_row("Find 2+2.", "4", 1)])
    ev = write_jsonl(tmp_path / "math500.jsonl", MATH500_ROWS)
    return [f"model.path={model_dir}", f"data.train_path={train}", "data.prompt_key=prompt",
            "data.answer_key=reward_model.ground_truth", "eval.every=50", f"eval.path={ev}",
            "train.prompts_per_step=4", "train.micro_batch_size=1"], ev


def test_math500_eval_with_dapo_training_keys_validates_and_loads(paper_like, tok):
    overrides, ev = paper_like
    cfg = load_config(None, overrides)
    validate(cfg, world_size=1)  # used to stop at start-up with "no usable prompts"
    items = load_eval_items(ev, tok, cfg.eval.prompt_key, cfg.eval.answer_key, SYSTEM_PROMPT)
    assert [i.answer for i in items] == ["1", "\\frac{1}{2}"]
    assert items[1].prompt == expected_text("Simplify $\\frac{2}{4}$.")
    explicit = load_eval_items(ev, tok, "problem", "answer", SYSTEM_PROMPT, limit=1)
    assert [i.answer for i in explicit] == ["1"]


@pytest.mark.parametrize("extra, match", [
    (["eval.answer_key=final"], r"'eval.answer_key'='final' .*math500\.jsonl: no answer field 'final'; the rows "
                                r"have fields \['answer', 'level', 'problem', 'solution', 'subject', 'unique_id'\]"),
    (["eval.prompt_key=question"], r"'eval.prompt_key'='question'.*math500\.jsonl: no prompt field 'question'"),
    (["data.answer_key=answer"], r"'data.answer_key'='answer' \(data.train_path\): .*dapo\.parquet: no row has both "
                                 r"the prompt field 'prompt' and the answer field 'answer'; the rows have fields "
                                 r"\['ability', 'data_source', 'extra_info', 'prompt', 'reward_model'\]"),
])
def test_bad_data_keys_fail_in_validation_naming_file_and_keys(paper_like, extra, match):
    overrides, _ = paper_like
    with pytest.raises(ConfigError, match=match):
        validate(load_config(None, overrides + extra), world_size=1)


def test_eval_file_without_known_fields_fails_in_validation(paper_like, tmp_path):
    overrides, _ = paper_like
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"q": "1+1", "a": "2"}])
    with pytest.raises(ConfigError, match=r"odd\.jsonl: no prompt field; looked for \['problem', .*the rows have "
                                          r"fields \['a', 'q'\]"):
        validate(load_config(None, overrides + [f"eval.path={odd}"]), world_size=1)
    validate(load_config(None, overrides + [f"eval.path={odd}", "eval.prompt_key=q", "eval.answer_key=a"]),
             world_size=1)
    validate(load_config(None, overrides + [f"eval.path={odd}", "eval.every=0"]), world_size=1)  # not used


def test_paper_recipes_train_on_the_raw_problem_with_the_paper_prompt():
    """The paper's template (Qwen2.5-Math's system prompt asking for \\boxed{}) on the problem
    alone: the recipes strip DAPO's "Answer: $Answer" wrapper (issue 14.1)."""
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("qwen2.5_math_*.yaml"))
    assert len(recipes) == 6
    for r in recipes:
        cfg = load_config(r)
        assert cfg.data.strip_instruction and cfg.data.dedupe, r
        assert cfg.data.system_prompt == "Please reason step by step, and put your final answer within \\boxed{}.", r


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_duplicates_of_bad_rows_and_other_column_types(tmp_path, tok, fmt):
    """Bad rows stay bad rows (not duplicates), whatever the file type; an integer or decimal
    answer column is compared like a string one (Parquet compares raw values in Arrow)."""
    rows = [{"prompt": None, "answer": 1}, {"prompt": None, "answer": 1},
            {"prompt": [], "answer": 1}, {"prompt": [], "answer": 1},
            {"prompt": "A", "answer": 1}, {"prompt": "A", "answer": 1}, {"prompt": "A", "answer": 2}]
    dec = [{"prompt": "B", "answer": 1.5}, {"prompt": "B", "answer": 1.5}, {"prompt": "B", "answer": 2.5}]
    if fmt == "parquet":
        p = write_parquet(tmp_path / "x.parquet", [dict(r, prompt=r["prompt"] if r["prompt"] != [] else None)
                                                   for r in rows])
        q = write_parquet(tmp_path / "y.parquet", dec)
    else:
        p, q = write_jsonl(tmp_path / "x.jsonl", rows), write_jsonl(tmp_path / "y.jsonl", dec)
    with pytest.warns(UserWarning):
        ds = PromptDataset(p, tok)
    assert ds.stats.rows == 7 and ds.stats.bad == 4 and ds.stats.duplicates == 1
    assert [(i.index, i.answer) for i in ds] == [(4, "1"), (6, "2")]
    with pytest.warns(UserWarning, match="dropped 1 duplicate rows"):
        ds = PromptDataset(q, tok)
    assert [(i.index, i.answer) for i in ds] == [(0, "1.5"), (2, "2.5")]



# ------------------------------------------------------------------ the trainer's data start-up (issue 14.2)


def _trainer_data_on_rank(rank, world_size, overrides, model_dir):
    """The data part of Trainer.__init__ (Trainer._load_data) on one gloo rank, no model."""
    from megatron_tbrm.data import load_tokenizer
    from megatron_tbrm.train import Trainer

    t = Trainer.__new__(Trainer)
    t.cfg, t.is_main, t.tokenizer = load_config(None, overrides), rank == 0, load_tokenizer(model_dir)
    t.pad_id, t.eot_id = t.tokenizer.pad_token_id, None  # what __init__ sets before the data
    try:
        t._load_data()
    except Exception as e:  # returned, not raised: the other rank's outcome is part of the test
        return {"error": f"{type(e).__name__}: {e}"}
    return {"dataset": None if t.data is None else len(t.data.dataset), "sampler": type(t.sampler).__name__,
            "state": t.sampler.state_dict(), "stats": t.data_stats,
            "eval": None if t.eval_items is None else [i.answer for i in t.eval_items]}


def test_only_rank0_loads_the_data_and_every_rank_knows_its_state(tmp_path, tiny_model_dir):
    from _dist import run_distributed

    rows = [dapo_row("Find 1+1.", "2", i) for i in range(5)] + [dapo_row("Find 2+2.", "4", 5)]
    train = write_parquet(tmp_path / "dapo.parquet", rows)
    ev = write_jsonl(tmp_path / "math500.jsonl", MATH500_ROWS)
    overrides = [f"data.train_path={train}", "data.answer_key=reward_model.ground_truth", "data.strip_instruction=true",
                 "train.prompts_per_step=2", "eval.every=1", f"eval.path={ev}"]
    r0, r1 = run_distributed(_trainer_data_on_rank, 2, overrides, str(tiny_model_dir))
    assert r0["dataset"] == 2 and r0["sampler"] == "PromptSampler" and r0["eval"] == ["1", "\\frac{1}{2}"]
    assert r1["dataset"] is None and r1["sampler"] == "MirroredSampler" and r1["eval"] is None
    state = {"epoch": 0, "index": 0, "seed": 0, "size": 2, "shuffle": True}
    assert r0["state"] == r1["state"] == state
    assert r0["stats"] == r1["stats"]
    assert r0["stats"]["data_rows"] == 6 and r0["stats"]["data_rows_duplicate"] == 4 and r0["stats"]["data_prompts"] == 2

    bad = [f"data.train_path={train}", "data.answer_key=answer"]  # no usable prompt (what validate() catches)
    r0, r1 = run_distributed(_trainer_data_on_rank, 2, bad, str(tiny_model_dir))
    assert r0["error"].startswith("ValueError: ") and "no usable prompts" in r0["error"]
    assert r1["error"] == "RuntimeError: rank 0 could not load the data: " + r0["error"]
