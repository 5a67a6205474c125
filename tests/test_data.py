"""Prompt datasets (JSONL, DAPO-style Parquet), bad rows, the sampler's resume, arithmetic task."""
from __future__ import annotations

import json

import pytest

from megatron_tbrm.data import (SYSTEM_PROMPT, PromptDataset, PromptSampler, arithmetic_problems,
                                arithmetic_solution, make_arithmetic_dataset, make_arithmetic_splits)
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
