"""Evaluation: grading through evaluate() (fake client, real Math-Verify reward), avg@k /
pass@k arithmetic by hand, benchmark file loading, and the tiny model on a real vLLM CPU
server (library twice at temperature 0, then the CLI end to end)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_tbrm import benchmarks
from megatron_tbrm.benchmarks import get_benchmark, load_benchmark
from megatron_tbrm.data import PromptItem
from megatron_tbrm.eval import avg_pass_at_k, evaluate, format_table, generate_and_score
from megatron_tbrm.reward import RewardScorer
from megatron_tbrm.rollout.client import Trajectory

from _vllm import vllm_server

REPO = Path(__file__).resolve().parents[1]


class FakeClient:
    """RolloutClient.generate's contract, answering from a table: responses[i] is the list
    of texts for prompt i (one per sample); records each call."""

    def __init__(self, responses: list[list[str]]):
        self.responses = responses
        self.calls: list[dict] = []

    def generate(self, prompts_token_ids, n=1, temperature=1.0, top_p=1.0, max_tokens=256, stop=None,
                 seed=None, progress=True, extra=None, stop_token_ids=None):
        self.calls.append(dict(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
        out = []
        for i, ids in enumerate(prompts_token_ids):
            for j in range(n):
                text = self.responses[i][j]
                toks = list(range(len(text.split())))  # one "token" per word
                out.append(Trajectory(i, j, list(ids), toks, [0.0] * len(toks),
                                      "length" if text.endswith("...") else "stop", text))
        return out


def items_for(answers: list[str]) -> list[PromptItem]:
    return [PromptItem(i, f"problem {i}", [1, 2, 3 + i], a) for i, a in enumerate(answers)]


@pytest.fixture(scope="module")
def scorer():
    with RewardScorer("math", timeout_s=10.0, num_workers=2) as s:
        yield s


# (response, reference answer, expected verdict)
GRADING_TABLE = [
    # fractions vs decimals, \frac vs /
    (r"so $x = \boxed{0.5}$", r"\frac{1}{2}", 1.0),
    (r"\boxed{\frac{1}{2}}", "1/2", 1.0),
    (r"\boxed{1/2}", r"\frac12", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{0.33}", r"\frac{1}{3}", 0.0),  # a rounded decimal is not the fraction
    # units, percent, degrees, currency, thousands separator
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{10\%}", "10", 1.0),
    (r"\boxed{45^\circ}", "45", 1.0),
    (r"\boxed{\$12}", "12", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    # nested braces inside \boxed{}
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0),
    (r"\boxed{\sqrt{\frac{1}{4}}}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\left\{1,2\right\}}", r"\{1,2\}", 1.0),
    (r"\boxed{(1,2)}", "(1, 2)", 1.0),
    # no boxed answer, empty or unclosed box (a truncated response)
    ("The answer is 5.", "5", 0.0),
    (r"\boxed{}", "5", 0.0),
    (r"... so the answer is \boxed{5", "5", 0.0),
    # several boxed answers: the last one counts
    (r"first \boxed{3}, corrected: \boxed{5}", "5", 1.0),
    (r"first \boxed{3}, corrected: \boxed{5}", "3", 0.0),
    # plainly wrong
    (r"\boxed{6}", "5", 0.0),
]


def test_grading_table_through_evaluate(scorer):
    responses = [[r] for r, _, _ in GRADING_TABLE]
    items = items_for([a for _, a, _ in GRADING_TABLE])
    summary, trajs, scores = generate_and_score(FakeClient(responses), items, scorer, k=1, progress=False)
    got = [s[0] for s in scores]
    want = [v for _, _, v in GRADING_TABLE]
    wrong = [(r, a, g) for (r, a, _), g, w in zip(GRADING_TABLE, got, want) if g != w]
    assert not wrong, f"verdicts differ from the table: {wrong}"
    assert summary["avg_at_k"] == pytest.approx(sum(want) / len(want))
    assert summary["reward_timeouts"] == 0 and summary["reward_errors"] == 0


def test_avg_and_pass_at_k_by_hand(scorer):
    # 3 problems x 4 samples: scores [1,0,0,1], [0,0,0,0], [1,1,1,1]
    # avg@4 = (2/4 + 0 + 4/4) / 3 = 0.5; pass@4 = 2/3.
    R, W = r"\boxed{7}", r"\boxed{8}"
    responses = [[R, W, W, R], [W, W, W, "no answer ..."], [R, R, R, R]]
    client = FakeClient(responses)
    res = evaluate(client, items_for(["7", "7", "7"]), scorer, k=4, temperature=1.0, top_p=0.9,
                   max_tokens=99, seed=5, progress=False)
    assert res["problems"] == 3 and res["k"] == 4
    assert res["avg_at_k"] == pytest.approx(0.5)
    assert res["pass_at_k"] == pytest.approx(2 / 3)
    # words per response: 1 each, except "no answer ..." with 3 -> (11 + 3) / 12
    assert res["mean_response_tokens"] == pytest.approx(14 / 12)
    assert res["truncated"] == pytest.approx(1 / 12)
    assert client.calls == [dict(n=4, temperature=1.0, top_p=0.9, max_tokens=99, seed=5)]
    assert all(isinstance(v, (int, float)) for v in res.values())  # flat numbers: loggable as is
    assert avg_pass_at_k([[1, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]) == (0.5, 2 / 3)
    assert avg_pass_at_k([[0.0], [1.0], [1.0], [0.0]]) == (0.5, 0.5)


def test_greedy_generates_once_and_counts_k_times(scorer):
    client = FakeClient([[r"\boxed{7}"], [r"\boxed{1}"]])
    summary, trajs, scores = generate_and_score(client, items_for(["7", "7"]), scorer, k=3, temperature=0.0,
                                                progress=False)
    assert client.calls[0]["n"] == 1
    assert scores == [[1.0] * 3, [0.0] * 3] and [len(t) for t in trajs] == [3, 3]
    assert (summary["avg_at_k"], summary["pass_at_k"]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="no problems"):
        evaluate(client, [], scorer)


# ---------------------------------------------------------------------------------------
# Benchmark files


def test_presets_match_the_paper():
    for name in ("aime24", "aime25", "amc23"):
        b = get_benchmark(name)
        assert (b.k, b.temperature) == (32, 1.0)
    for name in ("math500", "minerva", "olympiadbench"):
        b = get_benchmark(name)
        assert (b.k, b.temperature) == (1, 0.0)
    assert get_benchmark("Minerva-Math") is benchmarks.PRESETS["minerva"]
    with pytest.raises(KeyError, match="presets: aime24"):
        get_benchmark("gsm9k")


@pytest.mark.parametrize("fname, row, prompt, answer", [
    ("math500.jsonl", {"problem": "P?", "solution": r"long \boxed{\frac{1}{2}}", "answer": r"\frac{1}{2}",
                       "subject": "Algebra", "level": 2, "unique_id": "x"}, "P?", r"\frac{1}{2}"),
    ("minerva_math.jsonl", {"problem": "P?", "solution": r"Work... so $\boxed{3 \times 10^{8}}$.", "type": "x"},
     "P?", r"3 \times 10^{8}"),
    ("olympiadbench.parquet", {"id": 1, "question": "Q?", "final_answer": [r"$\sqrt{2}$"]}, "Q?", r"\sqrt{2}"),
    ("aime_2024.jsonl", {"ID": "2024-I-1", "Problem": "Q?", "Solution": "...", "Answer": 204}, "Q?", "204"),
    ("aime25.jsonl", {"question": "Q?", "answer": "70"}, "Q?", "70"),
    ("amc23/test.jsonl", {"prompt": [{"role": "user", "content": "Q?"}], "expected_answer": "27"}, "Q?", "27"),
])
def test_field_detection_in_common_formats(tmp_path, tiny_model_dir, fname, row, prompt, answer):
    path = tmp_path / fname
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist([row, row]), path)
    else:
        path.write_text((json.dumps(row) + "\n") * 2)
    name = {"math500.jsonl": "math500", "minerva_math.jsonl": "minerva", "olympiadbench.parquet": "olympiadbench",
            "aime_2024.jsonl": "aime24", "aime25.jsonl": "aime25", "amc23/test.jsonl": "amc23"}[fname]
    items = load_benchmark(name, tiny_model_dir, data_dir=tmp_path, limit=1)
    assert len(items) == 1 and items[0].answer == answer
    assert prompt in items[0].prompt and "\\boxed{}" in items[0].prompt  # the paper's system prompt
    assert items[0].prompt.endswith("<|im_start|>assistant\n")


def test_missing_file_names_the_expected_files(tmp_path, tiny_model_dir):
    with pytest.raises(FileNotFoundError) as e:
        load_benchmark("aime24", tiny_model_dir, data_dir=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "aime24.jsonl" in msg and "aime_2024" in msg and "--data-dir" in msg
    assert "NAME.{jsonl|json|parquet}" in msg
    (tmp_path / "math500.jsonl").write_text(json.dumps({"text": "x", "label": "1"}) + "\n")
    with pytest.raises(ValueError, match="no prompt field; looked for .*problem.*'label', 'text'"):
        load_benchmark("math500", tiny_model_dir, data_dir=tmp_path)


def test_mini_set_ships_and_grades(tiny_model_dir, scorer):
    items = load_benchmark("mini", tiny_model_dir)
    assert len(items) == 20 and get_benchmark("mini").k == 1
    # A perfect "model" scores 1.0 on it: every reference answer parses and verifies.
    client = FakeClient([[f"The answer is $\\boxed{{{it.answer}}}$."] for it in items])
    res = evaluate(client, items, scorer, progress=False)
    assert (res["avg_at_k"], res["pass_at_k"]) == (1.0, 1.0)


def test_table_format():
    r = {"k": 32, "temperature": 1.0, "avg_at_k": 0.132, "pass_at_k": 0.3, "problems": 30,
         "mean_response_tokens": 1234.4, "truncated": 0.021, "seconds": 456.0}
    table = format_table({"aime24": r, "math500": {**r, "k": 1, "temperature": 0.0, "avg_at_k": 0.722}})
    lines = table.splitlines()
    assert lines[2] == "| aime24 | avg@32 (T=1) | 13.2 | 30.0 | 30 | 1234 | 2.1% | 456 |"
    assert lines[3].startswith("| math500 | avg@1 (T=0) | 72.2 |")
    assert lines[4].startswith("| average |  | 42.7 |")


def test_cli_server_options_and_checkpoint_detection(tmp_path):
    from megatron_tbrm.eval import is_checkpoint, make_server, parse_args

    args = parse_args(["--model", "m", "--dtype", "float32", "--max-model-len", "512", "--kv-cache-bytes", "1024",
                       "--max-num-seqs", "4", "--gpu-memory-utilization", "0.5", "--seed", "3",
                       "--vllm-arg=--enable-prefix-caching"])
    cmd = make_server(args, str(tmp_path), tmp_path / "w").command()
    flags = dict(zip(cmd, cmd[1:]))
    assert (flags["--model"], flags["--dtype"], flags["--max-model-len"], flags["--kv-cache-memory-bytes"],
            flags["--max-num-seqs"], flags["--gpu-memory-utilization"], flags["--seed"]) == (
        str(tmp_path), "float32", "512", "1024", "4", "0.5", "3")
    assert "--enable-prefix-caching" in cmd
    assert not is_checkpoint(tmp_path)
    (tmp_path / "iter_0000010").mkdir()
    (tmp_path / "iter_0000010" / "metadata.json").write_text("{}")
    assert is_checkpoint(tmp_path / "iter_0000010") and not is_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("iter_0000010")
    assert is_checkpoint(tmp_path)


# ---------------------------------------------------------------------------------------
# The tiny model on a real vLLM CPU server: one server for both tests (2 cores)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    with vllm_server(tiny_model_dir, tmp_path_factory.mktemp("vllm-eval"), timeout=600, max_num_seqs=16) as s:
        yield s


def test_tiny_model_eval_is_reproducible_at_temperature_0(tiny_model_dir, server, scorer):
    from megatron_tbrm.rollout import RolloutClient

    items = load_benchmark("mini", tiny_model_dir)
    client = RolloutClient.for_server(server, max_concurrency=8, timeout=300, retries=1)
    runs = [generate_and_score(client, items, scorer, k=1, temperature=0.0, max_tokens=32, progress=False)
            for _ in range(2)]
    (s1, t1, sc1), (s2, t2, sc2) = runs
    for key in ("problems", "k", "avg_at_k", "pass_at_k", "mean_response_tokens", "truncated"):
        assert s1[key] == s2[key], key
    assert sc1 == sc2
    assert [t[0].response_token_ids for t in t1] == [t[0].response_token_ids for t in t2]
    assert all(0 < len(t[0].response_token_ids) <= 32 for t in t1)
    assert s1["mean_response_tokens"] == sum(len(t[0].response_token_ids) for t in t1) / 20


def run_cli(cmd: list[str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """Run the CLI; on timeout SIGTERM it first (its handler stops any server it started)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"the eval CLI timed out after {timeout} s:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def test_cli_end_to_end(tiny_model_dir, server, tmp_path):
    # --server-url: the module's server (starting a second one would double the test's time;
    # the CLI's own server is the VLLMServer built by make_server, tested above).
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "megatron_tbrm.eval", "--model", str(tiny_model_dir), "--benchmarks", "mini",
           "--limit", "5", "--k", "2", "--temperature", "1.0", "--max-tokens", "16", "--out", str(out),
           "--server-url", server.url, "--no-progress", "--save-responses"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    r = run_cli(cmd, timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    res = json.loads(out.read_text())
    mini = res["benchmarks"]["mini"]
    assert (mini["problems"], mini["k"], mini["metric"], mini["temperature"]) == (5, 2, "avg@2", 1.0)
    assert len(mini["per_problem"]) == 5 and all(len(p["scores"]) == 2 for p in mini["per_problem"])
    assert all(len(p["responses"]) == 2 for p in mini["per_problem"])
    assert all(0 < n <= 16 for p in mini["per_problem"] for n in p["response_tokens"])
    assert mini["mean_response_tokens"] == pytest.approx(
        sum(sum(p["response_tokens"]) for p in mini["per_problem"]) / 10)
    assert (mini["avg_at_k"], mini["pass_at_k"]) == avg_pass_at_k([p["scores"] for p in mini["per_problem"]])
    assert res["source"] == "hf" and res["average_avg_at_k"] == mini["avg_at_k"]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert len(table) == 3 and table[2].startswith(f"| mini | avg@2 (T=1) | {100 * mini['avg_at_k']:.1f} |")
    assert server.alive()  # an attached server is left running
